"""Generation with any Hugging Face causal LM: our own sampling loop over a KV cache.

:class:`HFGenerator` implements :class:`~searchrl.rollout.engine.protocol.Generator`:

* prompts are left-padded into one batch (or chunks of ``batch_size``, longest first) with an
  attention mask and position ids that count real tokens only, so a padded row computes what it
  would alone; the prompt is run once, then one token per step through a ``DynamicCache``;
* greedy (``temperature == 0``) takes the argmax; otherwise tokens are drawn from
  ``softmax(logits / temperature)``, restricted to the top-p nucleus when ``top_p < 1``, with a
  ``torch.Generator`` seeded from ``SamplingParams.seed`` (same seed, same inputs: same tokens;
  :func:`~searchrl.rollout.engine.sampling.sample_next`);
* **log-probs** are ``log_softmax(logits / temperature)`` of the raw model at the sampled token
  (temperature 1 when greedy), *before* top-p truncation: at the RL setting (temperature 1, top-p 1)
  this is exactly the policy's log-probability, the quantity PPO/GRPO ratios need;
* a row ends on an EOS id (the tokenizer's EOS and chat end tokens such as ``<|im_end|>``, see
  :func:`searchrl.models.eos_token_ids`), on a stop string, or at ``max_new_tokens``. Stop strings
  are checked while sampling by decoding only the tail of the row; a stop string completed inside
  a token ends the row after that token. Tokens are returned exactly as sampled (EOS included);
  ``Completion.text`` is their decoding with special tokens skipped (as vLLM does);
* finished rows leave the batch at once (the KV cache rows are index-selected, and leading cache
  columns no remaining row attends to are trimmed), so the work per step shrinks as rows finish;
* with ``amp`` (bf16 over fp32 weights) the forward passes run on a bf16 copy of the weights,
  refreshed when the weights change (:meth:`HFGenerator.generation_model`; same detection as the
  staleness rule below).

**Continuous batching** (:meth:`HFGenerator.stream`,
:class:`~searchrl.rollout.engine.hf_stream.HFStream`): rows are added under a key and join the
running decode batch between steps; each step returns the rows that finished, so the multi-turn
loop can put a trajectory's next turn back as soon as its observation is ready. Both run the one
decode cycle of :mod:`searchrl.rollout.engine.decode` (``generate``: join all rows, step until
done).

**KV reuse** (``kv_reuse=True``, the default; see :mod:`searchrl.rollout.engine.kv_cache`): after a
call, each returned row's KV (prompt + sampled tokens) is kept; a later prompt that starts with a
kept row (the multi-turn loop's next turn: the same context plus an inserted observation) only runs
its new suffix, and any prompt reuses the longest prefix it shares with a kept row (the
instruction template). Within a call, rows sharing a prefix of at least ``MIN_SHARED`` tokens
beyond their past (the template; a GRPO group's copies of one prompt) run it once. Rows with pasts
of different lengths are batched as ``[pad][past][pad][new]`` with mask holes and real-token
position ids, so every row computes what it would alone (up to float rounding). When the rows'
new parts differ much in length (a 200-token observation after one row, short feedback after
another), they are prefilled as several batches of similar lengths (less padding) and merged into
one cache for decoding; random draws still go to rows in row order, so a seed gives the same
tokens with reuse on or off. Kept rows not continued for ``kv_keep_calls`` calls are dropped.

*Staleness rule*: kept KV is only valid for the weights that made it. It is dropped (1) by
:meth:`HFGenerator.reset_cache` (``run_rollouts`` calls it at its start and end, so nothing is
kept across RL steps), and (2) automatically when the weights changed since the last call: the
generator compares every parameter's storage address and in-place version counter
(``optimizer.step``, ``load_state_dict``, in-place ops on the parameter and assigning
``param.data`` change one of them). Writing through ``param.data`` (``p.data.add_(...)``: a
tensor with its own version counter) is *not* detected: call ``reset_cache()`` after such edits.
Models whose cache layers are not plain ``DynamicLayer`` (sliding-window, hybrid, quantized
caches) run without reuse (a warning says so).

Left out: beam search, repetition penalties, speculative decoding, CUDA graphs (use the vLLM
backend for speed), copy-free sharing of a prefix between rows (a shared past is copied into each
row of the batch cache), a preallocated or paged cache (each decode step concatenates, each join
and each departure copies the batch cache: on CPU these copies make continuous batching no faster
than rounds).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from searchrl.errors import SearchRLError
from searchrl.models import amp_context
from searchrl.rollout.engine.decode import (
    Decoder,
    FinishRules,
    Row,
    Runner,
    Sampler,
    accepts_logits_to_keep,
)
from searchrl.rollout.engine.hf_stream import HFStream
from searchrl.rollout.engine.kv_cache import (
    KVEntry,
    KVStats,
    KVStore,
    Match,
    reuse_unsupported,
    weights_fingerprint,
)
from searchrl.rollout.engine.checks import check_request
from searchrl.rollout.engine.protocol import Completion, SamplingParams
from searchrl.rollout.engine.sampling import sample_next

log = logging.getLogger(__name__)


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def row_order_sampler(sampling: SamplingParams, generator: torch.Generator | None) -> Sampler:
    """:func:`~searchrl.rollout.engine.sampling.sample_next` with rows drawn in the order of their
    ``index`` whatever their batch positions, so a seed gives each row the same draws however
    its call's prefill was split."""

    def sample(logits: torch.Tensor, rows: Sequence[Row]) -> tuple[torch.Tensor, torch.Tensor]:
        order = [r.index for r in rows]
        if all(a < b for a, b in zip(order, order[1:])):
            return sample_next(logits, sampling, generator)
        by_row = sorted(range(len(order)), key=order.__getitem__)  # batch positions, row order
        perm = torch.tensor(by_row, device=logits.device)
        tokens, logps = sample_next(logits[perm], sampling, generator)  # (b,), (b,) in row order
        return (tokens.new_empty(tokens.shape).index_copy_(0, perm, tokens),
                logps.new_empty(logps.shape).index_copy_(0, perm, logps))  # fmt: skip

    return sample


class HFGenerator:
    """Generator over a transformers causal LM (see the module docstring for the exact semantics).

    ``device``: move the model there (default: where its parameters are). ``batch_size``: at most
    this many prompts per forward batch (default: all at once). ``eos_token_ids``: ids that end a
    row (default: :func:`searchrl.models.eos_token_ids`). The model is put in eval mode during
    ``generate`` and its previous mode restored afterwards, so a policy being trained can be shared.
    ``kv_reuse``: keep and reuse KV across calls and share prefixes within one (module docstring);
    ``kv_keep_calls``: a kept row not continued for this many calls is dropped. ``amp``: compute
    in this dtype (bfloat16) over fp32 weights: with ``amp_copy`` (default) on a copy of the
    weights in that dtype, refreshed whenever the weights change (autocast would cast every
    weight again at every decode step, which decodes slower); else under autocast (no
    extra memory). Log-probs then come from half-precision compute, as with vLLM rollouts; the
    trainer recomputes the old log-probs with the policy itself.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        device: str | torch.device | None = None,
        batch_size: int | None = None,
        eos_token_ids: Sequence[int] | None = None,
        kv_reuse: bool = True,
        kv_keep_calls: int = 2,
        amp: torch.dtype | None = None,
        amp_copy: bool = True,
    ):
        from searchrl.models import eos_token_ids as default_eos_ids

        if batch_size is not None and batch_size < 1:
            raise SearchRLError(f"batch_size must be >= 1 (got {batch_size})")
        if kv_keep_calls < 1:
            raise SearchRLError(f"kv_keep_calls must be >= 1 (got {kv_keep_calls})")
        if device is not None:
            model.to(device)
        self.model = model
        self.tokenizer = tokenizer
        self.device = _model_device(model)
        self.batch_size = batch_size
        ids = default_eos_ids(tokenizer, model) if eos_token_ids is None else eos_token_ids
        self.eos_token_ids = frozenset(int(i) for i in ids)
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else min(self.eos_token_ids, default=0))
        self.vocab_size = int(model.get_input_embeddings().num_embeddings)
        self._logits_to_keep = accepts_logits_to_keep(model)
        self.kv_reuse = kv_reuse
        self.amp = amp  # half-precision compute dtype (None = the weights' own dtype)
        self.amp_copy = amp_copy
        self._copy: torch.nn.Module | None = None  # the weights in ``amp`` (see generation_model)
        self._copy_of: tuple | None = None  # the fingerprint of the weights it copies
        self._unspliceable = reuse_unsupported(model)  # why caches cannot be spliced, or None
        if kv_reuse and self._unspliceable is not None:
            log.warning("KV reuse off for %s: %s", type(model).__name__, self._unspliceable)
            self.kv_reuse = False
        self._store = KVStore(kv_keep_calls)
        self._fingerprint: tuple | None = None
        self.kv_stats = KVStats()  # counts prompt tokens over the generator's life

    def generation_model(self) -> torch.nn.Module:
        """The module the forward passes run: the model, or its copy in ``amp`` (made on first
        use, its weights copied again whenever the model's changed since)."""
        floats = [p for p in self.model.parameters() if p.is_floating_point()]
        if self.amp is None or not self.amp_copy or not floats or floats[0].dtype != torch.float32:
            return self.model
        fingerprint = weights_fingerprint(self.model)
        if self._copy is None:
            self._copy = copy.deepcopy(self.model).eval()
            for p in self._copy.parameters():  # buffers (rotary frequencies) keep their dtype
                if p.is_floating_point():
                    p.data = p.data.to(self.amp)
                p.requires_grad_(False)
                p.grad = None
        elif fingerprint != self._copy_of:
            with torch.no_grad():
                for mine, theirs in zip(self._copy.parameters(), self.model.parameters()):
                    mine.copy_(theirs)
        self._copy_of = fingerprint
        return self._copy


    @contextlib.contextmanager
    def running(self) -> Iterator[Runner]:
        """Inference mode, eval mode and the half-precision module (copy or autocast): the
        :class:`~searchrl.rollout.engine.decode.Runner` the forward passes of a call use."""
        module = self.generation_model()
        autocast = amp_context(self.amp if module is self.model else None, self.device)
        with torch.inference_mode(), _eval_mode(self.model), autocast:
            yield Runner(module, self.model.config, self.pad_token_id, self.device,
                         self._logits_to_keep, self.kv_stats)  # fmt: skip

    def finish_rules(self, stop: list[str] | None) -> FinishRules:
        """The rules that end a row of this generator (its EOS ids, these stop strings)."""
        return FinishRules(self.tokenizer, self.eos_token_ids, stop)

    def disable_reuse(self) -> None:
        """Stop keeping KV (a cache turned out not to hold one column per token)."""
        self.kv_reuse = False
        self.reset_cache()

    @property
    def can_stream(self) -> bool:
        """Whether :meth:`stream` works for this model (its cache layers can be spliced)."""
        return self._unspliceable is None

    @property
    def prefers_stream(self) -> bool:
        """Whether the multi-turn loop's ``auto`` schedule should stream: on GPUs, where a decode
        step costs about the same for any batch size, so steps spent waiting for a round's
        slowest row are lost. On CPU a step's cost grows with its rows and rounds measured
        slightly faster (README, rollout throughput)."""
        return self.device.type != "cpu" and self.can_stream

    def stream(self, sampling: SamplingParams, stop: list[str] | None = None) -> HFStream:
        """A continuous batch (:class:`~searchrl.rollout.engine.hf_stream.HFStream`) sampling with
        ``sampling``'s temperature and top-p (budgets and seeds are per row). Use it as a context
        manager."""
        if not self.can_stream:
            raise SearchRLError(f"streaming needs plain DynamicCache layers: {self._unspliceable}")
        self.check([], sampling)
        return HFStream(self, sampling, stop)

    def reset_cache(self) -> None:
        """Drop every kept KV row (call it whenever the weights may have changed)."""
        self._store.clear()
        self._fingerprint = None

    @property
    def cached_rows(self) -> int:
        """How many rows' KV are kept for the next call."""
        return len(self._store)

    def generate(
        self, prompts: list[list[int]], sampling: SamplingParams, stop: list[str] | None = None
    ) -> list[Completion]:
        """One completion per prompt, in order: per chunk of ``batch_size`` prompts (longest
        first), join all rows into one decode batch and step until every row has finished."""
        self.check(prompts, sampling)
        if not prompts:
            return []
        generator = None
        if not sampling.greedy:
            generator = torch.Generator(device=self.device)
            if sampling.seed is None:
                generator.seed()
            else:
                generator.manual_seed(int(sampling.seed))
        order = list(range(len(prompts)))
        size = self.batch_size or len(prompts)
        if size < len(prompts):  # chunks of similar lengths waste less on padding
            order.sort(key=lambda i: -len(prompts[i]))
        rows = [Row(list(p), sampling.max_new_tokens, index=i) for i, p in enumerate(prompts)]
        matches = self._matches(prompts)
        kept: list[KVEntry] = []
        rules = self.finish_rules(stop)
        with self.running() as runner:
            for start in range(0, len(order), size):
                chunk = order[start : start + size]
                if sampling.max_new_tokens == 0:
                    for i in chunk:
                        rows[i].finish_reason = "length"
                    continue
                decoder = Decoder(runner, rules, row_order_sampler(sampling, generator),
                                  self.kv_reuse, self.disable_reuse)  # fmt: skip
                decoder.join([rows[i] for i in chunk], [matches[i] for i in chunk])
                while decoder.rows:
                    kept += [entry for _, entry in decoder.step() if entry is not None]
        if self.kv_reuse:
            self._store.end_call(matches, kept)
        return [rules.completion(r) for r in rows]

    def _matches(self, prompts: list[list[int]]) -> list[Match | None]:
        """Kept rows each prompt starts from; drops them all first if the weights changed."""
        if not self.kv_reuse:
            return [None] * len(prompts)
        fingerprint = weights_fingerprint(self.model)
        if fingerprint != self._fingerprint:
            if self._store.entries:
                log.debug("weights changed: dropping %d kept KV rows", len(self._store))
            self._store.clear()
            self._fingerprint = fingerprint
        return self._store.match(prompts)

    def check(self, prompts: list[list[int]], sampling: SamplingParams) -> None:
        """Raise a clear error for a bad budget, top-p or prompt (empty, ids out of range)."""
        check_request(prompts, sampling, self.vocab_size)

