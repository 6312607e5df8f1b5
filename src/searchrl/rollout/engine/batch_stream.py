"""Any batch :class:`~searchrl.rollout.engine.protocol.Generator` as a
:class:`~searchrl.rollout.engine.protocol.GenerationStream`: the rounds schedule.

:class:`BatchStream` queues the rows added to it; each :meth:`~BatchStream.step` runs every queued
row to its end through ``generate`` and returns them all, in the order they were added. One
``generate`` call per distinct token budget (largest first), since a call takes one
``max_new_tokens``. A batch call takes one seed: call ``i`` of the stream samples with
``sampling.seed + i`` (``None`` stays ``None``); the rows' own seeds are not used. Nothing is
kept between steps (a backend's own KV reuse across calls still applies).

So the loop has one scheduler over the stream protocol, and a backend that only generates in
batches (a scripted test generator; any generator when ``rollout.schedule=rounds``) runs it as rounds: every trajectory in
flight generates one turn, then all the round's searches go to the retriever at once.

Left out: splitting a step into several calls by size (the backend batches as it likes).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import replace
from typing import Any

from searchrl.errors import SearchRLError
from searchrl.rollout.engine.protocol import Completion, Generator, SamplingParams


class BatchStream:
    """Rounds over ``generator.generate`` behind the stream protocol (see the module docstring).

    ``calls`` counts the ``generate`` calls made so far.
    """

    def __init__(self, generator: Generator, sampling: SamplingParams, stop: list[str] | None = None):
        self.generator, self.sampling = generator, sampling
        self.stop = list(stop or [])
        self.calls = 0
        self._queued: list[tuple[Hashable, list[int], int]] = []

    def __enter__(self) -> BatchStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._queued = []

    @property
    def busy(self) -> bool:
        return bool(self._queued)

    def add(self, key: Hashable, prompt: list[int], max_new_tokens: int, seed: int | None = None) -> None:
        """Queue one row for the next step (``seed`` is not used: one seed per call)."""
        if any(k == key for k, _, _ in self._queued):
            raise SearchRLError(f"stream: key {key!r} is already queued")
        self._queued.append((key, list(prompt), int(max_new_tokens)))

    def release(self, key: Hashable) -> None:
        """Nothing is kept per key."""

    def step(self) -> list[tuple[Hashable, Completion]]:
        """Run every queued row to its end; return them all in the order they were added."""
        rows, self._queued = self._queued, []
        budgets: dict[int, list[int]] = {}
        for i, (_, _, budget) in enumerate(rows):
            budgets.setdefault(budget, []).append(i)
        out: list[Completion | None] = [None] * len(rows)
        for budget, idx in sorted(budgets.items(), reverse=True):
            seed = None if self.sampling.seed is None else self.sampling.seed + self.calls
            sampling = replace(self.sampling, max_new_tokens=budget, seed=seed)
            prompts = [rows[i][1] for i in idx]
            comps = self.generator.generate(prompts, sampling, stop=list(self.stop))
            self.calls += 1
            if len(comps) != len(prompts):
                raise SearchRLError(
                    f"generator returned {len(comps)} completions for {len(prompts)} prompts"
                )
            for i, c in zip(idx, comps):
                out[i] = c
        return [(key, c) for (key, _, _), c in zip(rows, out) if c is not None]
