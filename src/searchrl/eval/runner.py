"""Benchmark evaluation: run the agent (or a baseline) on QA examples and aggregate the metrics.

:func:`evaluate` rolls out one trajectory per example with
:func:`searchrl.rollout.loop.run_rollouts` and scores it; :func:`summarize` turns trajectories
(objects, or the JSON records of ``trajectories.jsonl``) into the metrics table::

    {"datasets": {name: {"n", "em", "subem", "f1", "em_answerable",
                         "searches_per_question", "turns", "response_tokens", "answer_in_text"}},
     "avg": {same keys},
     "ci95": {"datasets": {name: {metric: [low, high]}}, "avg": {metric: [low, high]}},
     "bootstrap": {"method": "percentile", "level": 0.95, "resamples": 2000, "seed": 0, ...}}

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

``ci95`` holds a 95 % bootstrap interval for every metric but ``n`` (percentile intervals over
questions, seeded, 2,000 resamples by default; the average's interval resamples each dataset
within itself: see :mod:`searchrl.eval.stats`). It sits beside ``datasets`` and ``avg``, which keep
their shape, so readers of the older files work unchanged.

Left out: output folders, resumption and printing (see :mod:`searchrl.eval.cli`), paired
comparisons of two runs (see :mod:`searchrl.eval.compare`), and sampling several answers per
question (pass@k).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from searchrl.eval.stats import (
    DEFAULT_RESAMPLES, DEFAULT_SEED, Interval, bootstrap_settings, grouped_intervals,
)  # fmt: skip
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
    """``traj.to_dict()`` plus the example's ``answerable`` flag, its ``num_hops`` (where the data
    has it) and the scores, one JSON line."""
    rec = traj.to_dict()
    s = score_trajectory(traj)
    rec.update(answerable=s.answerable, em=s.em, subem=s.subem, f1=s.f1)
    if traj.example.extra.get("num_hops") is not None:
        rec["num_hops"] = traj.example.extra["num_hops"]
    return rec


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def metric_values(rows: list[Scored]) -> dict[str, list[float] | None]:
    """Per metric (all of ``METRIC_KEYS`` but ``n``), the per-question values it is the mean of:
    ``em_answerable`` has the answerable questions' EM only (``None`` when flagged questions exist
    but none is answerable)."""
    v: dict[str, list[float] | None] = {}
    v["em"] = [r.em for r in rows]
    v["subem"] = [r.subem for r in rows]
    v["f1"] = [r.f1 for r in rows]
    if any(r.answerable is not None for r in rows):
        v["em_answerable"] = [r.em for r in rows if r.answerable] or None
    else:
        v["em_answerable"] = v["em"]
    v["searches_per_question"] = [float(r.searches) for r in rows]
    v["turns"] = [float(r.turns) for r in rows]
    v["response_tokens"] = [float(r.response_tokens) for r in rows]
    v["answer_in_text"] = [r.in_text for r in rows]
    return {k: v[k] for k in METRIC_KEYS[1:]}


def _dataset_metrics(rows: list[Scored]) -> dict[str, Any]:
    m: dict[str, Any] = {"n": len(rows)}
    m.update({k: _mean(vals or []) for k, vals in metric_values(rows).items()})
    return m


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


def _bounds(interval: Interval | None) -> list[float] | None:
    return None if interval is None else interval.bounds()


def score_groups(trajectories: Iterable[Trajectory | Mapping[str, Any]]) -> dict[str, list[Scored]]:
    """Scored trajectories (objects or ``trajectories.jsonl`` records) by dataset, in order."""
    groups: dict[str, list[Scored]] = {}
    for t in trajectories:
        s = score_trajectory(t) if isinstance(t, Trajectory) else score_record(t)
        groups.setdefault(s.source, []).append(s)
    return groups


def summarize(
    trajectories: Iterable[Trajectory | Mapping[str, Any]],
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> dict[str, Any]:
    """Metrics per dataset and their macro average (see the module doc) from trajectories or
    ``trajectories.jsonl`` records (as written by :func:`trajectory_record`), mixed freely.

    With ``resamples > 0`` it adds ``ci95`` (``{"datasets": {name: {metric: [low, high]}},
    "avg": {metric: [low, high]}}``, ``None`` where the metric is ``None``; no entry for ``n``)
    and ``bootstrap`` (how: :func:`searchrl.eval.stats.bootstrap_settings`): 95 % percentile
    bootstrap intervals over questions, seeded (see :mod:`searchrl.eval.stats`).
    """
    groups = score_groups(trajectories)
    datasets = {name: _dataset_metrics(rows) for name, rows in groups.items()}
    out: dict[str, Any] = {"datasets": datasets, "avg": macro_average(datasets)}
    if resamples > 0:
        ci = grouped_intervals({name: metric_values(rows) for name, rows in groups.items()}, resamples, seed)
        out["ci95"] = {
            "datasets": {name: {k: _bounds(i) for k, i in ms.items()} for name, ms in ci["datasets"].items()},
            "avg": {k: _bounds(i) for k, i in ci["avg"].items()},
        }
        out["bootstrap"] = bootstrap_settings(resamples, seed)
    return out


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
