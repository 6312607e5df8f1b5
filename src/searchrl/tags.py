"""The tag protocol: the blocks a Search-R1 response is written in, and how a block is read.

The model writes ``<think>``, ``<search>`` and ``<answer>`` blocks; the loop inserts
``<information>`` blocks. A *block* of kind ``k`` is ``<k>content</k>`` whose content opens no
other block of the kinds being looked for (so in ``<search> a <search> b </search>`` the block is
``<search> b </search>``). Both readers of responses use the rules here:

* the rollout parser (:mod:`searchrl.rollout.parser`) takes a turn's *first* complete action
  block (:func:`first_block`): that is the action the loop runs;
* the answer of a whole text (:func:`extract_answer`, used when only a string is at hand) is its
  *last* ``<answer>`` block outside ``<information>`` blocks. A trajectory's answer is instead
  the first answer block of the turn the loop accepted as an answer
  (:attr:`searchrl.types.Turn.answer`), so text the loop never accepted is never graded.

Left out: what an action does (the loop) and how answers are graded (:mod:`searchrl.rewards`).
"""

from __future__ import annotations

import re
from functools import lru_cache

TAGS = ("think", "search", "information", "answer")
ACTION_KINDS = ("search", "answer")

INFO_BLOCK = re.compile(r"<information>.*?(</information>|$)", re.DOTALL)  # an unclosed one too
ANY_TAG = re.compile(rf"</?({'|'.join(TAGS)})>")


@lru_cache(maxsize=8)
def block_pattern(kinds: tuple[str, ...]) -> re.Pattern[str]:
    """A complete block of one of ``kinds``: group 1 the kind, group 2 the raw content."""
    alt = "|".join(re.escape(k) for k in kinds)
    # <kind> then any text that opens no other block of these kinds, then the matching </kind>
    return re.compile(rf"<({alt})>((?:(?!<(?:{alt})>).)*?)</\1>", re.DOTALL)


def first_block(text: str, kinds: tuple[str, ...] = ACTION_KINDS) -> tuple[str, str] | None:
    """``(kind, stripped content)`` of the first complete block of ``kinds`` in ``text``.

    >>> first_block("<think>x</think> <search> q </search><answer>a</answer>")
    ('search', 'q')
    >>> first_block("<answer> a <answer> b </answer>", ("answer",))
    ('answer', 'b')
    >>> first_block("<answer> unfinished") is None
    True
    """
    m = block_pattern(tuple(kinds)).search(text)
    return None if m is None else (m.group(1), m.group(2).strip())


def strip_information(text: str) -> str:
    """``text`` with every ``<information>`` block (inserted, not the model's) blanked out."""
    return INFO_BLOCK.sub(" ", text)


def information_text(text: str) -> str:
    """The ``<information>`` blocks of ``text``, joined by spaces."""
    return " ".join(m.group(0) for m in INFO_BLOCK.finditer(text))


def extract_answer(text: str) -> str | None:
    """The content of the last ``<answer>`` block outside ``<information>`` blocks, or ``None``.

    >>> extract_answer("<think>x</think><answer> Paris </answer>")
    'Paris'
    >>> extract_answer("<answer>a</answer> then <answer>b</answer>")
    'b'
    >>> extract_answer("<information><answer>retrieved</answer></information>") is None
    True
    >>> extract_answer("<answer></answer>")
    ''
    >>> extract_answer("no tags") is None
    True
    """
    found = block_pattern(("answer",)).findall(strip_information(text))
    return found[-1][1].strip() if found else None
