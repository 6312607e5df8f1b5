"""Fitting retrieved passages into a token budget as one ``<information>`` block.

Left out: choosing the budget (the loop: ``max_obs_tokens`` and the room left in the context) and
the block's wording (:func:`searchrl.rollout.prompts.format_information`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from searchrl.rollout.prompts import format_information
from searchrl.types import Passage


def fit_information(
    tokenizer: Any, passages: Sequence[Passage], budget: int, note: str = ""
) -> tuple[str, list[int]] | None:
    """The largest information block of at most ``budget`` tokens, or ``None`` if none fits.

    Keeps the leading passages whole; when even the first one is too long, its text is cut at a
    token boundary; when not even its title fits, an empty block. The wrapper and closing tag are
    always complete.
    """

    def render(ps: Sequence[Passage]) -> tuple[str, list[int]]:
        text = format_information(ps, note)
        return text, list(tokenizer.encode(text, add_special_tokens=False))

    for n in range(len(passages), 0, -1):
        text, ids = render(passages[:n])
        if len(ids) <= budget:
            return text, ids
    if passages:
        first = passages[0]
        text_ids = tokenizer.encode(first.text, add_special_tokens=False)
        lo, hi, best = 0, len(text_ids) - 1, None
        while lo <= hi:  # largest prefix of the text that fits
            mid = (lo + hi) // 2
            cut = tokenizer.decode(text_ids[:mid], skip_special_tokens=False).rstrip("\ufffd")
            text, ids = render([Passage(first.id, first.title, cut, first.score)])
            if len(ids) <= budget:
                best, lo = (text, ids), mid + 1
            else:
                hi = mid - 1
        if best is not None:
            return best
    text, ids = render([])
    return (text, ids) if len(ids) <= budget else None
