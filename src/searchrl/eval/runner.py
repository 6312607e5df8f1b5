"""Benchmark evaluation: run the agent (or a baseline) on QA examples and aggregate the metrics.

:func:`evaluate` rolls out one trajectory per example with
:func:`searchrl.rollout.loop.run_rollouts` and scores it; :func:`summarize` turns trajectories
(objects, or the JSON records of ``trajectories.jsonl``) into the metrics table::

    {"datasets": {name: {"n", "em", "subem", "f1", "em_answerable",
                         "searches_per_question", "turns", "response_tokens", "answer_in_text"}},
     "avg": {same keys}}

Datasets are the examples' ``source`` (in order of first appearance). Per dataset every value is a
mean over its trajectories, except ``n`` (their count) and ``em_answerable``: EM over the examples
whose ``extra["answerable"]`` is true, over all of them when no example carries the flag, ``None``
when flagged examples exist but none is answerable. ``avg`` is the macro average over datasets
(datasets whose value is ``None`` are left out; ``None`` when all are), except ``avg.n``, which is
the total count. The answer is the one the loop accepted (the answer block of the turn it parsed
as an answer: :attr:`searchrl.types.Trajectory.answer`). ``answer_in_text`` is a diagnostic, not a score: a gold
answer occurs as whole words anywhere in the model's own turns (observations excluded, no
``<answer>`` block needed), which tells a model that knows (or read) the answer but ignores the
format from one that does not know it.

Left out: output folders, resumption and printing (see :mod:`searchrl.eval.cli`), significance
tests, and sampling several answers per question (pass@k).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from searchrl.rewards import exact_match, f1_score, subem
from searchrl.rollout.config import RolloutConfig
from searchrl.rollout.loop import run_rollouts
from searchrl.types import QAExample, Trajectory

log = logging.getLogger(__name__)

METRIC_KEYS = (
    "n", "em", "subem", "f1", "em_answerable", "searches_per_question", "turns", "response_tokens",
    "answer_in_text",
)  # fmt: skip


@dataclass(frozen=True)
class Scored:
    """What the metrics need from one trajectory. ``answerable`` is ``None`` when unflagged."""

    source: str
    em: float
    subem: float
    f1: float
    answerable: bool | None
    searches: int
    turns: int
    response_tokens: int
    in_text: float = 0.0  # a gold answer in the model's own turns (see the module doc)


def _answerable_flag(value: Any) -> bool | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


def _scores(answer: str | None, golds: Sequence[str]) -> tuple[float, float, float]:
    return exact_match(answer, golds), subem(answer, golds), f1_score(answer, golds)


def score_trajectory(traj: Trajectory) -> Scored:
    """Score a trajectory against its example's gold answers."""
    ex = traj.example
    em, sub, f1 = _scores(traj.answer, ex.golden_answers)
    own = " ".join(t.text for t in traj.turns)
    return Scored(
        ex.source, em, sub, f1, _answerable_flag(ex.extra.get("answerable")),
        traj.num_searches, len(traj.turns), len(traj.response_ids), subem(own, ex.golden_answers),
    )  # fmt: skip


def score_record(record: Mapping[str, Any]) -> Scored:
    """Score one line of ``trajectories.jsonl`` (see :func:`trajectory_record`): the answer is
    re-graded from its ``answer`` and ``golden_answers`` fields, stored scores are ignored."""
    golds = list(record.get("golden_answers") or [])
    em, sub, f1 = _scores(record.get("answer"), golds)
    own = " ".join(str(t.get("text") or "") for t in record.get("turns") or [])
    return Scored(
        str(record.get("source", "")), em, sub, f1, _answerable_flag(record.get("answerable")),
        int(record.get("num_searches", 0)), int(record.get("num_turns", 0)),
        int(record.get("response_tokens", 0)), subem(own, golds),
    )  # fmt: skip


def trajectory_record(traj: Trajectory) -> dict[str, Any]:
    """``traj.to_dict()`` plus the example's ``answerable`` flag and the scores, one JSON line."""
    rec = traj.to_dict()
    s = score_trajectory(traj)
    rec.update(answerable=s.answerable, em=s.em, subem=s.subem, f1=s.f1)
    return rec


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _dataset_metrics(rows: list[Scored]) -> dict[str, Any]:
    m: dict[str, Any] = {"n": len(rows)}
    m["em"] = _mean([r.em for r in rows])
    m["subem"] = _mean([r.subem for r in rows])
    m["f1"] = _mean([r.f1 for r in rows])
    if any(r.answerable is not None for r in rows):
        m["em_answerable"] = _mean([r.em for r in rows if r.answerable])
    else:
        m["em_answerable"] = m["em"]
    m["searches_per_question"] = _mean([float(r.searches) for r in rows])
    m["turns"] = _mean([float(r.turns) for r in rows])
    m["response_tokens"] = _mean([float(r.response_tokens) for r in rows])
    m["answer_in_text"] = _mean([r.in_text for r in rows])
    return {k: m[k] for k in METRIC_KEYS}


def macro_average(datasets: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Macro average of per-dataset metrics (``None`` values left out); ``n`` is the total.

    >>> macro_average({"a": {"n": 2, "em": 1.0}, "b": {"n": 6, "em": 0.0}})["em"]
    0.5
    >>> macro_average({"a": {"n": 1, "em_answerable": None}})["em_answerable"] is None
    True
    """
    avg: dict[str, Any] = {"n": sum(int(d.get("n") or 0) for d in datasets.values())}
    for key in METRIC_KEYS[1:]:
        avg[key] = _mean([d[key] for d in datasets.values() if d.get(key) is not None])
    return avg


def summarize(trajectories: Iterable[Trajectory | Mapping[str, Any]]) -> dict[str, Any]:
    """Metrics per dataset and their macro average (see the module doc) from trajectories or
    ``trajectories.jsonl`` records (as written by :func:`trajectory_record`), mixed freely."""
    groups: dict[str, list[Scored]] = {}
    for t in trajectories:
        s = score_trajectory(t) if isinstance(t, Trajectory) else score_record(t)
        groups.setdefault(s.source, []).append(s)
    datasets = {name: _dataset_metrics(rows) for name, rows in groups.items()}
    return {"datasets": datasets, "avg": macro_average(datasets)}


def run_scored(
    examples: Sequence[QAExample],
    generator: Any,
    retriever: Any,
    tokenizer: Any,
    cfg: RolloutConfig,
    method: str = "search",
    batch_size: int = 32,
    progress: bool = True,
) -> list[Trajectory]:
    """One rollout per example, in order, each with ``reward`` set to its exact match."""
    trajs = run_rollouts(
        examples, generator, retriever, tokenizer, cfg, n_samples=1, batch_size=batch_size,
        method=method, progress=progress,
    )  # fmt: skip
    for t in trajs:
        t.reward = exact_match(t.answer, t.example.golden_answers)
    return trajs


def evaluate(
    examples: Sequence[QAExample],
    generator: Any,
    retriever: Any,
    tokenizer: Any,
    cfg: RolloutConfig,
    method: str = "search",
    batch_size: int = 32,
    progress: bool = True,
) -> tuple[dict[str, Any], list[Trajectory]]:
    """Evaluate ``method`` on ``examples``: ``(metrics, trajectories)``.

    ``cfg`` is used as given: pass ``temperature=0`` for the usual greedy evaluation.
    ``retriever`` may be ``None`` for ``direct`` and ``cot``. Each trajectory's ``reward`` is set
    to its exact match.
    """
    if cfg.temperature > 0:
        log.info("evaluating with temperature %s (greedy evaluation uses 0)", cfg.temperature)
    trajs = run_scored(examples, generator, retriever, tokenizer, cfg, method, batch_size, progress)
    return summarize(trajs), trajs
