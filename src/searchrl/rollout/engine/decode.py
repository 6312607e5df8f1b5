"""The HF engine's decode state and its one decode cycle, shared by ``generate`` and the stream.

* :class:`Runner`: what the forward passes run on (the module, its config, the pad id, whether
  it takes ``logits_to_keep``) and the prefill of new tokens after per-row pasts.
* :class:`DecodeBatch`: the running rows' cache, attention mask (b, W), next positions (b, 1)
  and last logits (b, V), with the four operations on them: :meth:`~DecodeBatch.prefill` (new
  rows, from their pasts, split into batches of similar lengths when that pads less),
  :meth:`~DecodeBatch.merge` (rows joining), :meth:`~DecodeBatch.select` (rows leaving; the
  leading columns nobody attends to any more are trimmed) and :meth:`~DecodeBatch.decode` (one
  token per row).
* :class:`FinishRules`: when a row ends (EOS id, stop string in its decoded tail, its budget).
* :class:`Decoder`: the cycle over a :class:`DecodeBatch`: :meth:`~Decoder.join` prefills rows
  into it; :meth:`~Decoder.step` samples one token per row, takes the finished rows out (with
  their KV, when kept) and runs one decode forward for the others.

:meth:`HFGenerator.generate <searchrl.rollout.engine.hf.HFGenerator.generate>` is "join all rows,
step until done"; :class:`~searchrl.rollout.engine.hf_stream.HFStream` joins rows between steps.

Left out: scheduling (when rows join: the stream's policy), which KV a row starts from (the
caller's :class:`~searchrl.rollout.engine.kv_cache.Match` per row) and where kept KV goes.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from searchrl.rollout.engine.kv_cache import (
    KVEntry,
    KVStats,
    Match,
    batch_layout,
    length_buckets,
    merge_caches,
    past_cache,
    row_kv,
    shared_groups,
    trim_left,
)
from searchrl.rollout.engine.protocol import Completion

log = logging.getLogger(__name__)

STOP_WINDOW_EXTRA = 16  # tokens decoded for stop checks beyond the longest stop string's length
MIN_SHARED = 16  # a prefix shared by rows of one call is run once when at least this long
_SHARE_STAGES = 3  # nested shared prefixes (template, then a group's prompt, ...) per call
_BUCKET_OVERHEAD = 64  # a forward's fixed cost, in padded tokens, when splitting a prefill


@dataclass
class Row:
    """One prompt being generated: its request, then its output as it grows.

    ``index``: its place in its ``generate`` call (random draws go in that order); ``seed``: its
    own random stream (the stream's per-row sampling).
    """

    prompt: list[int]
    max_new_tokens: int
    key: Hashable = None
    index: int = 0
    seed: int = 0
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = ""
    stop_string: str | None = None


Sampler = Callable[[torch.Tensor, Sequence[Row]], tuple[torch.Tensor, torch.Tensor]]


def accepts_logits_to_keep(model: Any) -> bool:
    """Whether ``model.forward`` (or the base model's under PEFT) accepts ``logits_to_keep``."""
    for m in (model, getattr(model, "get_base_model", lambda: None)()):
        if m is not None and "logits_to_keep" in inspect.signature(m.forward).parameters:
            return True
    return False


@dataclass
class Runner:
    """The module the forward passes run (the model or its half-precision copy) and its setup."""

    module: torch.nn.Module
    config: Any
    pad_token_id: int
    device: torch.device
    logits_to_keep: bool
    stats: KVStats

    def forward(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        """Run the module on new tokens; return the last position's logits (b, V)."""
        # an index tensor, not ``1``: the model gathers the last hidden state into a contiguous
        # (b, 1, d) tensor instead of slicing a strided view, which half-precision CPU matmuls
        # would run as a batched product with the LM head's weight copied per row
        last = torch.tensor([input_ids.shape[1] - 1], device=input_ids.device)
        extra = {"logits_to_keep": last} if self.logits_to_keep else {}
        out = self.module(
            input_ids=input_ids,  # (b, t)
            attention_mask=attention_mask,  # (b, past + t)
            position_ids=position_ids,  # (b, t)
            past_key_values=cache,
            use_cache=True,
            **extra,
        )
        return out.logits[:, -1, :]  # (b, V)

    def run_new(
        self, pasts: list[torch.Tensor | None], starts: list[int], new: list[list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
        """Run ``new[i]`` after row ``i``'s past (``starts[i]`` tokens); return the last logits
        (b, V), the attention mask (b, P + S), the position ids (b, S) and the filled cache."""
        ids, attention, positions = (
            t.to(self.device) for t in batch_layout(starts, new, self.pad_token_id)
        )  # (b, S), (b, P + S), (b, S)
        cache = past_cache(self.config, pasts)
        self.stats.prefilled_tokens += sum(len(n) for n in new)
        return self.forward(ids, attention, positions, cache), attention, positions, cache

    def pasts(
        self, prompts: list[list[int]], matches: Sequence[Match | None], share: bool
    ) -> tuple[list[torch.Tensor | None], list[int]]:
        """Each row's past KV (layers, 2, H, n, D) and its length: the kept row it matched, then
        (with ``share``) prefixes shared within the batch, each run once for its group."""
        pasts = [m.entry.kv[..., : m.length, :] if m else None for m in matches]
        starts = [m.length if m else 0 for m in matches]
        self.stats.reused_tokens += sum(starts)
        if not share:
            return pasts, starts
        bases = [id(m.entry) if m else 0 for m in matches]
        for _ in range(_SHARE_STAGES):
            groups = shared_groups(prompts, starts, bases, MIN_SHARED)
            if not groups:
                break
            heads = [rows[0] for rows, _ in groups]
            _, attention, _, cache = self.run_new(
                [pasts[h] for h in heads], [starts[h] for h in heads],
                [prompts[h][starts[h] : end] for h, (_, end) in zip(heads, groups)],
            )  # fmt: skip
            for k, (rows, end) in enumerate(groups):
                kv = row_kv(cache, attention[k], k)  # (layers, 2, H, end, D)
                self.stats.shared_tokens += (len(rows) - 1) * (end - starts[rows[0]])
                for i in rows:
                    pasts[i], starts[i], bases[i] = kv, end, id(kv)
        return pasts, starts


@dataclass
class DecodeBatch:
    """The decode state of the running rows (see the module docstring)."""

    cache: Any
    attention: torch.Tensor  # (b, W)
    next_pos: torch.Tensor  # (b, 1)
    logits: torch.Tensor  # (b, V)

    @classmethod
    def prefill(
        cls, runner: Runner, pasts: list[torch.Tensor | None], starts: list[int],
        new: list[list[int]], split: bool,
    ) -> tuple[DecodeBatch, list[int]]:  # fmt: skip
        """Run every row's new tokens after its past; return the batch and the row index at each
        batch position. With ``split``, rows whose new parts differ much in length (an
        observation after one row, short feedback after another) run as separate batches (less
        padding), merged into one cache in group order."""
        buckets = [list(range(len(new)))]
        if split and len(new) > 1:
            buckets = length_buckets([len(n) for n in new], _BUCKET_OVERHEAD)
        parts = []
        for rows in buckets:
            logits, attention, positions, cache = runner.run_new(
                [pasts[i] for i in rows], [starts[i] for i in rows], [new[i] for i in rows]
            )  # (b_g, V), (b_g, W_g), (b_g, S_g), cache
            parts.append(cls(cache, attention, positions[:, -1:] + 1, logits))
        batch = parts[0]
        if len(parts) > 1:
            batch = parts[0].merge(parts[1:], runner.config)
        return batch, [i for rows in buckets for i in rows]

    def merge(self, others: list[DecodeBatch], config: Any) -> DecodeBatch:
        """One batch of this batch's rows, then the others' rows, in order."""
        parts = [self, *others]
        cache, attention = merge_caches(config, [(p.cache, p.attention) for p in parts])
        logits = torch.cat([p.logits for p in parts])  # (b, V)
        next_pos = torch.cat([p.next_pos for p in parts])  # (b, 1)
        return DecodeBatch(cache, attention, next_pos, logits)

    def select(self, keep: list[int]) -> None:
        """Keep only the rows at batch positions ``keep`` (their order); trim unused columns."""
        idx = torch.tensor(keep, device=self.attention.device)
        self.cache.batch_select_indices(idx)
        self.attention = trim_left(self.cache, self.attention[idx])
        self.next_pos, self.logits = self.next_pos[idx], self.logits[idx]

    def decode(self, runner: Runner, tokens: torch.Tensor) -> None:
        """Run one token per row (``tokens`` (b,)); the logits become the next step's."""
        ones = self.attention.new_ones((len(tokens), 1))
        self.attention = torch.cat([self.attention, ones], dim=-1)  # (b, W + 1)
        self.logits = runner.forward(tokens[:, None], self.attention, self.next_pos, self.cache)
        self.next_pos = self.next_pos + 1

    def kept_row(self, j: int, row: Row) -> KVEntry | None:
        """Row ``j``'s KV as a kept row (its prompt and every sampled token but the last), or
        ``None`` when the cache does not hold one column per token."""
        tokens = row.prompt + row.token_ids[:-1]
        kv = row_kv(self.cache, self.attention[j], j)  # (layers, 2, H, n, D)
        if kv.shape[-2] != len(tokens):
            log.warning("KV reuse off: a row's cache has %d columns for %d tokens",
                        kv.shape[-2], len(tokens))  # fmt: skip
            return None
        return KVEntry(tokens, kv)


class FinishRules:
    """When a row ends: an EOS id, a stop string in its decoded tail, or its budget."""

    def __init__(self, tokenizer: Any, eos_token_ids: frozenset[int], stop: list[str] | None):
        self.tokenizer, self.eos_token_ids = tokenizer, eos_token_ids
        self.stops = [s for s in (stop or []) if s]
        self.window = max((len(s) for s in self.stops), default=0) + STOP_WINDOW_EXTRA

    def append(self, row: Row, token: int, logprob: float) -> bool:
        """Record one sampled token; return whether the row is finished."""
        row.token_ids.append(token)
        row.logprobs.append(logprob)
        if token in self.eos_token_ids:
            row.finish_reason = "eos"
        elif self.stops and (hit := self._stop_hit(row.token_ids)) is not None:
            row.finish_reason, row.stop_string = "stop", hit
        elif len(row.token_ids) >= row.max_new_tokens:
            row.finish_reason = "length"
        return bool(row.finish_reason)

    def _stop_hit(self, token_ids: list[int]) -> str | None:
        """The stop string that the tail of ``token_ids`` now contains (earliest first), if any."""
        tail = self.tokenizer.decode(
            token_ids[-self.window :], skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        found = [(pos, s) for s in self.stops if (pos := tail.find(s)) >= 0]
        return min(found)[1] if found else None

    def completion(self, row: Row) -> Completion:
        text = self.tokenizer.decode(
            row.token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        return Completion(row.token_ids, row.logprobs, row.finish_reason, row.stop_string, text)


class Decoder:
    """The decode cycle over one :class:`DecodeBatch` (see the module docstring).

    ``keep_kv``: hand back each finished row's KV; it turns itself off (and calls ``on_bad_kv``)
    when a cache does not hold one column per token. ``share``: run prefixes shared by joining
    rows once, and split prefills by length.
    """

    def __init__(
        self, runner: Runner, rules: FinishRules, sampler: Sampler, keep_kv: bool,
        on_bad_kv: Callable[[], None] = lambda: None,
    ):  # fmt: skip
        self.runner, self.rules, self.sampler = runner, rules, sampler
        self.keep_kv, self.on_bad_kv = keep_kv, on_bad_kv
        self.rows: list[Row] = []  # the running rows, in batch order
        self.batch: DecodeBatch | None = None

    def join(self, rows: list[Row], matches: Sequence[Match | None]) -> None:
        """Prefill ``rows`` (each from its match's KV) and add them after the running rows."""
        prompts = [r.prompt for r in rows]
        pasts, starts = self.runner.pasts(prompts, matches, self.keep_kv)
        new = [p[s:] for p, s in zip(prompts, starts)]
        batch, order = DecodeBatch.prefill(self.runner, pasts, starts, new, self.keep_kv)
        joined = [rows[i] for i in order]
        if self.batch is not None:
            batch = self.batch.merge([batch], self.runner.config)
            joined = self.rows + joined
        self.rows, self.batch = joined, batch

    def step(self) -> list[tuple[Row, KVEntry | None]]:
        """Sample one token per running row; return the rows that finished (with their KV when
        kept); run one decode forward for the others."""
        if self.batch is None:
            return []
        batch = self.batch
        tokens, logps = self.sampler(batch.logits, self.rows)  # (b,), (b,)
        keep, out = [], []
        for j, (t, lp) in enumerate(zip(tokens.tolist(), logps.tolist())):
            row = self.rows[j]
            if not self.rules.append(row, t, lp):
                keep.append(j)
                continue
            entry = batch.kept_row(j, row) if self.keep_kv else None
            if self.keep_kv and entry is None:
                self.keep_kv = False
                self.on_bad_kv()
            out.append((row, entry))
        if not keep:
            self.rows, self.batch = [], None
            return out
        if len(keep) < len(self.rows):  # finished rows leave the batch and the cache
            batch.select(keep)
            tokens = tokens[torch.tensor(keep, device=tokens.device)]
            self.rows = [self.rows[j] for j in keep]
        batch.decode(self.runner, tokens)
        return out
