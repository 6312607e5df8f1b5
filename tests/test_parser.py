"""The action parser: first complete search/answer block of a turn, empty queries invalid."""

from __future__ import annotations

import pytest

from searchrl.rollout.parser import Action, parse_action


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>x</think>\n<search> who is X </search>", Action("search", "who is X")),
        ("<answer> Paris </answer>", Action("answer", "Paris")),
        # whichever complete block comes first wins
        ("<search>q1</search><answer>a</answer>", Action("search", "q1")),
        ("<answer>a</answer><search>q1</search>", Action("answer", "a")),
        # incomplete blocks do not count; a later complete one does
        ("<search> half query <answer>b</answer>", Action("answer", "b")),
        ("<search> x <search> y </search>", Action("search", "y")),
        ("</answer> <search>q</search>", Action("search", "q")),
        # nothing usable
        ("plain text", Action("invalid", "")),
        ("<search></search>", Action("invalid", "")),
        ("<search>\n \t</search>", Action("invalid", "")),
        ("<SEARCH>q</SEARCH>", Action("invalid", "")),  # tags are case-sensitive
        ("<think>only thinking</think>", Action("invalid", "")),
        ("", Action("invalid", "")),
        # an empty answer is still an answer (graded as wrong later)
        ("<answer> </answer>", Action("answer", "")),
        # multi-line content and unicode are kept (stripped)
        ("<search>\n  Zürich  population\n</search>", Action("search", "Zürich  population")),
    ],
)
def test_parse_action(text, expected):
    assert parse_action(text) == expected


def test_text_after_stop_string_is_ignored():
    # a stop string that ends mid-token leaves a few characters after the closing tag
    assert parse_action("<search> q </search>ZZ") == Action("search", "q")


def test_allowed_kinds_filter():
    text = "<search>q</search> <answer>a</answer>"
    assert parse_action(text, allowed=("answer",)) == Action("answer", "a")
    assert parse_action("<search>q</search>", allowed=("answer",)).kind == "invalid"
