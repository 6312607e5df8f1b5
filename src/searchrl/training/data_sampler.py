"""The order in which the trainer draws training questions: seeded epoch-wise permutations.

Every rank of a multi-process job draws the same questions (same seed), then takes its share.
Its position is part of the checkpoint, so a resumed run draws what the uninterrupted run would.
"""

from __future__ import annotations

import numpy as np


class DataSampler:
    """Epoch-wise seeded permutations of the training set; its position is checkpointed."""

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError("no training examples")
        self.n, self.seed, self.epoch, self.pos = n, seed, 0, 0

    def _perm(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def next(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            perm = self._perm()
            take = perm[self.pos : self.pos + (k - len(out))].tolist()
            out.extend(take)
            self.pos += len(take)
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos, "n": self.n, "seed": self.seed}

    def load_state_dict(self, s: dict[str, int]) -> None:
        self.epoch, self.pos = s["epoch"], s["pos"]
