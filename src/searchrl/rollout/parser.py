"""Parse the action a model took in one turn: a search query, a final answer, or nothing valid.

The action is the *first complete* ``<search>…</search>`` or ``<answer>…</answer>`` block of the
turn's text, whichever comes first (block rules: :mod:`searchrl.tags`). An empty search
query is invalid; an empty answer is still an answer (it ends the episode and is graded as wrong).

Left out: what to do with the action (the loop decides; e.g. a search on the last turn) and
answer grading (:mod:`searchrl.rewards`).
"""

from __future__ import annotations

from dataclasses import dataclass

from searchrl.tags import ACTION_KINDS, first_block


@dataclass(frozen=True)
class Action:
    """What the model asked for: ``kind`` is ``"search"``, ``"answer"`` or ``"invalid"``."""

    kind: str
    content: str = ""


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
    block = first_block(text, tuple(allowed))
    if block is None:
        return Action("invalid")
    kind, content = block
    if kind == "search" and not content:
        return Action("invalid")
    return Action(kind, content)
