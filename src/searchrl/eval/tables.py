"""Plain-text renderings of evaluation results: markdown tables and a readable agent trace.

* :func:`metrics_table`: one run's metrics with datasets as columns, as in the Search-R1 paper
  (EM per dataset and the average, then the other metrics as further rows), optionally with
  each value's 95 % interval.
* :func:`comparison_table`: several runs (methods, checkpoints) as rows, one metric per table.
* :func:`format_trace`: one trajectory as thinking, queries, retrieved titles with scores, answer
  and finish reason (what ``searchrl ask`` prints).

Left out: HTML and plots (see :mod:`searchrl.report`).
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

from searchrl.types import Trajectory

# The paper's column order and short names; other datasets follow in their own order.
DATASET_ORDER = ("nq", "triviaqa", "popqa", "hotpotqa", "2wikimultihopqa", "musique", "bamboogle")
SHORT_NAMES = {
    "nq": "NQ", "triviaqa": "TriviaQA", "popqa": "PopQA", "hotpotqa": "HotpotQA",
    "2wikimultihopqa": "2Wiki", "musique": "Musique", "bamboogle": "Bamboogle",
}  # fmt: skip
ROW_LABELS = {
    "em": "EM", "em_answerable": "EM (answerable)", "subem": "SubEM", "f1": "F1",
    "searches_per_question": "searches / question", "turns": "turns / question",
    "response_tokens": "response tokens", "n": "questions",
    "answer_in_text": "answer in own text (diagnostic)",
}  # fmt: skip
DEFAULT_ROWS = ("em", "em_answerable", "subem", "f1", "searches_per_question", "n")

_THINK = re.compile(r"<think>(.*?)(?:</think>|$)", re.DOTALL)
_BLOCKS = re.compile(r"<(think|search|answer)>.*?(?:</\1>|$)", re.DOTALL)


def ordered_datasets(names: Sequence[str]) -> list[str]:
    """Known datasets in the paper's order, then the others as given.

    >>> ordered_datasets(["mine", "hotpotqa", "nq"])
    ['nq', 'hotpotqa', 'mine']
    """
    known = [d for d in DATASET_ORDER if d in names]
    return known + [d for d in names if d not in DATASET_ORDER]


def format_cell(key: str, value: Any, signed: bool = False) -> str:
    """One metric value as the tables print it (``signed``: with its sign, for differences).

    >>> format_cell("em", 0.5), format_cell("em", -0.05, signed=True), format_cell("turns", None)
    ('0.500', '-0.050', '-')
    """
    if value is None:
        return "-"
    if key == "n":
        return str(int(value))
    sign = "+" if signed else ""
    if key in ("em", "em_answerable", "subem", "f1", "answer_in_text"):
        return f"{value:{sign}.3f}"
    return f"{value:{sign}.2f}" if key != "response_tokens" else f"{value:{sign}.0f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _with_interval(key: str, value: Any, bounds: Any) -> str:
    cell = format_cell(key, value)
    if value is None or key == "n" or not bounds or None in bounds:
        return cell
    return f"{cell} [{format_cell(key, bounds[0])}, {format_cell(key, bounds[1])}]"


def metrics_table(metrics: Mapping[str, Any], rows: Sequence[str] = DEFAULT_ROWS,
                  intervals: bool = False) -> str:
    """Markdown table of one run: a row per metric, a column per dataset, then ``avg``. With
    ``intervals`` each value is followed by its 95 % interval from ``metrics["ci95"]`` (when the
    metrics carry one, see :func:`searchrl.eval.runner.summarize`).

    >>> m = {"datasets": {"nq": {"n": 2, "em": 0.5}}, "avg": {"n": 2, "em": 0.5}}
    >>> print(metrics_table(m, rows=("em", "n")))
    | metric | NQ | avg |
    |---|---|---|
    | EM | 0.500 | 0.500 |
    | questions | 2 | 2 |
    """
    names = ordered_datasets(list(metrics["datasets"]))
    header = ["metric"] + [SHORT_NAMES.get(n, n) for n in names] + ["avg"]
    cols = [metrics["datasets"][n] for n in names] + [metrics["avg"]]
    ci = metrics.get("ci95") if intervals else None
    if ci:
        cis = [ci.get("datasets", {}).get(n, {}) for n in names] + [ci.get("avg", {})]
        body = [[ROW_LABELS.get(k, k)] + [_with_interval(k, c.get(k), i.get(k)) for c, i in zip(cols, cis)]
                for k in rows]  # fmt: skip
    else:
        body = [[ROW_LABELS.get(k, k)] + [format_cell(k, c.get(k)) for c in cols] for k in rows]
    return markdown_table(header, body)


def comparison_table(runs: Mapping[str, Mapping[str, Any]], key: str = "em") -> str:
    """Markdown table of several runs (rows) on one metric, datasets as columns, then ``avg``.

    >>> runs = {"direct": {"datasets": {"nq": {"em": 0.1}}, "avg": {"em": 0.1}},
    ...         "rag": {"datasets": {"nq": {"em": 0.3}}, "avg": {"em": 0.3}}}
    >>> print(comparison_table(runs))
    | method | NQ | avg |
    |---|---|---|
    | direct | 0.100 | 0.100 |
    | rag | 0.300 | 0.300 |
    """
    seen: list[str] = []
    for m in runs.values():
        seen += [d for d in m["datasets"] if d not in seen]
    names = ordered_datasets(seen)
    header = ["method"] + [SHORT_NAMES.get(n, n) for n in names] + ["avg"]
    body = []
    for label, m in runs.items():
        cells = [format_cell(key, m["datasets"].get(n, {}).get(key)) for n in names]
        body.append([label] + cells + [format_cell(key, m["avg"].get(key))])
    return markdown_table(header, body)


def _wrap(label: str, text: str, width: int, indent: str = "  ") -> list[str]:
    text = " ".join(text.split())
    if not text:
        return []
    first = f"{indent}{label}: "
    return textwrap.wrap(text, width, initial_indent=first,
                         subsequent_indent=" " * len(first)) or [first]  # fmt: skip


def format_trace(traj: Trajectory, width: int = 100) -> str:
    """A readable trace: per turn the thinking (or, without ``<think>``, the model's other text),
    the query and the retrieved titles with scores, the answer; then the finish reason."""
    lines = [f"Question: {traj.example.question}"]
    for i, turn in enumerate(traj.turns, start=1):
        lines.append(f"[turn {i}] {turn.action}")
        thoughts = [m.strip() for m in _THINK.findall(turn.text)]
        if thoughts:
            for thought in thoughts:
                lines += _wrap("think", thought, width)
        else:
            lines += _wrap("text", _BLOCKS.sub(" ", turn.text), width)
        if turn.query is not None:
            lines += _wrap("search" if turn.action == "search" else "query", turn.query, width)
        if turn.passages:
            lines.append("  retrieved:")
            for rank, p in enumerate(turn.passages, start=1):
                score = "-" if p.score is None else f"{p.score:.3f}"
                lines.append(f"    {rank}. [{score}] {p.title or '(untitled)'}  (id {p.id})")
        if turn.action == "answer":
            lines += _wrap("answer", turn.answer or "", width)
    answer = traj.answer
    lines.append(f"Answer: {answer if answer is not None else '(none)'}")
    lines.append(
        f"Finish: {traj.finish_reason} ({len(traj.turns)} turns, {traj.num_searches} searches, "
        f"{len(traj.response_ids)} response tokens)"
    )
    return "\n".join(lines)
