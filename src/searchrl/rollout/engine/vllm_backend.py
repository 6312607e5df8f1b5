"""Generation with vLLM (optional, GPU machines): same contract as the HF backend, much faster.

:class:`VLLMGenerator` sends prompt token ids (never text) to ``vllm.LLM.generate`` with the stop
strings (``include_stop_str_in_output=True``, so the stop string stays in the output), the
tokenizer's EOS and chat end ids as stop token ids, the sampled token's log-prob (``logprobs=0``)
and a per-prompt seed (``seed + i``, so identical prompts in a GRPO group still differ). vLLM's
finish reasons map to ours: ``length`` -> ``"length"``; ``stop`` with a string stop reason ->
``"stop"``; ``stop`` on an EOS / stop token -> ``"eos"``. ``Completion.text`` is decoded from the
token ids here, as in the HF backend.

Log-probs are what vLLM's ``logprobs_mode`` returns (its default, ``raw_logprobs``, is the raw
model's log-softmax at temperature 1): equal to the HF backend's at temperature 1, the RL setting.

:meth:`VLLMGenerator.load_weights` copies a trainer's weights into the running engine in place
(``LLM.apply_model`` runs the model's own ``load_weights`` in every worker, chunk by chunk, then
the prefix cache is reset so no KV computed with old weights is reused).

vLLM is imported inside the class only (it is not a dependency; ``pip install vllm``). Left out:
async engines, multi-node placement, LoRA adapters, sleep/wake of the engine between phases.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from searchrl.errors import SearchRLError
from searchrl.rollout.engine.protocol import Completion, SamplingParams

log = logging.getLogger(__name__)

VLLM_INSTALL = "pip install vllm"
_CHUNK_BYTES = 512 * 2**20  # weights sent per apply_model call


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


def _load_into(model: torch.nn.Module, weights: list[tuple[str, torch.Tensor]]) -> int:
    """Runs inside each vLLM worker: the model's own loader maps HF names to its fused layout."""
    model.load_weights(weights=weights)  # type: ignore[operator]
    return len(weights)


class VLLMGenerator:
    """Generator backed by ``vllm.LLM`` over ``model_path`` (default: the cached SmolLM2 folder).

    ``engine_kwargs`` go to ``vllm.LLM`` (``dtype``, ``gpu_memory_utilization``,
    ``tensor_parallel_size``, ``max_model_len``, ``enable_prefix_caching``...).
    """

    def __init__(self, model_path: str | None = None, **engine_kwargs: Any):
        try:
            import vllm
        except ImportError as e:
            raise BackendUnavailable(
                f"the vllm generation backend needs vLLM, which is not installed: {VLLM_INSTALL} "
                "(or use the 'hf' backend)"
            ) from e
        from searchrl.models import eos_token_ids, resolve_model_path

        # apply_model (weight sync) pickles a function to the engine process.
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        self.model_path = resolve_model_path(model_path)
        self._vllm = vllm
        self.llm = vllm.LLM(model=self.model_path, **engine_kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.stop_token_ids = eos_token_ids(self.tokenizer)

    def generate(
        self, prompts: list[list[int]], sampling: SamplingParams, stop: list[str] | None = None
    ) -> list[Completion]:
        """One completion per prompt, in order."""
        if any(len(p) == 0 for p in prompts):
            raise SearchRLError("a prompt is empty: generation needs at least one token")
        if not prompts or sampling.max_new_tokens == 0:
            return [Completion([], [], "length") for _ in prompts]
        params = [
            self._vllm.SamplingParams(
                **vllm_sampling_kwargs(sampling, stop, self.stop_token_ids, i)
            )
            for i in range(len(prompts))
        ]
        inputs = [{"prompt_token_ids": list(p)} for p in prompts]
        outputs = self.llm.generate(inputs, params, use_tqdm=False)
        return [self._completion(out.outputs[0]) for out in outputs]

    def _completion(self, out: Any) -> Completion:
        token_ids = list(out.token_ids)
        reason, stop_string = finish_from_vllm(out.finish_reason, out.stop_reason)
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        logprobs = _sampled_logprobs(token_ids, out.logprobs)
        return Completion(token_ids, logprobs, reason, stop_string, text)

    def load_weights(
        self, weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]
    ) -> None:
        """Copy weights (HF parameter names, e.g. a policy's ``state_dict()`` or
        ``named_parameters()``; merge LoRA adapters first) into the engine's model, in place."""
        items = weights.items() if isinstance(weights, Mapping) else weights
        chunk: list[tuple[str, torch.Tensor]] = []
        size = 0
        for name, tensor in items:
            t = tensor.detach().to("cpu", copy=True)  # CPU tensors cross process boundaries
            chunk.append((name, t))
            size += t.numel() * t.element_size()
            if size >= _CHUNK_BYTES:
                self.llm.apply_model(functools.partial(_load_into, weights=chunk))
                chunk, size = [], 0
        if chunk:
            self.llm.apply_model(functools.partial(_load_into, weights=chunk))
        self.llm.reset_prefix_cache()
