"""The static training report: ``write_report(run_dir)`` -> ``run_dir/report/index.html`` + PNG plots.

Reads whatever a run directory holds (``metrics.jsonl``, ``eval_before.json`` / ``eval_after.json``
and their ``*_trajectories.jsonl``, ``summary.json``, ``warmstart.json``, ``config.yaml``); any of
them may be missing (a run in progress), and a half-written JSONL line is skipped with a warning.
The page has a headline, a before/after table per dataset, one PNG per curve over RL steps, the
warm-start loss, the config in a collapsed block and a few evaluation trajectories rendered turn by
turn. Every piece of model or data text is HTML-escaped; tags the model wrote are shown, styled.

The page is self-contained: inline CSS, no JavaScript, images referenced relatively, so the
``report/`` folder can be copied or served anywhere. Plots use matplotlib's object API (Agg canvas)
and never touch pyplot's global state.

Left out: interactive plots, comparing several runs, and the training trajectories (only the
evaluation ones are stored on disk).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from html import escape
from pathlib import Path
from typing import Any, NamedTuple

log = logging.getLogger(__name__)


class Curve(NamedTuple):
    """One figure: metric keys plotted over steps (``stack``: stacked bars instead of lines)."""

    name: str
    title: str
    keys: tuple[str, ...]
    labels: tuple[str, ...] = ()
    stack: bool = False


CURVES = (
    Curve("reward", "Reward (mean over rollouts)", ("reward",)),
    Curve("em", "Exact match", ("em", "val_em"), ("training rollouts", "validation (greedy)")),
    Curve("searches", "Searches per trajectory", ("searches_per_traj", "val_searches"),
          ("training rollouts", "validation (per question)")),
    Curve("response_length", "Response length (tokens)", ("response_length",)),
    Curve("valid_action_rate", "Valid action rate", ("valid_action_rate",)),
    Curve("kl", "KL to the reference policy", ("kl",)),
    Curve("entropy", "Policy entropy (nats/token)", ("entropy",)),
    Curve("clipfrac", "Clip fraction", ("clipfrac",)),
    Curve("losses", "Losses", ("pg_loss", "value_loss"), ("policy", "value")),
    Curve("grad_norm", "Gradient norm (before clipping)", ("grad_norm",)),
    Curve("timing", "Time per step (s)", ("_generation", "time_retrieval", "time_prepare", "time_update"),
          ("generation", "retrieval", "log-probs + advantages", "update"), stack=True),
    Curve("throughput", "Update throughput (sampled tokens/s)", ("update_tokens_per_s",)),
    Curve("memory", "Peak memory (MB)", ("peak_memory_mb",)),
    Curve("lr", "Learning rate", ("lr",)),
)

CSS = """
body{font:15px/1.45 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0} td,th{border:1px solid #ddd;padding:.25em .6em;text-align:right}
th:first-child,td:first-child{text-align:left} thead th{background:#f4f4f4}
.cards{display:flex;gap:1em;flex-wrap:wrap} .card{border:1px solid #ddd;border-radius:6px;padding:.5em 1em}
.card b{display:block;font-size:1.4em} .muted{color:#777} .up{color:#1a7f37} .down{color:#b42318}
.figs{display:grid;grid-template-columns:repeat(auto-fill,minmax(340px,1fr));gap:.8em}
figure{margin:0} figure img{width:100%;border:1px solid #eee}
pre{background:#f7f7f7;padding:.6em;overflow-x:auto;white-space:pre-wrap;font-size:13px}
.traj{border:1px solid #ddd;border-radius:6px;padding:.6em 1em;margin:1em 0}
.traj.ok{border-left:5px solid #1a7f37} .traj.bad{border-left:5px solid #b42318}
.turn{margin:.5em 0 .5em .5em;padding-left:.6em;border-left:2px solid #e3e3e3}
.tag{color:#8250df;font-weight:600} .badge{font-size:12px;background:#eef;border-radius:4px;padding:0 .4em}
ol.passages{margin:.2em 0;font-size:14px}
"""

_TAG = re.compile(r"&lt;/?[A-Za-z_][\w\-]*&gt;")
NUM_EXAMPLES = 3  # correct and wrong trajectories shown each


# ----------------------------------------------------------------------------- reading
def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        log.warning("report: %s is not valid JSON (%s); left out", path, e)
        return None
    return data if isinstance(data, dict) else None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file; bad lines (e.g. one being written) are skipped with a warning."""
    rows: list[dict[str, Any]] = []
    if not path.exists():
        return rows
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                log.warning("report: %s:%d is not valid JSON; skipped", path, i)
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the records holding a finite number under ``key``."""
    xs, ys = [], []
    for r in rows:
        if key == "_generation":  # rollout time minus the retrieval inside it
            v = _num(r.get("time_rollout"))
            v = None if v is None else max(v - (_num(r.get("time_retrieval")) or 0.0), 0.0)
        else:
            v = _num(r.get(key))
        s = _num(r.get("step"))
        if v is not None and s is not None:
            xs.append(s)
            ys.append(v)
    return xs, ys


# ----------------------------------------------------------------------------- plots
def _new_axes(title: str, xlabel: str = "RL step"):
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(5.6, 3.2), dpi=100, layout="constrained")
    ax = fig.subplots()
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
    return fig, ax


def _smooth(ys: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y - (ys[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def _plot_curve(curve: Curve, rows: list[dict[str, Any]], path: Path) -> bool:
    """Draw one curve's figure to ``path``; False (nothing written) when none of its keys was logged."""
    labels = curve.labels or ("per step",) * len(curve.keys)
    data = [(lbl, *_series(rows, k)) for k, lbl in zip(curve.keys, labels)]
    data = [d for d in data if d[1]]
    if not data:
        return False
    fig, ax = _new_axes(curve.title)
    if curve.stack:  # bars for a few steps, a stacked area for many; legend below the axes
        steps = sorted({x for _, xs, _ in data for x in xs})
        table = [[dict(zip(xs, ys)).get(x, 0.0) for x in steps] for _, xs, ys in data]
        labels = [d[0] for d in data]
        if len(steps) > 40:
            ax.stackplot(steps, table, labels=labels, linewidth=0)
        else:
            gap = min((b - a for a, b in zip(steps, steps[1:])), default=1.0)
            bottom = [0.0] * len(steps)
            for label, ys in zip(labels, table):
                ax.bar(steps, ys, width=0.8 * gap, bottom=bottom, label=label, linewidth=0)
                bottom = [b + y for b, y in zip(bottom, ys)]
        fig.legend(loc="outside lower center", ncols=len(labels), fontsize=8, frameon=False)
    else:
        for i, (label, xs, ys) in enumerate(data):
            if i > 0 and curve.labels:  # secondary series (validation) as points
                ax.plot(xs, ys, "o-", ms=5, label=label)
                continue
            window = max(1, len(ys) // 20)
            dots = "o-" if len(xs) <= 30 else "-"
            ax.plot(xs, ys, dots, ms=3, lw=1, alpha=0.4 if window > 1 else 1.0, label=label)
            if window > 1:
                ax.plot(xs, _smooth(ys, window), "-", lw=2, color=ax.lines[-1].get_color(),
                        label=f"{label} (mean of {window})")
    if not curve.stack and len(ax.lines) > 1:
        ax.legend(fontsize=8)
    fig.savefig(path, format="png")
    return True


def _plot_warmstart(losses: list[float], path: Path) -> bool:
    ys = [float(v) for v in losses if _num(v) is not None]
    if not ys:
        return False
    fig, ax = _new_axes("Format warm-start (SFT) loss", "SFT step")
    ax.plot(range(1, len(ys) + 1), ys, "o-" if len(ys) <= 30 else "-", ms=3)
    fig.savefig(path, format="png")
    return True


# ----------------------------------------------------------------------------- HTML pieces
def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, int):  # bool included
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if abs(v) >= 1000:
            return f"{v:.0f}"
        return f"{v:.{digits}g}" if v != 0 and abs(v) < 1e-3 else f"{v:.{digits}f}"
    return escape(str(v))


def model_text(text: str) -> str:
    """Escape model text and style the tags it wrote, so ``<script>`` shows instead of running.

    >>> model_text('<search> a<b </search>')
    '<span class="tag">&lt;search&gt;</span> a&lt;b <span class="tag">&lt;/search&gt;</span>'
    """
    return _TAG.sub(lambda m: f'<span class="tag">{m.group(0)}</span>', escape(text, quote=True))


def _delta(before: Any, after: Any) -> str:
    b, a = _num(before), _num(after)
    if a is None or b is None:
        return "–"
    cls = "up" if a > b else "down" if a < b else "muted"
    return f'<span class="{cls}">{a - b:+.3f}</span>'


def _cards(summary: dict | None, before: dict | None, after: dict | None, rows: list[dict]) -> str:
    b_avg = (before or {}).get("avg", {}) or (summary or {}).get("eval_before", {})
    a_avg = (after or {}).get("avg", {}) or (summary or {}).get("eval_after", {})
    steps = (summary or {}).get("steps", max((int(r["step"]) for r in rows if _num(r.get("step")) is not None),
                                             default=None))
    cards = [("RL steps", _fmt(steps)),
             ("EM before → after", f"{_fmt(b_avg.get('em'))} → {_fmt(a_avg.get('em'))}"),
             ("searches / question", f"{_fmt(b_avg.get('searches_per_question'), 2)} → "
                                     f"{_fmt(a_avg.get('searches_per_question'), 2)}")]
    if summary and _num(summary.get("wall_seconds")) is not None:
        cards.append(("wall time", f"{summary['wall_seconds'] / 60:.1f} min"))
    return '<div class="cards">' + "".join(
        f'<div class="card"><span class="muted">{k}</span><b>{v}</b></div>' for k, v in cards) + "</div>"


def _eval_table(before: dict | None, after: dict | None) -> str:
    """One row per dataset (then the average): n, EM, F1 and searches per question, before and after."""
    bd, ad = (before or {}).get("datasets", {}), (after or {}).get("datasets", {})
    names = list(dict.fromkeys([*bd, *ad]))
    if not names:
        return '<p class="muted">No evaluation yet.</p>'
    head = ("<thead><tr><th>dataset</th><th>n</th><th>EM before</th><th>EM after</th><th>Δ EM</th>"
            "<th>F1 before</th><th>F1 after</th><th>searches/q before</th><th>searches/q after</th>"
            "<th>tokens after</th></tr></thead>")
    body = []
    entries = [(n, bd.get(n, {}), ad.get(n, {})) for n in names]
    if len(names) > 1 or (before or {}).get("avg") or (after or {}).get("avg"):
        entries.append(("average", (before or {}).get("avg", {}), (after or {}).get("avg", {})))
    for name, b, a in entries:
        n = a.get("n", b.get("n"))
        cells = [_fmt(n), _fmt(b.get("em")), _fmt(a.get("em")), _delta(b.get("em"), a.get("em")),
                 _fmt(b.get("f1")), _fmt(a.get("f1")), _fmt(b.get("searches_per_question"), 2),
                 _fmt(a.get("searches_per_question"), 2), _fmt(a.get("response_tokens"), 1)]
        tag = "th" if name == "average" else "td"
        body.append(f"<tr><{tag}>{escape(str(name))}</{tag}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table>{head}<tbody>{''.join(body)}</tbody></table>"


def _is_correct(t: dict[str, Any]) -> bool:
    from searchrl.rewards import exact_match

    return exact_match(t.get("answer"), t.get("golden_answers") or []) > 0


def pick_trajectories(trajs: list[dict[str, Any]], k: int = NUM_EXAMPLES) -> list[tuple[bool, dict]]:
    """Up to ``k`` correct then ``k`` wrong trajectories, those that searched first (file order otherwise)."""
    searched_first = sorted(trajs, key=lambda t: (t.get("num_searches") or 0) == 0)
    judged = [(_is_correct(t), t) for t in searched_first]
    return [x for x in judged if x[0]][:k] + [x for x in judged if not x[0]][:k]


def _turn_html(i: int, turn: dict[str, Any]) -> str:
    meta = escape(f"turn {i} · {turn.get('action', '?')} · stop: {turn.get('finish_reason') or '?'}")
    out = [f'<div class="turn"><span class="badge">{meta}</span>',
           f"<pre>{model_text(str(turn.get('text', '')))}</pre>"]
    if turn.get("query") is not None:
        out.append(f"<div>query: <code>{escape(str(turn['query']))}</code></div>")
    passages = turn.get("passages") or []
    if passages:
        items = "".join(f"<li>{escape(str(p.get('title') or '(untitled)'))} <span class=\"muted\">"
                        f"score {_fmt(p.get('score'))} · id {escape(str(p.get('id', '')))}</span></li>"
                        for p in passages)
        out.append(f'<ol class="passages">{items}</ol>')
    return "".join(out) + "</div>"


def _trajectory_html(correct: bool, t: dict[str, Any]) -> str:
    gold = ", ".join(escape(str(g)) for g in t.get("golden_answers") or [])
    answer = t.get("answer")
    head = (f"<div><b>Q:</b> {escape(str(t.get('question', '')))}</div>"
            f"<div><b>gold:</b> {gold or '–'} · <b>answer:</b> "
            f"{'<i>none</i>' if answer is None else escape(str(answer))} · "
            f"<b>{'correct' if correct else 'wrong'}</b> · reward {_fmt(_num(t.get('reward')))} · "
            f"searches: {_fmt(t.get('num_searches'))} · finish: {escape(str(t.get('finish_reason', '?')))}"
            f"{' · ' + escape(str(t['source'])) if t.get('source') else ''}</div>")
    turns = "".join(_turn_html(i, turn) for i, turn in enumerate(t.get("turns") or [], 1))
    if not turns and t.get("response_text"):
        turns = f"<pre>{model_text(str(t['response_text']))}</pre>"
    return f'<div class="traj {"ok" if correct else "bad"}">{head}{turns}</div>'


def _config_text(run_dir: Path, summary: dict | None) -> str | None:
    path = run_dir / "config.yaml"
    if path.exists():
        return path.read_text(encoding="utf-8", errors="replace")
    if summary and summary.get("config"):
        return json.dumps(summary["config"], indent=2)
    return None


def _last_step_table(rows: list[dict[str, Any]]) -> str:
    last = rows[-1]
    cells = "".join(f"<tr><td>{escape(k)}</td><td>{_fmt(v if isinstance(v, (int, float)) else str(v))}</td></tr>"
                    for k, v in last.items())
    return (f"<details><summary>All metrics of the last step ({_fmt(last.get('step'))})</summary>"
            f"<table>{cells}</table></details>")


# ----------------------------------------------------------------------------- the page
def _figures(rows: list[dict], warm: dict | None, out: Path) -> list[tuple[str, str]]:
    """Write the PNGs; returns (file name, caption) of each one written."""
    figs: list[tuple[str, str]] = []
    for curve in CURVES:
        name = f"{curve.name}.png"
        if _plot_curve(curve, rows, out / name):
            figs.append((name, curve.title))
    if warm and isinstance(warm.get("losses"), list) and _plot_warmstart(warm["losses"], out / "warmstart.png"):
        figs.append(("warmstart.png", f"Warm-start loss ({_fmt(warm.get('demonstrations'))} demonstrations)"))
    return figs


def write_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report/index.html`` (+ PNGs beside it) from what the run holds; returns its path."""
    run_dir = Path(run_dir)
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    records = _read_jsonl(run_dir / "metrics.jsonl")
    rows = [r for r in records if "reward" in r or "val_em" not in r]
    val = [r for r in records if "val_em" in r and "reward" not in r]
    summary = _read_json(run_dir / "summary.json")
    before, after = _read_json(run_dir / "eval_before.json"), _read_json(run_dir / "eval_after.json")
    warm = _read_json(run_dir / "warmstart.json")
    figs = _figures(rows + val, warm, out)

    which = "eval_after" if (run_dir / "eval_after_trajectories.jsonl").exists() else "eval_before"
    trajs = _read_jsonl(run_dir / f"{which}_trajectories.jsonl")
    status = "finished" if summary else "in progress (no summary.json yet)"
    parts = [f"<h1>searchrl training report</h1><p class=\"muted\">{escape(run_dir.resolve().name)} · {status}</p>",
             _cards(summary, before, after, rows),
             "<h2>Evaluation before and after RL</h2>", _eval_table(before, after),
             "<h2>Training curves</h2>"]
    if figs:
        parts.append('<div class="figs">' + "".join(
            f'<figure><img src="{escape(n)}" alt="{escape(c)}"><figcaption class="muted">{escape(c)}</figcaption>'
            "</figure>" for n, c in figs) + "</div>")
    else:
        parts.append('<p class="muted">No metrics logged yet.</p>')
    if rows:
        parts.append(_last_step_table(rows))
    parts.append(f"<h2>Example trajectories <span class=\"muted\">({which.replace('_', ' ')})</span></h2>")
    picked = pick_trajectories(trajs)
    parts.extend(_trajectory_html(ok, t) for ok, t in picked)
    if not picked:
        parts.append('<p class="muted">No evaluation trajectories yet.</p>')
    cfg = _config_text(run_dir, summary)
    if cfg is not None:
        parts.append(f"<h2>Configuration</h2><details><summary>config</summary><pre>{escape(cfg)}</pre></details>")
    page = ('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f"<title>searchrl report: {escape(run_dir.resolve().name)}</title><style>{CSS}</style></head><body>"
            + "\n".join(parts) + "</body></html>\n")
    index = out / "index.html"
    tmp = index.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, index)
    log.info("report written: %s (%d figures, %d trajectories)", index, len(figs), len(picked))
    return index
