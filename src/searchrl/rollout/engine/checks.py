"""Checks every backend makes on a generation request before it runs (one rule for all engines)."""

from __future__ import annotations

from searchrl.errors import SearchRLError
from searchrl.rollout.engine.protocol import SamplingParams


def check_request(prompts: list[list[int]], sampling: SamplingParams, vocab_size: int) -> None:
    """Raise a clear :class:`~searchrl.errors.SearchRLError` for a bad budget, top-p or prompt
    (empty, or a token id outside ``[0, vocab_size)``); every backend's ``check`` calls it."""
    if sampling.max_new_tokens < 0:
        raise SearchRLError(f"max_new_tokens must be >= 0 (got {sampling.max_new_tokens})")
    if not sampling.greedy and not 0.0 < sampling.top_p <= 1.0:
        raise SearchRLError(f"top_p must be in (0, 1] (got {sampling.top_p})")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise SearchRLError(f"prompt {i} is empty: generation needs at least one token")
        lo, hi = min(p), max(p)
        if lo < 0 or hi >= vocab_size:
            raise SearchRLError(f"prompt {i} has token id {hi if hi >= vocab_size else lo} outside the "
                                f"model's vocabulary [0, {vocab_size})")  # fmt: skip
