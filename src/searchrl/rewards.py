"""Outcome rewards for QA trajectories: answer extraction, EM / substring EM / F1, format reward.

Everything here is a pure function of the *response* (never the prompt, whose example
``<answer> Beijing </answer>`` must not count) and the gold answers. A trajectory's answer is the
one the loop accepted (:attr:`searchrl.types.Trajectory.answer`: the answer block of the turn the
loop parsed as ``answer``); a plain string's is its last ``<answer>…</answer>`` block outside
``<information>`` blocks (:func:`searchrl.tags.extract_answer`; text the retriever inserted is not
the model's). Normalisation follows SQuAD (lowercase, drop punctuation and the articles
a/an/the, collapse whitespace), with two additions: Unicode NFC and Unicode punctuation.

Format validity (the Search-R1 v0.3 notion, written out here): ignoring whitespace between
blocks, the response must read ``think (search information think)* answer`` where each block is
``<tag>content</tag>``; ``think``, ``search`` and ``answer`` contents contain no tag of the four
kinds, ``information`` contents contain no ``<information>`` tag; no other text may appear
outside the blocks (so inserted corrective feedback makes a response invalid).

An optional search cost (``RewardConfig.search_cost``, off by default as in the paper) scales a
rewarded answer down for each search after the first: among right answers, fewer searches win, while
a wrong answer stays at its reward whatever it searched (so groups that all fail stay inert).

Left out: rewards computed from token log-probs or a learned model, and reward placement on
tokens (the trainer puts the scalar on the last generated token).
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

from searchrl.errors import ConfigError
from searchrl.tags import ANY_TAG, block_pattern, extract_answer, information_text, strip_information

if TYPE_CHECKING:
    from searchrl.types import QAExample, Trajectory

Golds = Union[str, list[str], tuple[str, ...]]

REWARD_KINDS = ("em", "subem", "f1", "format")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_FROM_TEXT = object()  # format_reward: read the answer from the text


def _is_punct(ch: str) -> bool:
    return ch in string.punctuation or unicodedata.category(ch).startswith("P")


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lowercase, no punctuation, no articles, single spaces.

    >>> normalize_answer("  The  Eiffel-Tower! ")
    'eiffeltower'
    >>> normalize_answer("An Apple a day")
    'apple day'
    >>> normalize_answer("“Café”")  # Unicode quotes are punctuation too; accents are kept
    'café'
    """
    s = unicodedata.normalize("NFC", s).lower()
    s = "".join(ch for ch in s if not _is_punct(ch))
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _gold_list(golds: Golds) -> list[str]:
    return [golds] if isinstance(golds, str) else [str(g) for g in golds]


def exact_match(pred: str | None, golds: Golds) -> float:
    """1.0 when the normalised prediction equals a normalised gold answer (empty prediction: 0).

    >>> exact_match("the Paris", ["paris", "Lutetia"])
    1.0
    >>> exact_match("Paris, France", "Paris")
    0.0
    >>> exact_match(None, "Paris"), exact_match("  ", "Paris")
    (0.0, 0.0)
    """
    if pred is None or not pred.strip():
        return 0.0
    p = normalize_answer(pred)
    return float(any(p == normalize_answer(g) for g in _gold_list(golds)))


def subem(pred: str | None, golds: Golds) -> float:
    """1.0 when a normalised gold answer occurs in the normalised prediction as whole words.

    >>> subem("It is Paris, France.", ["paris"])
    1.0
    >>> subem("1990", "1")  # whole words only, unlike plain substring tests
    0.0
    >>> subem("the", "the")  # a gold that normalises to nothing matches nothing
    0.0
    """
    if pred is None:
        return 0.0
    p = f" {normalize_answer(pred)} "
    for g in _gold_list(golds):
        ng = normalize_answer(g)
        if ng and f" {ng} " in p:
            return 1.0
    return 0.0


def _token_f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    common = Counter(pred_tokens) & Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(pred: str | None, golds: Golds) -> float:
    """Best SQuAD token F1 of the prediction against the gold answers.

    >>> round(f1_score("Paris France", ["Paris"]), 4)
    0.6667
    >>> f1_score("Lyon", ["Paris", "Lyon"])
    1.0
    >>> f1_score(None, "Paris")
    0.0
    """
    if pred is None:
        return 0.0
    p = normalize_answer(pred).split()
    return max((_token_f1(p, normalize_answer(g).split()) for g in _gold_list(golds)), default=0.0)


def is_valid_format(response_text: str) -> bool:
    """Whether the response reads ``think (search information think)* answer`` (see module doc).

    >>> is_valid_format("<think>a</think><answer>b</answer>")
    True
    >>> is_valid_format("<think>a</think> <search>q</search>\\n<information>Doc 1 …</information>"
    ...                 "<think>b</think><answer>c</answer>\\n")
    True
    >>> is_valid_format("<answer>b</answer>")  # no reasoning first
    False
    >>> is_valid_format("<think>a</think> so <answer>b</answer>")  # text outside blocks
    False
    >>> is_valid_format("<think>a</think><search>q</search>")  # never answered
    False
    """
    blocks: list[str] = []
    pos = 0
    while True:
        m = ANY_TAG.search(response_text, pos)
        if m is None:
            if response_text[pos:].strip():
                return False
            break
        if response_text[pos : m.start()].strip() or m.group(0).startswith("</"):
            return False
        tag = m.group(1)
        close = response_text.find(f"</{tag}>", m.end())
        if close < 0:
            return False
        inner = response_text[m.end() : close]
        nested = "<information>" in inner if tag == "information" else ANY_TAG.search(inner)
        if nested:
            return False
        blocks.append(tag)
        pos = close + len(tag) + 3
    return re.fullmatch(r"T(SIT)*A", "".join(t[0].upper() for t in blocks)) is not None


def format_reward(
    response_text: str,
    golds: Golds,
    *,
    structure_score: float = 0.2,
    invalid_score: float = 0.1,
    retrieval_bonus: float = 0.0,
    answer: str | None | object = _FROM_TEXT,
) -> float:
    """Search-R1 v0.3 format-aware reward (correctness by exact match).

    ``answer``: the answer to grade (default: :func:`~searchrl.tags.extract_answer` of the text).

    correct + valid 1.0; correct + invalid ``1 - structure_score`` (0.8); wrong + valid
    ``structure_score`` (0.2), plus ``retrieval_bonus`` when a gold answer appears inside an
    ``<information>`` block; wrong + invalid ``invalid_score`` (0.1); no answer 0.

    >>> ok = "<think>a</think><answer>Paris</answer>"
    >>> format_reward(ok, "paris"), format_reward(ok, "Lyon")
    (1.0, 0.2)
    >>> format_reward("<answer>Paris</answer>", "paris"), format_reward("<answer>x</answer>", "y")
    (0.8, 0.1)
    >>> format_reward("<think>a</think>", "paris")
    0.0
    >>> found = ("<think>a</think><search>q</search><information>Doc 1(Title: P) Lyon is big"
    ...          "</information><think>b</think><answer>Nice</answer>")
    >>> format_reward(found, "Lyon", retrieval_bonus=0.3), format_reward(found, "Rome")
    (0.5, 0.2)
    """
    if answer is _FROM_TEXT:
        answer = extract_answer(response_text)
    if not isinstance(answer, str):
        return 0.0
    valid = is_valid_format(response_text)
    if exact_match(answer, golds):
        return 1.0 if valid else 1.0 - structure_score
    if not valid:
        return invalid_score
    bonus = retrieval_bonus if retrieval_bonus and subem(
        information_text(response_text), golds
    ) else 0.0
    return structure_score + bonus


@dataclass
class RewardConfig:
    """Which reward to compute.

    ``kind`` is one of ``em``, ``subem``, ``f1``, ``format``, or a mapping ``{kind: weight}``
    whose weighted sum is the reward (e.g. ``{"em": 1.0, "format": 0.5}``). ``search_cost``: a
    positive reward is multiplied by ``max(0, 1 - search_cost * (searches - 1))``. The other fields
    parametrise :func:`format_reward`.
    """

    kind: Union[str, dict] = "em"
    structure_score: float = 0.2
    invalid_score: float = 0.1
    retrieval_bonus: float = 0.0
    search_cost: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.search_cost <= 1.0:
            raise ConfigError(f"reward.search_cost: must be in [0, 1], got {self.search_cost}")
        for name in self.weights:
            if name not in REWARD_KINDS:
                raise ConfigError(
                    f"reward.kind: unknown reward {name!r}; valid: {', '.join(REWARD_KINDS)}"
                )
        if not self.weights:
            raise ConfigError("reward.kind: give at least one reward kind")

    @property
    def weights(self) -> dict[str, float]:
        if isinstance(self.kind, str):
            return {self.kind: 1.0}
        return {str(k): float(v) for k, v in dict(self.kind).items()}


def compute_reward(
    trajectory_or_text: "Trajectory | str",
    example: "QAExample | Golds",
    cfg: RewardConfig | None = None,
) -> float:
    """The configured reward of one response.

    For a :class:`~searchrl.types.Trajectory` the answer is the one the loop accepted
    (:attr:`~searchrl.types.Trajectory.answer`) and the format is read from the full
    ``response_text``; for a string, both come from that string. ``example`` is a :class:`~searchrl.types.QAExample` or the gold answer(s).

    >>> compute_reward("<think>a</think><answer>Paris</answer>", ["Paris"])
    1.0
    >>> cfg = RewardConfig(kind={"f1": 1.0, "format": 0.5})
    >>> compute_reward("<answer>Paris France</answer>", "Paris", cfg)
    0.7166666666666667
    >>> two = "<think>a</think><search>q</search><search>r</search><answer>Paris</answer>"
    >>> compute_reward(two, "Paris", RewardConfig(search_cost=0.25)), compute_reward(two, "Rome", RewardConfig(search_cost=0.25))
    (0.75, 0.0)
    """
    cfg = cfg or RewardConfig()
    golds = example if isinstance(example, (str, list, tuple)) else example.golden_answers
    if isinstance(trajectory_or_text, str):
        text, answer = trajectory_or_text, extract_answer(trajectory_or_text)
    else:
        text, answer = trajectory_or_text.response_text, trajectory_or_text.answer
    total = 0.0
    for kind, weight in cfg.weights.items():
        if kind == "em":
            value = exact_match(answer, golds)
        elif kind == "subem":
            value = subem(answer, golds)
        elif kind == "f1":
            value = f1_score(answer, golds)
        else:
            value = format_reward(
                text,
                golds,
                structure_score=cfg.structure_score,
                invalid_score=cfg.invalid_score,
                retrieval_bonus=cfg.retrieval_bonus,
                answer=answer,
            )
        total += weight * value
    if cfg.search_cost and total > 0:
        if isinstance(trajectory_or_text, str):
            searches = len(block_pattern(("search",)).findall(strip_information(text)))
        else:
            searches = trajectory_or_text.num_searches
        total *= max(0.0, 1.0 - cfg.search_cost * max(0, searches - 1))
    return total
