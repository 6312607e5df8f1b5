"""Generation with any Hugging Face causal LM: our own sampling loop over a KV cache.

:class:`HFGenerator` implements :class:`~searchrl.rollout.generator.Generator`:

* prompts are left-padded into one batch (or chunks of ``batch_size``, longest first) with an
  attention mask and position ids that count real tokens only, so a padded row computes what it
  would alone; the prompt is run once, then one token per step through a ``DynamicCache``;
* greedy (``temperature == 0``) takes the argmax; otherwise tokens are drawn from
  ``softmax(logits / temperature)``, restricted to the top-p nucleus when ``top_p < 1``, with a
  ``torch.Generator`` seeded from ``SamplingParams.seed`` (same seed, same inputs: same tokens);
* **log-probs** are ``log_softmax(logits / temperature)`` of the raw model at the sampled token
  (temperature 1 when greedy), *before* top-p truncation: at the RL setting (temperature 1, top-p 1)
  this is exactly the policy's log-probability, the quantity PPO/GRPO ratios need;
* a row ends on an EOS id (the tokenizer's EOS and chat end tokens such as ``<|im_end|>``, see
  :func:`searchrl.models.eos_token_ids`), on a stop string, or at ``max_new_tokens``. Stop strings
  are checked while sampling by decoding only the tail of the row; a stop string completed inside
  a token ends the row after that token. Tokens are returned exactly as sampled (EOS included);
  ``Completion.text`` is their decoding with special tokens skipped (as vLLM does);
* finished rows leave the batch at once (the KV cache rows are index-selected), so the work per
  step shrinks as rows finish.

**KV reuse** (``kv_reuse=True``, the default; see :mod:`searchrl.rollout.kv_cache`): after a
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
cache once the longest rows have finished, CUDA graphs (use the vLLM backend for speed), copy-free
sharing of a prefix between rows (a shared past is copied into each row of the batch cache).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from searchrl.errors import SearchRLError
from searchrl.models import amp_context
from searchrl.rollout.generator import Completion, SamplingParams
from searchrl.rollout.kv_cache import (
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
    weights_fingerprint,
)

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


def sample_next(
    logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row from ``logits`` (b, V); return ``(token_ids (b,), logprobs (b,))``.

    Log-probs are ``log_softmax(logits / T)`` at the chosen token (``T = 1`` when greedy), taken
    before top-p truncation (see the module docstring).
    """
    logits = logits.float()  # (b, V)
    if sampling.greedy:
        tokens = logits.argmax(dim=-1)  # (b,)
        logp = torch.log_softmax(logits, dim=-1)  # (b, V)
        return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)
    logp = torch.log_softmax(logits / sampling.temperature, dim=-1)  # (b, V)
    probs = logp.exp()  # (b, V)
    if sampling.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)  # (b, V), (b, V)
        before = sorted_p.cumsum(dim=-1) - sorted_p  # mass of strictly more likely tokens
        sorted_p = sorted_p.masked_fill(before >= sampling.top_p, 0.0)  # the first token stays
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (b,)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


class HFGenerator:
    """Generator over a transformers causal LM (see the module docstring for the exact semantics).

    ``device``: move the model there (default: where its parameters are). ``batch_size``: at most
    this many prompts per forward batch (default: all at once). ``eos_token_ids``: ids that end a
    row (default: :func:`searchrl.models.eos_token_ids`). The model is put in eval mode during
    ``generate`` and its previous mode restored afterwards, so a policy being trained can be shared.
    ``kv_reuse``: keep and reuse KV across calls and share prefixes within one (module docstring);
    ``kv_keep_calls``: a kept row not continued for this many calls is dropped.
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
        self.amp = amp  # autocast dtype for the forward passes (None = the weights' own dtype)
        if kv_reuse and (why := reuse_unsupported(model)) is not None:
            log.warning("KV reuse off for %s: %s", type(model).__name__, why)
            self.kv_reuse = False
        self._store = KVStore(kv_keep_calls)
        self._fingerprint: tuple | None = None
        self.kv_stats = KVStats()  # counts prompt tokens over the generator's life

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
        with torch.inference_mode(), _eval_mode(self.model), amp_context(self.amp, self.device):
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
        extra = {"logits_to_keep": 1} if self._logits_to_keep else {}
        out = self.model(
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
                if not self._append(rows[active[j]], t, lp, sampling, stops, window)
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
        self, row: _Row, token: int, logprob: float, sampling: SamplingParams, stops: list[str],
        window: int,
    ) -> bool:
        """Record one sampled token; return whether the row is finished."""
        row.token_ids.append(token)
        row.logprobs.append(logprob)
        if token in self.eos_token_ids:
            row.finish_reason = "eos"
        elif stops and (hit := self._stop_hit(row.token_ids, stops, window)) is not None:
            row.finish_reason, row.stop_string = "stop", hit
        elif len(row.token_ids) >= sampling.max_new_tokens:
            row.finish_reason = "length"
        return bool(row.finish_reason)

    def _stop_hit(self, token_ids: list[int], stops: list[str], window: int) -> str | None:
        """The stop string that the tail of ``token_ids`` now contains (earliest first), if any."""
        tail = self.tokenizer.decode(
            token_ids[-window:], skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        found = [(pos, s) for s in stops if (pos := tail.find(s)) >= 0]
        return min(found)[1] if found else None
