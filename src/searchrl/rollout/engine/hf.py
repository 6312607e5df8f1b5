"""Generation with any Hugging Face causal LM: our own sampling loop over a KV cache.

:class:`HFGenerator` implements :class:`~searchrl.rollout.engine.protocol.Generator`:

* prompts are left-padded into one batch (or chunks of ``batch_size``, longest first) with an
  attention mask and position ids that count real tokens only, so a padded row computes what it
  would alone; the prompt is run once, then one token per step through a ``DynamicCache``;
* greedy (``temperature == 0``) takes the argmax; otherwise tokens are drawn from
  ``softmax(logits / temperature)``, restricted to the top-p nucleus when ``top_p < 1``, with a
  ``torch.Generator`` seeded from ``SamplingParams.seed`` (same seed, same inputs: same tokens;
  :func:`sample_next`);
* **log-probs** are ``log_softmax(logits / temperature)`` of the raw model at the sampled token
  (temperature 1 when greedy), *before* top-p truncation: at the RL setting (temperature 1, top-p 1)
  this is exactly the policy's log-probability, the quantity PPO/GRPO ratios need;
* a row ends on an EOS id (the tokenizer's EOS and chat end tokens such as ``<|im_end|>``, see
  :func:`searchrl.models.eos_token_ids`), on a stop string, or at ``max_new_tokens``. Stop strings
  are checked while sampling by decoding only the tail of the row; a stop string completed inside
  a token ends the row after that token. Tokens are returned exactly as sampled (EOS included);
  ``Completion.text`` is their decoding with special tokens skipped (as vLLM does);
* finished rows leave the batch at once (the KV cache rows are index-selected), so the work per
  step shrinks as rows finish;
* with ``amp`` (bf16 over fp32 weights) the forward passes run on a bf16 copy of the weights,
  refreshed when the weights change (:meth:`HFGenerator.generation_model`; same detection as the
  staleness rule below).

**Continuous batching** (:meth:`HFGenerator.stream`, :class:`HFStream`): rows are added under a
key and join the running decode batch between steps; each step returns the rows that finished,
so the multi-turn loop can put a trajectory's next turn back as soon as its observation is ready.

**KV reuse** (``kv_reuse=True``, the default; see :mod:`searchrl.rollout.engine.kv_cache`): after a
call, each returned row's KV (prompt + sampled tokens) is kept; a later prompt that starts with a
kept row (the multi-turn loop's next turn: the same context plus an inserted observation) only runs
its new suffix, and any prompt reuses the longest prefix it shares with a kept row (the
instruction template). Within a call, rows sharing a prefix of at least ``_MIN_SHARED`` tokens
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

Left out: beam search, repetition penalties, speculative decoding, trimming pad columns of the
cache once the longest rows have finished (the stream trims them), CUDA graphs (use the vLLM
backend for speed), copy-free sharing of a prefix between rows (a shared past is copied into each
row of the batch cache), a preallocated or paged cache (each decode step concatenates, each join
and each departure copies the batch cache: on CPU these copies make continuous batching no faster
than rounds).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from searchrl.errors import SearchRLError
from searchrl.models import amp_context
from searchrl.rollout.engine.kv_cache import (
    KVEntry,
    KVStats,
    KVStore,
    Match,
    batch_layout,
    length_buckets,
    merge_caches,
    past_cache,
    reuse_unsupported,
    row_kv,
    shared_groups,
    trim_left,
    weights_fingerprint,
)
from searchrl.rollout.engine.protocol import Completion, SamplingParams
from searchrl.rollout.engine.sampling import SEED_MASK, sample_next, sample_rows

log = logging.getLogger(__name__)

_STOP_WINDOW_EXTRA = 16  # tokens decoded for stop checks beyond the longest stop string's length
_MIN_SHARED = 16  # a prefix shared by rows of one call is run once when at least this long
_SHARE_STAGES = 3  # nested shared prefixes (template, then a group's prompt, ...) per call
_BUCKET_OVERHEAD = 64  # a forward's fixed cost, in padded tokens, when splitting a prefill


@dataclass
class _Row:
    """Output state of one prompt while it is being generated."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = ""
    stop_string: str | None = None


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _accepts_logits_to_keep(model: Any) -> bool:
    """Whether ``model.forward`` (or the base model's under PEFT) accepts ``logits_to_keep``."""
    for m in (model, getattr(model, "get_base_model", lambda: None)()):
        if m is not None and "logits_to_keep" in inspect.signature(m.forward).parameters:
            return True
    return False


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


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
    weight again at every decode step: 1.8x slower decoding on CPU); else under autocast (no
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
        self._logits_to_keep = _accepts_logits_to_keep(model)
        self.kv_reuse = kv_reuse
        self.amp = amp  # half-precision compute dtype (None = the weights' own dtype)
        self.amp_copy = amp_copy
        self._copy: torch.nn.Module | None = None  # the weights in ``amp`` (see generation_model)
        self._copy_of: tuple | None = None  # the fingerprint of the weights it copies
        self._runner: torch.nn.Module = model  # what _forward runs during a call
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
    def _running(self) -> Iterator[None]:
        """Inference mode, eval mode, and the half-precision runner (copy or autocast)."""
        runner = self.generation_model()
        autocast = amp_context(self.amp if runner is self.model else None, self.device)
        with torch.inference_mode(), _eval_mode(self.model), autocast:
            self._runner = runner
            try:
                yield
            finally:
                self._runner = self.model

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
        """A continuous batch (:class:`HFStream`) sampling with ``sampling``'s temperature and
        top-p (its ``max_new_tokens`` and ``seed`` are per request). Use it as a context manager."""
        if not self.can_stream:
            raise SearchRLError(f"streaming needs plain DynamicCache layers: {self._unspliceable}")
        self._check([], sampling)
        return HFStream(self, sampling, stop)

    def reset_cache(self) -> None:
        """Drop every kept KV row (call it whenever the weights may have changed)."""
        self._store.clear()
        self._fingerprint = None

    @property
    def cached_rows(self) -> int:
        """How many rows' KV are kept for the next call."""
        return len(self._store)

    # ------------------------------------------------------------------------------------------

    def generate(
        self,
        prompts: list[list[int]],
        sampling: SamplingParams,
        stop: list[str] | None = None,
    ) -> list[Completion]:
        """One completion per prompt, in order."""
        self._check(prompts, sampling)
        stops = [s for s in (stop or []) if s]
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
        rows: list[_Row | None] = [None] * len(prompts)
        matches = self._matches(prompts)
        kept: list[KVEntry] = []
        with self._running():
            for start in range(0, len(order), size):
                chunk = order[start : start + size]
                done = self._generate_batch(
                    [prompts[i] for i in chunk], [matches[i] for i in chunk], sampling, stops,
                    generator, kept,
                )
                for i, row in zip(chunk, done):
                    rows[i] = row
        if self.kv_reuse:
            self._store.end_call(matches, kept)
        return [self._completion(r) for r in rows if r is not None]

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

    def _check(self, prompts: list[list[int]], sampling: SamplingParams) -> None:
        if sampling.max_new_tokens < 0:
            raise SearchRLError(f"max_new_tokens must be >= 0 (got {sampling.max_new_tokens})")
        if not sampling.greedy and not 0.0 < sampling.top_p <= 1.0:
            raise SearchRLError(f"top_p must be in (0, 1] (got {sampling.top_p})")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise SearchRLError(f"prompt {i} is empty: generation needs at least one token")
            lo, hi = min(p), max(p)
            if lo < 0 or hi >= self.vocab_size:
                raise SearchRLError(
                    f"prompt {i} has token id {hi if hi >= self.vocab_size else lo} outside the "
                    f"model's vocabulary [0, {self.vocab_size})"
                )

    def _completion(self, row: _Row) -> Completion:
        text = self.tokenizer.decode(
            row.token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        return Completion(row.token_ids, row.logprobs, row.finish_reason, row.stop_string, text)

    # ------------------------------------------------------------------------------------------

    def _forward(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        """Run the model on new tokens; return the last position's logits (b, V)."""
        # an index tensor, not ``1``: the model gathers the last hidden state into a contiguous
        # (b, 1, d) tensor instead of slicing a strided view, which half-precision CPU matmuls
        # would run as a batched product with the LM head's weight copied per row (~2 s a prefill)
        last = torch.tensor([input_ids.shape[1] - 1], device=input_ids.device)
        extra = {"logits_to_keep": last} if self._logits_to_keep else {}
        out = self._runner(
            input_ids=input_ids,  # (b, t)
            attention_mask=attention_mask,  # (b, past + t)
            position_ids=position_ids,  # (b, t)
            past_key_values=cache,
            use_cache=True,
            **extra,
        )
        return out.logits[:, -1, :]  # (b, V)

    def _run_new(
        self, pasts: list[torch.Tensor | None], starts: list[int], new: list[list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
        """Run ``new[i]`` after row ``i``'s past (``starts[i]`` tokens); return the last logits
        (b, V), the attention mask (b, P + S), the position ids (b, S) and the filled cache."""
        ids, attention, positions = (
            t.to(self.device) for t in batch_layout(starts, new, self.pad_token_id)
        )  # (b, S), (b, P + S), (b, S)
        cache = past_cache(self.model.config, pasts)
        self.kv_stats.prefilled_tokens += sum(len(n) for n in new)
        return self._forward(ids, attention, positions, cache), attention, positions, cache

    def _prefill(
        self, pasts: list[torch.Tensor | None], starts: list[int], new: list[list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any, list[int]]:
        """Run every row's new tokens: last logits (b, V), attention mask (b, W), next position
        (b, 1), cache, and the row index at each batch position. With reuse, rows whose new
        parts differ much in length (an observation after one row, short feedback after another)
        run as separate batches (less padding), then are merged into one cache in group order."""
        buckets = [list(range(len(new)))]
        if self.kv_reuse and len(new) > 1:
            buckets = length_buckets([len(n) for n in new], _BUCKET_OVERHEAD)
        parts, outs = [], []
        for rows in buckets:
            logits, attention, positions, cache = self._run_new(
                [pasts[i] for i in rows], [starts[i] for i in rows], [new[i] for i in rows]
            )  # (b_g, V), (b_g, W_g), (b_g, S_g), cache
            parts.append((cache, attention))
            outs.append((logits, positions[:, -1:] + 1))
        active = [i for rows in buckets for i in rows]
        if len(parts) == 1:
            return outs[0][0], attention, outs[0][1], cache, active
        logits = torch.cat([lg for lg, _ in outs])  # (b, V)
        next_pos = torch.cat([pos for _, pos in outs])  # (b, 1)
        cache, attention = merge_caches(self.model.config, parts)  # cache, (b, W)
        return logits, attention, next_pos, cache, active

    def _sample(
        self, logits: torch.Tensor, active: list[int], sampling: SamplingParams,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`sample_next` with rows drawn in row order whatever their batch positions, so
        a seed gives each row the same draws as an unsplit batch would."""
        if all(a < b for a, b in zip(active, active[1:])):
            return sample_next(logits, sampling, generator)
        by_row = sorted(range(len(active)), key=active.__getitem__)  # batch positions, row order
        perm = torch.tensor(by_row, device=logits.device)
        tokens, logps = sample_next(logits[perm], sampling, generator)  # (b,), (b,) in row order
        return tokens.new_empty(tokens.shape).index_copy_(0, perm, tokens), \
            logps.new_empty(logps.shape).index_copy_(0, perm, logps)  # (b,), (b,) batch order

    def _pasts(
        self, prompts: list[list[int]], matches: list[Match | None]
    ) -> tuple[list[torch.Tensor | None], list[int]]:
        """Each row's past KV (layers, 2, H, n, D) and its length: the kept row it matched, then
        prefixes shared within the batch, each run once for its group."""
        pasts = [m.entry.kv[..., : m.length, :] if m else None for m in matches]
        starts = [m.length if m else 0 for m in matches]
        self.kv_stats.reused_tokens += sum(starts)
        if not self.kv_reuse:
            return pasts, starts
        bases = [id(m.entry) if m else 0 for m in matches]
        for _ in range(_SHARE_STAGES):
            groups = shared_groups(prompts, starts, bases, _MIN_SHARED)
            if not groups:
                break
            heads = [rows[0] for rows, _ in groups]
            _, attention, _, cache = self._run_new(
                [pasts[h] for h in heads], [starts[h] for h in heads],
                [prompts[h][starts[h] : end] for h, (_, end) in zip(heads, groups)],
            )
            for k, (rows, end) in enumerate(groups):
                kv = row_kv(cache, attention[k], k)  # (layers, 2, H, end, D)
                self.kv_stats.shared_tokens += (len(rows) - 1) * (end - starts[rows[0]])
                for i in rows:
                    pasts[i], starts[i], bases[i] = kv, end, id(kv)
        return pasts, starts

    def _keep(self, cache: Any, attention: torch.Tensor, j: int, prompt: list[int], row: _Row):
        """Row ``j``'s KV as a kept row: the prompt and every sampled token but the last."""
        tokens = prompt + row.token_ids[:-1]
        kv = row_kv(cache, attention[j], j)  # (layers, 2, H, n, D)
        if kv.shape[-2] != len(tokens):  # a cache that does not hold one column per token
            log.warning("KV reuse off: a row's cache has %d columns for %d tokens",
                        kv.shape[-2], len(tokens))  # fmt: skip
            self.kv_reuse = False
            self.reset_cache()
            return None
        return KVEntry(tokens, kv)

    def _generate_batch(
        self,
        prompts: list[list[int]],
        matches: list[Match | None],
        sampling: SamplingParams,
        stops: list[str],
        generator: torch.Generator | None,
        kept: list[KVEntry],
    ) -> list[_Row]:
        """Generate for one batch; append the rows' KV to ``kept`` when reusing."""
        rows = [_Row() for _ in prompts]
        if sampling.max_new_tokens == 0:
            for r in rows:
                r.finish_reason = "length"
            return rows
        pasts, starts = self._pasts(prompts, matches)
        new = [p[s:] for p, s in zip(prompts, starts)]
        logits, attention, next_pos, cache, active = self._prefill(pasts, starts, new)  # active:
        # batch position -> row index
        window = max((len(s) for s in stops), default=0) + _STOP_WINDOW_EXTRA
        while True:
            tokens, logps = self._sample(logits, active, sampling, generator)  # (b',), (b',)
            keep = [
                j
                for j, (t, lp) in enumerate(zip(tokens.tolist(), logps.tolist()))
                if not self._append(rows[active[j]], t, lp, sampling.max_new_tokens, stops, window)
            ]
            if self.kv_reuse and len(keep) < len(active):
                for j in sorted(set(range(len(active))) - set(keep)):
                    i = active[j]
                    if (entry := self._keep(cache, attention, j, prompts[i], rows[i])) is not None:
                        kept.append(entry)
            if not keep:
                return rows
            if len(keep) < len(active):  # drop finished rows from the batch and the cache
                idx = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(idx)
                attention, tokens, next_pos = attention[idx], tokens[idx], next_pos[idx]
                active = [active[j] for j in keep]
            attention = torch.cat([attention, attention.new_ones((len(active), 1))], dim=-1)
            logits = self._forward(tokens[:, None], attention, next_pos, cache)  # (b', V)
            next_pos = next_pos + 1

    def _append(
        self, row: _Row, token: int, logprob: float, max_new_tokens: int, stops: list[str],
        window: int,
    ) -> bool:
        """Record one sampled token; return whether the row is finished."""
        row.token_ids.append(token)
        row.logprobs.append(logprob)
        if token in self.eos_token_ids:
            row.finish_reason = "eos"
        elif stops and (hit := self._stop_hit(row.token_ids, stops, window)) is not None:
            row.finish_reason, row.stop_string = "stop", hit
        elif len(row.token_ids) >= max_new_tokens:
            row.finish_reason = "length"
        return bool(row.finish_reason)

    def _stop_hit(self, token_ids: list[int], stops: list[str], window: int) -> str | None:
        """The stop string that the tail of ``token_ids`` now contains (earliest first), if any."""
        tail = self.tokenizer.decode(
            token_ids[-window:], skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        found = [(pos, s) for s in stops if (pos := tail.find(s)) >= 0]
        return min(found)[1] if found else None


@dataclass
class _Request:
    """A row of an :class:`HFStream`: what it continues, its budget, its sampling seed."""

    key: Hashable
    prompt: list[int]
    max_new_tokens: int
    seed: int
    row: _Row = field(default_factory=_Row)


class HFStream:
    """Continuous batching over an :class:`HFGenerator`: rows join and leave the running batch
    between decode steps, so nobody waits for the slowest row of a batch.

    ``add(key, prompt, max_new_tokens, seed)`` queues a row; ``step()`` prefills the queued rows
    (in one batch, shared prefixes run once, as :meth:`HFGenerator.generate` does), merges them
    into the running batch, samples one token for every running row, takes out the rows that
    finished (EOS, a stop string, their budget) and runs one decode forward for the others; it
    returns ``[(key, Completion), ...]`` for the rows that finished. A row's finish rules, tokens
    and log-probs are those of :meth:`HFGenerator.generate`.

    *Joining*: queued rows join together, when a quarter of the running batch is waiting
    (``join_fraction``), when the first of them has waited ``join_wait`` steps, or when nothing
    runs: every join prefills one batch and copies the running cache once, so joining rows one by
    one would cost more than the few steps they wait.

    *KV reuse*: with ``kv_reuse``, a finished row's KV is parked under its key; a joining row
    starts from the parked row sharing its longest prefix (at least ``_MIN_SHARED`` tokens): its
    own previous turn when it continues one (the multi-turn loop's next turn: context plus an
    observation, so only the observation is prefilled), else another row's (the instruction
    template of a new question). :meth:`release` drops a parked row (a finished trajectory) after
    the next join, which may still borrow its prefix; closing the stream drops them all.

    *Randomness*: a row's token is drawn with noise seeded from the row's ``seed`` and the token's
    index (:func:`sample_rows`), so a row's tokens do not depend on which rows share its steps (up
    to float rounding of batched kernels): the same seeds give the same tokens at any batch size.
    ``seed=None`` draws a seed from torch's global generator.

    The model is in eval mode, under ``torch.inference_mode`` and the generator's half precision
    (see :class:`HFGenerator`'s ``amp``) while the stream is open (``with generator.stream(...) as
    s:``); the weights must not change then. Leading cache columns that no running row needs any
    more are trimmed when rows leave.
    """

    def __init__(
        self, gen: HFGenerator, sampling: SamplingParams, stop: list[str] | None,
        join_fraction: float = 0.25, join_wait: int = 4,
    ):  # fmt: skip
        self.gen, self.sampling = gen, sampling
        self.join_fraction, self.join_wait = join_fraction, join_wait
        self._waited = 0  # steps the first queued row has waited
        self.stops = [s for s in (stop or []) if s]
        self.window = max((len(s) for s in self.stops), default=0) + _STOP_WINDOW_EXTRA
        self.steps = 0  # decode forwards run
        self.calls = 0  # step() calls
        self._queued: list[_Request] = []
        self._running: list[_Request] = []
        self._ended: list[_Request] = []  # finished without a step (a zero budget)
        self._keys: set[Hashable] = set()
        self._parked: dict[Hashable, KVEntry] = {}
        self._released: set[Hashable] = set()  # parked rows dropped after the next join
        self._cache: Any = None
        self._attention = self._next_pos = self._logits = None  # (b, W), (b, 1), (b, V)
        self._contexts: contextlib.ExitStack | None = None
        self._fingerprint: tuple | None = None

    def __enter__(self) -> HFStream:
        self._contexts = contextlib.ExitStack()
        self._contexts.enter_context(self.gen._running())
        self._fingerprint = weights_fingerprint(self.gen.model)
        return self

    def __exit__(self, *exc: Any) -> None:
        contexts, self._contexts = self._contexts, None
        self._queued, self._running, self._ended, self._keys = [], [], [], set()
        self._parked.clear()
        self._released.clear()
        self._cache = self._attention = self._next_pos = self._logits = None
        if contexts is not None:
            contexts.close()

    @property
    def busy(self) -> bool:
        """Whether a row is queued or running (``step`` has work)."""
        return bool(self._queued or self._running or self._ended)

    @property
    def running(self) -> int:
        """Rows in the decode batch."""
        return len(self._running)

    def add(self, key: Hashable, prompt: list[int], max_new_tokens: int, seed: int | None = None) -> None:
        """Queue one row; it joins the batch at the next :meth:`step`."""
        if key in self._keys:
            raise SearchRLError(f"stream: key {key!r} is already queued or running")
        sampling = SamplingParams(max_new_tokens, self.sampling.temperature, self.sampling.top_p)
        self.gen._check([prompt], sampling)
        if seed is None:  # from torch's global generator: torch.manual_seed makes it repeatable
            seed = int(torch.randint(0, 2**62, (), dtype=torch.long))
        req = _Request(key, list(prompt), int(max_new_tokens), int(seed) & SEED_MASK)
        self._keys.add(key)
        if req.max_new_tokens == 0:
            req.row.finish_reason = "length"
            self._ended.append(req)
        else:
            self._queued.append(req)

    def release(self, key: Hashable) -> None:
        """Forget the parked KV of ``key`` (its trajectory is over) after the next join."""
        if key in self._parked:
            self._released.add(key)

    def step(self) -> list[tuple[Hashable, Completion]]:
        """Join the queued rows, sample one token per running row, decode once; the finished."""
        if self._contexts is None:
            raise SearchRLError("stream: use it as a context manager (with generator.stream(...) as s)")
        self.calls += 1
        gen = self.gen
        out = [self._finish(r) for r in self._ended]
        self._ended = []
        if self._queued:
            due = len(self._queued) >= self.join_fraction * len(self._running)
            if not self._running or due or self._waited >= self.join_wait:
                self._join()
                self._waited = 0
            else:
                self._waited += 1
        if not self._running:
            return out
        running = self._running
        tokens, logps = sample_rows(self._logits, self.sampling, [r.seed for r in running],
                                    [len(r.row.token_ids) for r in running])  # (b,), (b,)
        keep = []
        for j, (t, lp) in enumerate(zip(tokens.tolist(), logps.tolist())):
            r = self._running[j]
            if not gen._append(r.row, t, lp, r.max_new_tokens, self.stops, self.window):
                keep.append(j)
                continue
            if gen.kv_reuse and (entry := gen._keep(self._cache, self._attention, j, r.prompt, r.row)):
                self._parked[r.key] = entry
                self._released.discard(r.key)
            out.append(self._finish(r))
        if not keep:
            self._running, self._cache = [], None
            self._attention = self._next_pos = self._logits = None
            return out
        if len(keep) < len(self._running):  # finished rows leave the batch and the cache
            idx = torch.tensor(keep, device=gen.device)
            self._cache.batch_select_indices(idx)
            self._attention = trim_left(self._cache, self._attention[idx])
            self._next_pos, tokens = self._next_pos[idx], tokens[idx]
            self._running = [self._running[j] for j in keep]
        self._attention = torch.cat([self._attention, self._attention.new_ones((len(keep), 1))], dim=-1)
        self._logits = gen._forward(tokens[:, None], self._attention, self._next_pos, self._cache)  # (b, V)
        self._next_pos = self._next_pos + 1
        self.steps += 1
        return out

    def _finish(self, r: _Request) -> tuple[Hashable, Completion]:
        self._keys.discard(r.key)
        return r.key, self.gen._completion(r.row)

    def _join(self) -> None:
        """Prefill the queued rows (from their parked KV when they continue it) into the batch."""
        gen = self.gen
        if weights_fingerprint(gen.model) != self._fingerprint:
            raise SearchRLError("stream: the model's weights changed while the stream was open")
        reqs, self._queued = self._queued, []
        prompts = [r.prompt for r in reqs]
        matches: list[Match | None] = [None] * len(reqs)
        if gen.kv_reuse and self._parked:
            for i, r in enumerate(reqs):  # its own previous turn, however short
                own = self._parked.get(r.key)
                n = len(own.tokens) if own is not None else 0
                if own is not None and n < len(r.prompt) and r.prompt[:n] == own.tokens:
                    matches[i] = Match(own, n)
            fresh = [i for i, m in enumerate(matches) if m is None]  # else: another row's prefix
            if fresh:
                donors = KVStore()
                donors.entries = list(self._parked.values())
                for i, m in zip(fresh, donors.match([prompts[i] for i in fresh], min_length=_MIN_SHARED)):
                    matches[i] = m
        for key in [r.key for r in reqs] + list(self._released):  # superseded or over
            self._parked.pop(key, None)
        self._released.clear()
        pasts, starts = gen._pasts(prompts, matches)
        new = [p[s:] for p, s in zip(prompts, starts)]
        logits, attention, next_pos, cache, order = gen._prefill(pasts, starts, new)
        joined = [reqs[i] for i in order]
        if self._running:
            parts = [(self._cache, self._attention), (cache, attention)]
            cache, attention = merge_caches(gen.model.config, parts)
            logits = torch.cat([self._logits, logits])  # (b, V)
            next_pos = torch.cat([self._next_pos, next_pos])  # (b, 1)
            joined = self._running + joined
        self._running, self._cache, self._attention = joined, cache, attention
        self._logits, self._next_pos = logits, next_pos
