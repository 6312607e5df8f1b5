"""The order in which the trainer draws training questions: seeded epoch-wise permutations.

Every rank of a multi-process job draws the same questions (same seed), then takes its share.
Its position is part of the checkpoint, so a resumed run draws what the uninterrupted run would.
With ``strata`` (one label per question, e.g. its hop count), every draw takes the same number of
questions from each label (the remainder rotating between labels), each label its own permutation.
"""

from __future__ import annotations

from typing import Any, Hashable, Sequence

import numpy as np


class DataSampler:
    """Epoch-wise seeded permutations of the training set, optionally balanced over ``strata``;
    its position is checkpointed."""

    def __init__(self, n: int, seed: int, strata: Sequence[Hashable] | None = None):
        if n < 1:
            raise ValueError("no training examples")
        if strata is not None and len(strata) != n:
            raise ValueError(f"{len(strata)} strata labels for {n} examples")
        self.n, self.seed, self.epoch, self.pos = n, seed, 0, 0
        self.draws = 0
        self.groups: list[list[int]] = []
        if strata is not None and len(set(strata)) > 1:
            labels = sorted(set(strata), key=str)
            self.groups = [[i for i, s in enumerate(strata) if s == label] for label in labels]
            self.parts = [DataSampler(len(g), seed * 1_000 + j) for j, g in enumerate(self.groups)]

    def _perm(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def next(self, k: int) -> list[int]:
        if self.groups:
            return self._balanced(k)
        out: list[int] = []
        while len(out) < k:
            perm = self._perm()
            take = perm[self.pos : self.pos + (k - len(out))].tolist()
            out.extend(take)
            self.pos += len(take)
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
        return out

    def _balanced(self, k: int) -> list[int]:
        s = len(self.groups)
        counts = [k // s + (1 if (j - self.draws) % s < k % s else 0) for j in range(s)]
        self.draws += 1
        out = [self.groups[j][i] for j in range(s) for i in self.parts[j].next(counts[j])]
        order = np.random.default_rng([self.seed, 7, self.draws]).permutation(len(out))  # labels mixed
        return [out[i] for i in order]

    def state_dict(self) -> dict[str, Any]:
        s: dict[str, Any] = {"epoch": self.epoch, "pos": self.pos, "n": self.n, "seed": self.seed}
        if self.groups:
            s.update(draws=self.draws, parts=[p.state_dict() for p in self.parts])
        return s

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.epoch, self.pos = s["epoch"], s["pos"]
        if self.groups:
            if len(s.get("parts", [])) != len(self.parts):
                raise ValueError("the checkpoint's sampler was not balanced over the same strata")
            self.draws = s["draws"]
            for p, ps in zip(self.parts, s["parts"]):
                p.load_state_dict(ps)
