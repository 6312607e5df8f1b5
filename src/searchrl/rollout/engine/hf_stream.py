"""Continuous batching over an :class:`~searchrl.rollout.engine.hf.HFGenerator`: :class:`HFStream`.

Rows are added under a key and join the running decode batch between steps; each step returns
the rows that finished. The decode cycle itself (prefill, merge, sample, finish, select, decode)
is :class:`~searchrl.rollout.engine.decode.Decoder`, the same one ``generate`` runs; this module
adds what a stream needs on top: keys, when queued rows join, and KV parked per key.

Left out: preemption (a running row is never paused to make room) and a bound on the running
rows (the caller decides how many rows it adds).
"""

from __future__ import annotations

import contextlib
from collections.abc import Hashable, Sequence
from typing import Any

import torch

from searchrl.errors import SearchRLError
from searchrl.rollout.engine.decode import MIN_SHARED, Decoder, Row
from searchrl.rollout.engine.kv_cache import KVEntry, KVStore, Match, weights_fingerprint
from searchrl.rollout.engine.protocol import Completion, SamplingParams
from searchrl.rollout.engine.sampling import SEED_MASK, sample_rows


class HFStream:
    """Continuous batching over an HF generator: rows join and leave the running batch between
    decode steps, so nobody waits for the slowest row of a batch.

    ``add(key, prompt, max_new_tokens, seed)`` queues a row; ``step()`` prefills the queued rows
    (in one batch, shared prefixes run once, as ``HFGenerator.generate`` does), merges them into
    the running batch, samples one token for every running row, takes out the rows that finished
    (EOS, a stop string, their budget) and runs one decode forward for the others; it returns
    ``[(key, Completion), ...]`` for the rows that finished. A row's finish rules, tokens and
    log-probs are those of ``HFGenerator.generate``.

    *Joining*: queued rows join together, when a quarter of the running batch is waiting
    (``join_fraction``), when the first of them has waited ``join_wait`` steps, or when nothing
    runs: every join prefills one batch and copies the running cache once, so joining rows one by
    one would cost more than the few steps they wait.

    *KV reuse*: with ``kv_reuse``, a finished row's KV is parked under its key; a joining row
    starts from the parked row sharing its longest prefix (at least ``MIN_SHARED`` tokens): its
    own previous turn when it continues one (the multi-turn loop's next turn: context plus an
    observation, so only the observation is prefilled), else another row's (the instruction
    template of a new question). :meth:`release` drops a parked row (a finished trajectory) after
    the next join, which may still borrow its prefix; closing the stream drops them all.

    *Randomness*: a row's token is drawn with noise seeded from the row's ``seed`` and the token's
    index (:func:`~searchrl.rollout.engine.sampling.sample_rows`), so a row's tokens do not depend
    on which rows share its steps (up to float rounding of batched kernels): the same seeds give
    the same tokens at any batch size. ``seed=None`` draws a seed from torch's global generator.
    ``sampling``'s own ``seed`` and ``max_new_tokens`` are not used (both are per row).

    The model is in eval mode, under ``torch.inference_mode`` and the generator's half precision
    (see ``HFGenerator``'s ``amp``) while the stream is open (``with generator.stream(...) as
    s:``); the weights must not change then. Leading cache columns that no running row needs any
    more are trimmed when rows leave.
    """

    def __init__(
        self, gen: Any, sampling: SamplingParams, stop: list[str] | None,
        join_fraction: float = 0.25, join_wait: int = 4,
    ):  # fmt: skip
        self.gen, self.sampling = gen, sampling  # gen: the HFGenerator
        self.join_fraction, self.join_wait = join_fraction, join_wait
        self._waited = 0  # steps the first queued row has waited
        self.rules = gen.finish_rules(stop)
        self.steps = 0  # decode forwards run
        self.calls = 0  # step() calls
        self.decoder: Decoder | None = None  # while open
        self._queued: list[Row] = []
        self._ended: list[Row] = []  # finished without a step (a zero budget)
        self._keys: set[Hashable] = set()
        self._parked: dict[Hashable, KVEntry] = {}
        self._released: set[Hashable] = set()  # parked rows dropped after the next join
        self._contexts: contextlib.ExitStack | None = None
        self._fingerprint: tuple | None = None

    def __enter__(self) -> HFStream:
        self._contexts = contextlib.ExitStack()
        runner = self._contexts.enter_context(self.gen.running())
        self.decoder = Decoder(runner, self.rules, self._sample, self.gen.kv_reuse,
                               self.gen.disable_reuse)  # fmt: skip
        self._fingerprint = weights_fingerprint(self.gen.model)
        return self

    def __exit__(self, *exc: Any) -> None:
        contexts, self._contexts = self._contexts, None
        self._queued, self._ended, self._keys = [], [], set()
        self._parked.clear()
        self._released.clear()
        self.decoder = None
        if contexts is not None:
            contexts.close()

    def _sample(self, logits: torch.Tensor, rows: Sequence[Row]) -> tuple[torch.Tensor, torch.Tensor]:
        return sample_rows(logits, self.sampling, [r.seed for r in rows],
                           [len(r.token_ids) for r in rows])  # fmt: skip

    @property
    def busy(self) -> bool:
        """Whether a row is queued or running (``step`` has work)."""
        return bool(self._queued or self.running or self._ended)

    @property
    def running(self) -> int:
        """Rows in the decode batch."""
        return len(self.decoder.rows) if self.decoder is not None else 0

    def add(self, key: Hashable, prompt: list[int], max_new_tokens: int, seed: int | None = None) -> None:
        """Queue one row; it joins the batch at the next :meth:`step`."""
        if key in self._keys:
            raise SearchRLError(f"stream: key {key!r} is already queued or running")
        sampling = SamplingParams(max_new_tokens, self.sampling.temperature, self.sampling.top_p)
        self.gen.check([prompt], sampling)
        if seed is None:  # from torch's global generator: torch.manual_seed makes it repeatable
            seed = int(torch.randint(0, 2**62, (), dtype=torch.long))
        row = Row(list(prompt), int(max_new_tokens), key=key, seed=int(seed) & SEED_MASK)
        self._keys.add(key)
        if row.max_new_tokens == 0:
            row.finish_reason = "length"
            self._ended.append(row)
        else:
            self._queued.append(row)

    def release(self, key: Hashable) -> None:
        """Forget the parked KV of ``key`` (its trajectory is over) after the next join."""
        if key in self._parked:
            self._released.add(key)

    def step(self) -> list[tuple[Hashable, Completion]]:
        """Join the queued rows, sample one token per running row, decode once; the finished."""
        if self._contexts is None or self.decoder is None:
            raise SearchRLError("stream: use it as a context manager (with generator.stream(...) as s)")
        self.calls += 1
        out = [self._finish(r) for r in self._ended]
        self._ended = []
        if self._queued:
            due = len(self._queued) >= self.join_fraction * self.running
            if not self.running or due or self._waited >= self.join_wait:
                self._join(self.decoder)
                self._waited = 0
            else:
                self._waited += 1
        if not self.running:
            return out
        for row, entry in self.decoder.step():
            if entry is not None:
                self._parked[row.key] = entry
                self._released.discard(row.key)
            out.append(self._finish(row))
        if self.running:
            self.steps += 1
        return out

    def _finish(self, row: Row) -> tuple[Hashable, Completion]:
        self._keys.discard(row.key)
        return row.key, self.rules.completion(row)

    def _join(self, decoder: Decoder) -> None:
        """Prefill the queued rows (from their parked KV when they continue it) into the batch."""
        if weights_fingerprint(self.gen.model) != self._fingerprint:
            raise SearchRLError("stream: the model's weights changed while the stream was open")
        rows, self._queued = self._queued, []
        matches = self._matches(rows) if decoder.keep_kv and self._parked else [None] * len(rows)
        for key in [r.key for r in rows] + list(self._released):  # superseded or over
            self._parked.pop(key, None)
        self._released.clear()
        decoder.join(rows, matches)

    def _matches(self, rows: list[Row]) -> list[Match | None]:
        """Each joining row's parked KV: its own previous turn, however short, when it continues
        it; else the parked row sharing its longest prefix (at least ``MIN_SHARED`` tokens)."""
        matches: list[Match | None] = [None] * len(rows)
        for i, r in enumerate(rows):
            own = self._parked.get(r.key)
            n = len(own.tokens) if own is not None else 0
            if own is not None and n < len(r.prompt) and r.prompt[:n] == own.tokens:
                matches[i] = Match(own, n)
        fresh = [i for i, m in enumerate(matches) if m is None]
        if fresh:
            donors = KVStore()
            donors.entries = list(self._parked.values())
            found = donors.match([rows[i].prompt for i in fresh], min_length=MIN_SHARED)
            for i, m in zip(fresh, found):
                matches[i] = m
        return matches
