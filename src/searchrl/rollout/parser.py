"""Parse the action a model took in one turn: a search query, a final answer, or nothing valid.

The action is the *first complete* ``<search>…</search>`` or ``<answer>…</answer>`` block of the
turn's text, whichever comes first. A block's content may not contain another opening tag, so in
``<search> a <search> b </search>`` the complete block is ``<search> b </search>``. An empty search
query is invalid; an empty answer is still an answer (it ends the episode and is graded as wrong).

Left out: what to do with the action (the loop decides; e.g. a search on the last turn) and
answer grading (:mod:`searchrl.rewards`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

ACTION_KINDS = ("search", "answer")


@dataclass(frozen=True)
class Action:
    """What the model asked for: ``kind`` is ``"search"``, ``"answer"`` or ``"invalid"``."""

    kind: str
    content: str = ""


@lru_cache(maxsize=8)
def _block_pattern(kinds: tuple[str, ...]) -> re.Pattern[str]:
    alt = "|".join(re.escape(k) for k in kinds)
    # <kind> then any text that opens no other action block, then the matching </kind>
    return re.compile(rf"<({alt})>((?:(?!<(?:{alt})>).)*?)</\1>", re.DOTALL)


def parse_action(text: str, allowed: tuple[str, ...] = ACTION_KINDS) -> Action:
    """The first complete action block of ``text`` among the ``allowed`` kinds.

    >>> parse_action("<think>need data</think>\\n<search> capital of France </search>")
    Action(kind='search', content='capital of France')
    >>> parse_action("<think>ok</think> <answer> Paris </answer>")
    Action(kind='answer', content='Paris')
    >>> parse_action("<answer>x</answer> <search>q</search>").kind
    'answer'
    >>> parse_action("<search>   </search>")
    Action(kind='invalid', content='')
    >>> parse_action("<search> unfinished query")
    Action(kind='invalid', content='')
    >>> parse_action("<search> a <answer> b </answer>")
    Action(kind='answer', content='b')
    >>> parse_action("<search>q</search><answer>a</answer>", allowed=("answer",))
    Action(kind='answer', content='a')
    """
    m = _block_pattern(tuple(allowed)).search(text)
    if m is None:
        return Action("invalid")
    kind, content = m.group(1), m.group(2).strip()
    if kind == "search" and not content:
        return Action("invalid")
    return Action(kind, content)
