"""Paired comparison of two evaluations of the same questions: ``searchrl compare A [B]``.

An evaluation is a trajectory file (one JSON record per trajectory, as ``searchrl eval`` and
``searchrl train`` write them). :func:`resolve` accepts:

* a ``.jsonl`` file;
* an eval folder (``searchrl eval --out``): its ``trajectories.jsonl``;
* a training run folder (``searchrl train --out``): its evaluation after RL,
  ``eval_after_trajectories.jsonl``; ``RUN/eval_before`` (or ``eval-before``, ``before``) names the
  one before RL, ``RUN/eval_stepN`` an intermediate one;
* a training run folder alone (no B): before RL (A) against after RL (B).

Each file is scored again from its answers and gold answers (:func:`searchrl.eval.runner.score_record`),
and the trajectories of a question are averaged first (greedy evaluation has one per question;
sampled ones may have several). Questions are grouped by dataset, or by another record field
(``--by num_hops``: the synthetic world's hop count). Both files must hold the same question ids. For each metric
(EM, F1, substring EM, searches per question, and EM over answerable questions when the data flags
them) the result has, per dataset and for the macro average over datasets (as ``avg`` in
``metrics.json``): A's and B's means, the difference ``B - A`` and its 95 % paired bootstrap
interval over questions (:func:`searchrl.eval.stats.grouped_intervals` on the per-question
differences). :func:`run_gain` is the same for a training run's before/after evaluations, as
``summary.json`` records it.

Left out: comparing different question sets (use the same ``--data``, ``--split`` and
``--limit``), more than two runs at once, and corrections for testing many datasets.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from searchrl.errors import ConfigError, DataFormatError, SearchRLError
from searchrl.eval.stats import (
    DEFAULT_RESAMPLES, DEFAULT_SEED, Interval, bootstrap_settings, grouped_intervals,
)  # fmt: skip

log = logging.getLogger(__name__)

EVAL_FILE = "trajectories.jsonl"  # searchrl eval --out
RUN_SUFFIX = "_trajectories.jsonl"  # searchrl train: eval_before, eval_after, eval_stepN
BEFORE, AFTER = "eval_before", "eval_after"
METRICS = ("em", "f1", "subem", "searches_per_question")  # per-question means; em_answerable when flagged
_PER_QUESTION = ("em", "f1", "subem", "searches_per_question")


# ------------------------------------------------------------------------------ inputs
def _run_eval(folder: Path, name: str) -> Path | None:
    name = name.replace("-", "_")
    if not name.startswith("eval_"):
        name = "eval_" + name
    path = folder / f"{name}{RUN_SUFFIX}"
    return path if path.is_file() else None


def resolve(spec: str) -> Path:
    """The trajectory file ``spec`` names (see the module doc)."""
    p = Path(spec)
    if p.is_file():
        return p
    if p.is_dir():
        if (p / EVAL_FILE).is_file():
            return p / EVAL_FILE
        if (p / f"{AFTER}{RUN_SUFFIX}").is_file():
            return p / f"{AFTER}{RUN_SUFFIX}"
    elif p.parent.is_dir():
        found = _run_eval(p.parent, p.name)
        if found:
            return found
    raise ConfigError(
        f"{spec}: no evaluation found (expected a trajectories .jsonl file, an eval folder with "
        f"{EVAL_FILE}, a training run folder with {AFTER}{RUN_SUFFIX}, or RUN/eval_before)"
    )


def resolve_pair(a: str, b: str | None) -> tuple[Path, Path]:
    """``(A, B)`` files; with ``b`` missing, ``a`` must be a training run: before vs after RL."""
    if b is not None:
        return resolve(a), resolve(b)
    run = Path(a)
    before, after = _run_eval(run, BEFORE), _run_eval(run, AFTER)
    if not (run.is_dir() and before and after):
        raise ConfigError(f"{a}: with one argument, give a training run folder holding {BEFORE}{RUN_SUFFIX} "
                          f"and {AFTER}{RUN_SUFFIX}; otherwise give two evaluations A B")  # fmt: skip
    return before, after


@dataclass
class Question:
    """One question's scores, averaged over its trajectories; ``group``: its dataset (or the value
    of the field the comparison groups by)."""

    group: str
    answerable: bool | None
    scores: dict[str, float] = field(default_factory=dict)
    samples: int = 0


def load_questions(path: Path, by: str = "source") -> dict[str, Question]:
    """Per question id (in file order), its group (the dataset, or ``FIELD=value`` of the record
    field ``by``, e.g. ``num_hops=2``), answerable flag and mean scores over its trajectories."""
    from searchrl.eval.runner import score_record

    sums: dict[str, Question] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                qid = str(rec["id"])
                s = score_record(rec)
            except (ValueError, KeyError, TypeError) as e:
                raise DataFormatError(str(path), n, f"not a trajectory record ({e})") from None
            if by != "source" and rec.get(by) is None:
                raise DataFormatError(str(path), n, f"no {by!r} field to group the questions by")
            q = sums.setdefault(qid, Question(s.source if by == "source" else f"{by}={rec[by]}", s.answerable))
            values = (s.em, s.f1, s.subem, float(s.searches))
            for key, v in zip(_PER_QUESTION, values):
                q.scores[key] = q.scores.get(key, 0.0) + v
            q.samples += 1
    if not sums:
        raise DataFormatError(str(path), None, "no trajectory records")
    for q in sums.values():
        q.scores = {k: v / q.samples for k, v in q.scores.items()}
    return sums


def check_same_questions(a: dict[str, Question], b: dict[str, Question], path_a: Path, path_b: Path) -> None:
    """Raise :class:`ConfigError` unless both evaluations hold exactly the same question ids."""
    only_a, only_b = [q for q in a if q not in b], [q for q in b if q not in a]
    if not only_a and not only_b:
        return

    def some(ids: list[str]) -> str:
        return ", ".join(ids[:3]) + (", ..." if len(ids) > 3 else "")

    detail = []
    if only_a:
        detail.append(f"{len(only_a)} only in A ({some(only_a)})")
    if only_b:
        detail.append(f"{len(only_b)} only in B ({some(only_b)})")
    raise ConfigError(
        f"A ({path_a}: {len(a)} questions) and B ({path_b}: {len(b)} questions) are not evaluations of "
        f"the same questions: {'; '.join(detail)}. A paired comparison needs the same question ids "
        "(same --data, --split and --limit)"
    )


# ------------------------------------------------------------------------------ the comparison
def _answerable(a: dict[str, Question], b: dict[str, Question]) -> dict[str, bool | None]:
    """Each question's flag: A's, or B's where A's file does not record it."""
    return {i: q.answerable if q.answerable is not None else b[i].answerable for i, q in a.items()}


def _vectors(a: dict[str, Question], b: dict[str, Question], metrics: Sequence[str]):
    """Per dataset (A's order) and metric, the (A, B) per-question values, paired by position."""
    groups: dict[str, list[str]] = {}
    for qid, q in a.items():
        groups.setdefault(q.group, []).append(qid)
    flags = _answerable(a, b)
    flagged = any(f is not None for f in flags.values())
    out: dict[str, dict[str, tuple[np.ndarray, np.ndarray] | None]] = {}
    for name, ids in groups.items():
        out[name] = {}
        for m in metrics:
            if m == "em_answerable":
                keep = [i for i in ids if flags[i]] if flagged else ids
                key = "em"
            else:
                keep, key = ids, m
            if not keep:
                out[name][m] = None
                continue
            out[name][m] = (np.array([a[i].scores[key] for i in keep]), np.array([b[i].scores[key] for i in keep]))
    return out


def _entry(pair: tuple[np.ndarray, np.ndarray] | None, interval: Interval | None) -> dict[str, Any] | None:
    if pair is None or interval is None:
        return None
    return {"n": interval.n, "a": float(pair[0].mean()), "b": float(pair[1].mean()),
            "diff": interval.estimate, "ci95": interval.bounds()}  # fmt: skip


def paired_difference(
    a: dict[str, Question], b: dict[str, Question], metrics: Sequence[str] | None = None,
    resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
) -> dict[str, Any]:
    """``B - A`` per dataset and macro-averaged, with paired 95 % intervals (see the module doc).

    Returns ``{"n", "datasets": {name: {"n", metric: {"n", "a", "b", "diff", "ci95"}}},
    "avg": {"n", metric: {...}}, "bootstrap": {...}}``; a metric a dataset cannot have
    (``em_answerable`` without answerable questions) is ``None`` there.
    """
    if metrics is None:
        flagged = any(f is not None for f in _answerable(a, b).values())
        metrics = ("em", "em_answerable", *METRICS[1:]) if flagged else METRICS
    vectors = _vectors(a, b, metrics)
    diffs = {g: {m: None if p is None else p[1] - p[0] for m, p in ms.items()} for g, ms in vectors.items()}
    ci = grouped_intervals(diffs, resamples, seed)
    datasets: dict[str, Any] = {}
    for g, ms in vectors.items():
        datasets[g] = {"n": sum(1 for q in a.values() if q.group == g)}
        datasets[g].update({m: _entry(ms[m], ci["datasets"][g][m]) for m in metrics})
    avg: dict[str, Any] = {"n": len(a)}
    for m in metrics:
        parts = [datasets[g][m] for g in datasets if datasets[g][m] is not None]
        interval = ci["avg"][m]
        avg[m] = None if not parts or interval is None else {
            "n": interval.n, "a": sum(p["a"] for p in parts) / len(parts),
            "b": sum(p["b"] for p in parts) / len(parts), "diff": interval.estimate, "ci95": interval.bounds(),
        }  # fmt: skip
    return {"n": len(a), "datasets": datasets, "avg": avg, "bootstrap": bootstrap_settings(resamples, seed)}


def compare_files(path_a: Path, path_b: Path, metrics: Sequence[str] | None = None,
                  resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED, by: str = "source") -> dict[str, Any]:
    """:func:`paired_difference` of two trajectory files, with their paths and samples per question;
    ``by``: the record field that groups questions (``source`` = per dataset)."""
    a, b = load_questions(path_a, by), load_questions(path_b, by)
    check_same_questions(a, b, path_a, path_b)
    result = {"a": str(path_a), "b": str(path_b), "by": by,
              "samples_per_question": {"a": max(q.samples for q in a.values()),
                                       "b": max(q.samples for q in b.values())}}  # fmt: skip
    result.update(paired_difference(a, b, metrics, resamples, seed))
    return result


def run_gain(run_dir: str | Path, metric: str = "em") -> dict[str, Any] | None:
    """A training run's before -> after change in ``metric`` with its paired 95 % interval, per
    dataset and macro-averaged: ``{"metric", "n", "before", "after", "gain", "ci95", "datasets":
    {name: {"n", "before", "after", "gain", "ci95"}}, "bootstrap"}``, and ``"by_hops": {hops: {...}}``
    when the records carry ``num_hops`` (the synthetic world); ``None`` (with a warning) when the
    run lacks either evaluation or they cover different questions."""
    run = Path(run_dir)
    before, after = _run_eval(run, BEFORE), _run_eval(run, AFTER)
    if not (before and after):
        return None
    try:
        r = compare_files(before, after, metrics=(metric,))
    except SearchRLError as e:
        log.warning("no before/after interval for %s: %s", run, e)
        return None

    def entry(e: dict[str, Any]) -> dict[str, Any]:
        return {"n": e["n"], "before": e["a"], "after": e["b"], "gain": e["diff"], "ci95": e["ci95"]}

    gain = {"metric": metric, **entry(r["avg"][metric]),
            "datasets": {g: entry(ms[metric]) for g, ms in r["datasets"].items() if ms[metric]},
            "bootstrap": r["bootstrap"]}  # fmt: skip
    try:
        hops = compare_files(before, after, metrics=(metric,), by="num_hops")
    except DataFormatError:  # no hop counts (real datasets)
        return gain
    gain["by_hops"] = {g.split("=", 1)[1]: entry(ms[metric]) for g, ms in sorted(hops["datasets"].items())
                       if ms[metric]}  # fmt: skip
    return gain


# ------------------------------------------------------------------------------ printing and the CLI
def format_comparison(result: dict[str, Any]) -> str:
    """Markdown: a header naming A and B, then one table per metric (datasets, then ``avg``)."""
    from searchrl.eval.tables import ROW_LABELS, SHORT_NAMES, format_cell, markdown_table, ordered_datasets

    boot = result["bootstrap"]
    lines = [f"A: {result['a']}", f"B: {result['b']}"]
    samples = result.get("samples_per_question", {})
    if max(samples.values(), default=1) > 1:
        lines.append(f"(trajectories averaged per question first: up to {samples['a']} in A, {samples['b']} in B)")
    lines.append(f"B - A over {result['n']} paired questions; {int(boot['level'] * 100)}% paired bootstrap "
                 f"intervals ({boot['resamples']} resamples, seed {boot['seed']}); avg = macro average "
                 f"over {'datasets' if result.get('by', 'source') == 'source' else result['by'] + ' groups'}")
    names = ordered_datasets(list(result["datasets"]))
    metrics = [m for m in result["avg"] if m != "n"]
    for m in metrics:
        rows = []
        for label, e in [(SHORT_NAMES.get(g, g), result["datasets"][g][m]) for g in names] + [("avg", result["avg"][m])]:
            if e is None:
                rows.append([label, "0", "-", "-", "-", "-"])
                continue
            lo, hi = (format_cell(m, x, signed=True) for x in e["ci95"])
            rows.append([label, str(e["n"]), format_cell(m, e["a"]), format_cell(m, e["b"]),
                         format_cell(m, e["diff"], signed=True), f"[{lo}, {hi}]"])  # fmt: skip
        lines += ["", ROW_LABELS.get(m, m),
                  markdown_table(["dataset", "n", "A", "B", "B - A", "95% interval"], rows)]  # fmt: skip
    return "\n".join(lines)


def register(subparsers: Any) -> None:
    """Add the ``compare`` sub-command."""
    p = subparsers.add_parser(
        "compare", help="paired difference of two evaluations (B - A) with bootstrap intervals",
        description="Paired comparison of two evaluations of the same questions: B - A per dataset and "
        "on the macro average, with 95% paired bootstrap intervals over questions. A and B are eval "
        "folders, trajectory .jsonl files or training runs (RUN = after RL, RUN/eval_before = before); "
        "a training run alone compares its evaluations before and after RL.",
    )  # fmt: skip
    p.add_argument("a", metavar="RUN_OR_EVAL_A", help="the baseline (A)")
    p.add_argument("b", metavar="RUN_OR_EVAL_B", nargs="?", help="the other run (B); omit for before/after RL")
    p.add_argument("--metrics", help=f"comma-separated, from {', '.join(METRICS)}, em_answerable "
                   "(default: all of them; em_answerable when the data flags answerable questions)")
    p.add_argument("--resamples", type=int, default=DEFAULT_RESAMPLES,
                   help=f"bootstrap resamples (default: {DEFAULT_RESAMPLES})")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"bootstrap seed (default: {DEFAULT_SEED})")
    p.add_argument("--by", default="source", metavar="FIELD",
                   help="group questions by this record field instead of the dataset (e.g. num_hops)")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of tables")
    p.set_defaults(func=cmd_compare)


def _metric_list(text: str | None) -> tuple[str, ...] | None:
    if not text:
        return None
    names = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in names if m not in (*METRICS, "em_answerable")]
    if bad or not names:
        raise ConfigError(f"--metrics: unknown {', '.join(bad) or '(none given)'}; "
                          f"choose from {', '.join(METRICS)}, em_answerable")  # fmt: skip
    return names


def cmd_compare(args: argparse.Namespace) -> int:
    if args.resamples < 1:
        raise ConfigError(f"--resamples must be >= 1, got {args.resamples}")
    metrics = _metric_list(args.metrics)
    path_a, path_b = resolve_pair(args.a, args.b)
    result = compare_files(path_a, path_b, metrics, args.resamples, args.seed, by=args.by)
    print(json.dumps(result, indent=2) if args.json else format_comparison(result))
    return 0
