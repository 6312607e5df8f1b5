"""Rewards: normalisation, extraction, EM / substring EM / F1, format validity and reward."""

from __future__ import annotations

import re
import string
from collections import Counter

import pytest

from searchrl.errors import ConfigError
from searchrl.rewards import (
    REWARD_KINDS,
    RewardConfig,
    compute_reward,
    exact_match,
    extract_answer,
    f1_score,
    format_reward,
    is_valid_format,
    normalize_answer,
    subem,
)
from searchrl.rollout.parser import parse_action
from searchrl.rollout.prompts import INVALID_ACTION_FEEDBACK, LAST_TURN_NOTICE, prompt_text
from searchrl.types import QAExample, Trajectory, Turn


def _squad_normalize(s: str) -> str:
    """The SQuAD v1.1 evaluation script's normalisation, written out independently."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _squad_f1(pred: str, gold: str) -> float:
    p, g = _squad_normalize(pred).split(), _squad_normalize(gold).split()
    same = sum((Counter(p) & Counter(g)).values())
    if same == 0:
        return 0.0
    prec, rec = same / len(p), same / len(g)
    return 2 * prec * rec / (prec + rec)


ASCII_CASES = [
    "The Beatles", "  an   Apple, a Day!", "U.S.A.", "the", "Theatre of the absurd",
    "Paris (France)", "1,000,000", "Rock-'n'-roll", "A", "Anne", "", "them and there",
]  # fmt: skip


@pytest.mark.parametrize("s", ASCII_CASES)
def test_normalize_matches_squad_on_ascii(s):
    assert normalize_answer(s) == _squad_normalize(s)


def test_normalize_unicode():
    # composed and decomposed forms agree; unicode punctuation is dropped; accents are kept
    assert normalize_answer("Cafe\u0301") == normalize_answer("Café") == "café"
    assert normalize_answer("«Der Prozess»") == "der prozess"
    assert normalize_answer("東京") == "東京"
    assert exact_match("Zürich", ["zürich"]) == 1.0
    assert exact_match("Zurich", ["Zürich"]) == 0.0


@pytest.mark.parametrize(
    "pred, gold",
    [("Paris France", "Paris"), ("the big red dog", "big dog"), ("a b c", "d"), ("x x y", "x")],
)
def test_f1_matches_squad(pred, gold):
    assert f1_score(pred, gold) == pytest.approx(_squad_f1(pred, gold))


def test_metrics_golds_as_str_or_list():
    for golds in ("Paris", ["Paris"], ("Lyon", "Paris")):
        assert exact_match("paris.", golds) == 1.0
        assert subem("it is Paris", golds) == 1.0
        assert f1_score("Paris", golds) == 1.0
    assert exact_match("Paris", []) == 0.0
    assert f1_score("Paris", []) == 0.0
    assert subem("Paris", []) == 0.0


def test_empty_and_missing_answers_score_zero():
    for metric in (exact_match, subem, f1_score):
        assert metric(None, ["Paris"]) == 0.0
        assert metric("", ["Paris"]) == 0.0
    # an empty prediction never matches, even a gold that normalises to nothing
    assert exact_match("", ["The The"]) == 0.0
    assert exact_match("The The", ["The The"]) == 1.0


def test_extract_answer_edge_cases():
    assert extract_answer("<answer>first</answer> x <answer> last </answer>") == "last"
    # answer tags inside information blocks are the retriever's, not the model's
    text = "<answer>mine</answer><information>Doc 1 <answer>theirs</answer></information>"
    assert extract_answer(text) == "mine"
    # an unclosed information block hides everything after it
    assert extract_answer("<information> <answer>x</answer>") is None
    assert extract_answer("<answer>unfinished") is None
    assert extract_answer("<answer>a <answer>b</answer>") == "b"
    assert extract_answer("<answer>\n Multi\nline \n</answer>") == "Multi\nline"
    assert extract_answer("<answer>東京</answer>") == "東京"


def test_inserted_texts_hold_no_answer():
    # the prompt's example answer and the loop's inserted texts must never be graded
    assert extract_answer(INVALID_ACTION_FEEDBACK) is None
    assert extract_answer(LAST_TURN_NOTICE) is None
    assert "<answer> Beijing </answer>" in prompt_text("q")  # the prompt has one: never passed


VALID = [
    "<think>a</think><answer>b</answer>",
    "  <think>a</think>\n\n<answer>b</answer>\n",
    "<think>a</think><search>q</search>\n\n<information>Doc 1(Title: T) x\n</information>\n\n"
    "<think>b</think><search>q2</search><information>y</information><think>c</think>"
    "<answer>d</answer>",
    # information content is free text (it is the corpus), answer tags included
    "<think>a</think><search>q</search><information><answer>z</answer> <think>"
    "</information><think>b</think><answer>d</answer>",
]
INVALID = [
    "",
    "<answer>b</answer>",  # no think first
    "<think>a</think>",  # never answers
    "<think>a</think> because <answer>b</answer>",  # free text
    "<think>a</think><answer>b</answer> trailing",
    "<think>a</think><search>q</search><answer>b</answer>",  # no information after search
    "<think>a</think><search>q</search><information>x</information><answer>b</answer>",
    "<think>a <search>q</search></think><answer>b</answer>",  # nested tag
    "<think>a</think><answer>b</answer><answer>c</answer>",
    "<think>a</think></think><answer>b</answer>",
    "<think>a</think><answer>b",
    "<think>a</think>" + INVALID_ACTION_FEEDBACK + "<think>b</think><answer>c</answer>",
]


@pytest.mark.parametrize("text", VALID)
def test_valid_format(text):
    assert is_valid_format(text)


@pytest.mark.parametrize("text", INVALID)
def test_invalid_format(text):
    assert not is_valid_format(text)


def test_format_reward_table():
    valid_right = "<think>a</think><answer>Paris</answer>"
    invalid_right = "<answer>Paris</answer>"
    assert format_reward(valid_right, ["paris"]) == 1.0
    assert format_reward(invalid_right, ["paris"]) == pytest.approx(0.8)
    assert format_reward(valid_right, ["Lyon"]) == pytest.approx(0.2)
    assert format_reward(invalid_right, ["Lyon"]) == pytest.approx(0.1)
    assert format_reward("<think>a</think> rambling", ["Lyon"]) == 0.0
    assert format_reward("", "Lyon") == 0.0
    custom = dict(structure_score=0.3, invalid_score=0.05)
    assert format_reward(invalid_right, "paris", **custom) == pytest.approx(0.7)
    assert format_reward(invalid_right, "x", **custom) == pytest.approx(0.05)


def test_retrieval_bonus_only_when_gold_in_information():
    found = (
        "<think>a</think><search>q</search><information>Doc 1(Title: L) Lyon is a city."
        "</information><think>b</think><answer>Nice</answer>"
    )
    assert format_reward(found, "Lyon") == pytest.approx(0.2)  # default bonus 0
    assert format_reward(found, "Lyon", retrieval_bonus=0.1) == pytest.approx(0.3)
    assert format_reward(found, "Marseille", retrieval_bonus=0.1) == pytest.approx(0.2)
    # a gold written by the model itself (outside information) earns no bonus
    own = found.replace("<think>b</think>", "<think>Lyon?</think>")
    assert format_reward(own, "Marseille", retrieval_bonus=0.1) == pytest.approx(0.2)


def _traj(model_turns: list[str], observations: list[str]) -> Trajectory:
    """A trajectory whose turns' actions are what the loop's parser makes of their texts."""
    ex = QAExample("1", "q?", ["Paris"])
    turns = [Turn(text=t, action=parse_action(t).kind, observation=o)
             for t, o in zip(model_turns, observations)]  # fmt: skip
    text = "".join(t + o for t, o in zip(model_turns, observations))
    return Trajectory(example=ex, prompt_ids=[1], turns=turns, response_text=text)


def test_compute_reward_kinds_and_weights():
    text = "<think>a</think><answer>the Paris</answer>"
    ex = QAExample("1", "q", ["Paris"])
    assert compute_reward(text, ex) == 1.0
    assert compute_reward(text, ["Lyon"], RewardConfig("em")) == 0.0
    assert compute_reward("<answer>Paris, France</answer>", "Paris", RewardConfig("subem")) == 1.0
    f1 = compute_reward("<answer>Paris France</answer>", "Paris", RewardConfig("f1"))
    assert f1 == pytest.approx(2 / 3)
    mixed = RewardConfig({"em": 1.0, "format": 0.5})
    assert compute_reward(text, ex, mixed) == pytest.approx(1.5)
    assert compute_reward("<answer>Lyon</answer>", ex, mixed) == pytest.approx(0.05)
    assert compute_reward("no answer at all", ex, mixed) == 0.0


def test_compute_reward_on_trajectory_reads_only_model_text():
    # an answer block that only appears in inserted text never counts
    fake_feedback = "\n\nexample: <answer>Paris</answer>\n\n"
    t = _traj(["<think>a</think> junk"], [fake_feedback])
    assert compute_reward(t.response_text, ["Paris"]) == 1.0  # the raw string path is fooled
    assert compute_reward(t, ["Paris"]) == 0.0  # the trajectory path is not
    t = _traj(["<think>a</think><answer>Paris</answer>"], [""])
    assert compute_reward(t, QAExample("1", "q", ["paris"]), RewardConfig("format")) == 1.0


def test_an_answer_the_loop_did_not_accept_is_not_graded():
    # "<answer> Par" cut by length, feedback inserted, then "is </answer>": the two turns'
    # texts joined read "<answer> Paris </answer>", but no turn was accepted as an answer
    t = _traj(["<answer> Par", "is </answer>"], [INVALID_ACTION_FEEDBACK, INVALID_ACTION_FEEDBACK])
    assert [turn.action for turn in t.turns] == ["invalid", "invalid"]
    assert t.answer is None
    for kind in REWARD_KINDS:
        assert compute_reward(t, ["Paris"], RewardConfig(kind)) == 0.0, kind
    # the accepted turn's own block is graded, not a later or earlier one's
    t = _traj(["<answer> Lyon", "<answer> Paris </answer>"], [INVALID_ACTION_FEEDBACK, ""])
    assert t.answer == "Paris" and compute_reward(t, ["Paris"]) == 1.0


def test_reward_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="reward.kind.*bleu.*em, subem, f1, format"):
        RewardConfig("bleu")
    with pytest.raises(ConfigError, match="reward.kind"):
        RewardConfig({"em": 1.0, "rouge": 1.0})
    with pytest.raises(ConfigError, match="reward.kind"):
        RewardConfig({})


def test_search_cost_scales_only_rewarded_answers_by_their_extra_searches():
    search, info = "<think>a</think><search>q</search>", "<information>Doc 1 <search>x</search></information>"
    answer = "<think>b</think><answer>Paris</answer>"
    cfg = RewardConfig("em", search_cost=0.3)
    for searches, want in [(0, 1.0), (1, 1.0), (2, 0.7), (3, 0.4), (4, 0.1), (5, 0.0)]:
        t = _traj([search] * searches + [answer], [info] * searches + [""])
        assert t.num_searches == searches
        assert compute_reward(t, ["Paris"], cfg) == pytest.approx(want), searches
        # the string path counts the model's search blocks, never one inside inserted text
        assert compute_reward(t.response_text, ["Paris"], cfg) == pytest.approx(want), searches
        assert compute_reward(t, ["Lyon"], cfg) == 0.0  # a wrong answer pays nothing, however it searched
    # a partial reward shrinks in proportion; a format reward for a wrong answer too
    two = _traj([search, search, "<think>b</think><answer>Paris France</answer>"], [info, info, ""])
    assert compute_reward(two, ["Paris"], RewardConfig("f1", search_cost=0.5)) == pytest.approx(2 / 3 * 0.5)
    assert compute_reward(two, ["Lyon"], RewardConfig("format", search_cost=0.5)) == pytest.approx(0.2 * 0.5)
    assert compute_reward(t, ["Paris"], RewardConfig("em")) == 1.0  # off by default (t: five searches)
    for bad in (-0.1, 1.5):
        with pytest.raises(ConfigError, match="search_cost"):
            RewardConfig("em", search_cost=bad)
