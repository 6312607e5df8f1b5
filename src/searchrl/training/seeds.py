"""One configuration over several seeds: ``searchrl train --seeds 0,1,2``.

:func:`run_seeds` trains each seed in turn into ``OUT/seed-S`` (``OUT`` = ``--out`` or the config's
``out``; only ``seed`` and ``out`` change between runs) and writes ``OUT/seeds.json``
(:func:`seeds_summary`): per seed the held-out EM before and after RL and the gain with its 95 %
paired bootstrap interval over questions (per dataset and per hop count too, where known) (the run's ``summary.json`` ``gain``, see
:func:`searchrl.eval.compare.run_gain`), then over the seeds the mean, min and max gain, and an
interval for the mean gain: per question the gain averaged over the seeds, then the same paired
bootstrap over questions. With ``--resume`` a seed whose run finished (its ``summary.json``
exists) is read, not run again, and an unfinished one continues from its newest checkpoint.

The seeds share one warm-start (``warmstart.seed`` fixed, the default): the first seed that trains it
leaves the warm-started weights and its "before" evaluation in ``OUT/warmstart``, and the others load
them instead of training the same model again (one process, full fine-tuning; otherwise each seed
trains its own). A seed's run is the same as ``searchrl train seed=S`` either way.

Left out: running seeds in parallel (each run already uses the machine's cores) and an interval
over seeds (it would treat seeds as a sample; the per-seed gains are listed instead).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from searchrl.errors import ConfigError, SearchRLError
from searchrl.training.config import TrainConfig

log = logging.getLogger(__name__)

SUMMARY_FILE = "seeds.json"
SHARED_WARM_START = "warmstart"


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``; duplicates and non-integers are refused.

    >>> parse_seeds("0, 1,2")
    [0, 1, 2]
    """
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds: expected comma-separated integers, got {text!r}") from None
    if not seeds:
        raise ConfigError("--seeds: no seed given")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds: a seed is repeated in {text!r}")
    return seeds


def seed_dir(base: str | Path, seed: int) -> Path:
    return Path(base) / f"seed-{seed}"


def run_seeds(cfg: TrainConfig, seeds: list[int], resume: bool = False) -> dict[str, Any]:
    """Train ``cfg`` once per seed (see the module doc); returns ``seeds.json``'s content."""
    from searchrl.training.pipeline import run_training

    base = Path(cfg.out)
    shared = base / SHARED_WARM_START  # used only where the pipeline can share it (run_training)
    summaries: dict[int, dict[str, Any]] = {}
    for i, seed in enumerate(seeds, 1):
        run_cfg = dataclasses.replace(cfg, seed=seed, out=str(seed_dir(base, seed)))
        done = Path(run_cfg.out) / "summary.json"
        if resume and done.is_file():
            log.info("seed %d (%d of %d): finished earlier, reading %s", seed, i, len(seeds), done)
            summaries[seed] = json.loads(done.read_text())
            continue
        log.info("seed %d (%d of %d): training into %s", seed, i, len(seeds), run_cfg.out)
        summaries[seed] = run_training(run_cfg, resume=resume and Path(run_cfg.out).exists(), shared_warm_start=shared)
    result = seeds_summary(base, summaries)
    base.mkdir(parents=True, exist_ok=True)
    (base / SUMMARY_FILE).write_text(json.dumps(result, indent=2) + "\n")
    return result


def _mean_gain_interval(base: Path, seeds: list[int]) -> list[float] | None:
    """95 % interval of the seeds' mean gain over questions; ``None`` when a run lacks an
    evaluation or the runs were evaluated on different questions."""
    from searchrl.eval.compare import AFTER, BEFORE, RUN_SUFFIX, check_same_questions, load_questions
    from searchrl.eval.stats import grouped_intervals

    gains: dict[str, list[float]] = {}
    sources: dict[str, str] = {}
    try:
        for seed in seeds:
            run = seed_dir(base, seed)
            before, after = run / f"{BEFORE}{RUN_SUFFIX}", run / f"{AFTER}{RUN_SUFFIX}"
            if not (before.is_file() and after.is_file()):
                return None
            a, b = load_questions(before), load_questions(after)
            check_same_questions(a, b, before, after)
            if gains and set(a) != set(gains):
                log.warning("seeds were evaluated on different questions: no interval for the mean gain")
                return None
            for qid, q in a.items():
                gains.setdefault(qid, []).append(b[qid].scores["em"] - q.scores["em"])
                sources[qid] = q.group
    except SearchRLError as e:
        log.warning("no interval for the mean gain: %s", e)
        return None
    groups: dict[str, dict[str, list[float]]] = {}
    for qid, g in gains.items():
        groups.setdefault(sources[qid], {"em": []})["em"].append(sum(g) / len(g))
    interval = grouped_intervals(groups)["avg"]["em"]
    return None if interval is None else interval.bounds()


def seeds_summary(base: str | Path, summaries: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """``seeds.json``: per seed before, after, gain and its interval; over seeds mean, min, max."""
    base = Path(base)
    per_seed: dict[str, Any] = {}
    for seed, s in summaries.items():
        g = s.get("gain") or {}
        per_seed[str(seed)] = {
            "out": str(seed_dir(base, seed)),
            "before": g.get("before", (s.get("eval_before") or {}).get("em")),
            "after": g.get("after", (s.get("eval_after") or {}).get("em")),
            "gain": g.get("gain"), "ci95": g.get("ci95"), "n": g.get("n"),
            "datasets": g.get("datasets"), "by_hops": g.get("by_hops"), "wall_seconds": s.get("wall_seconds"),
        }  # fmt: skip
    gains = [r["gain"] for r in per_seed.values() if r["gain"] is not None]
    befores = [r["before"] for r in per_seed.values() if r["before"] is not None]
    afters = [r["after"] for r in per_seed.values() if r["after"] is not None]
    complete = len(gains) == len(per_seed)

    def mean(xs: list[float]) -> float | None:
        return sum(xs) / len(xs) if xs else None

    return {
        "metric": "em",
        "seeds": [int(s) for s in per_seed],
        "per_seed": per_seed,
        "before_mean": mean(befores),
        "after_mean": mean(afters),
        "gain": {
            "mean": mean(gains), "min": min(gains, default=None), "max": max(gains, default=None),
            "mean_ci95": _mean_gain_interval(base, list(summaries)) if complete and gains else None,
        },  # fmt: skip
    }


def format_seeds(result: dict[str, Any]) -> str:
    """A markdown table: one row per seed, then the mean."""

    def f(x: float | None, signed: bool = False) -> str:
        return "-" if x is None else f"{x:+.3f}" if signed else f"{x:.3f}"

    def ci(b: list[float] | None) -> str:
        return "-" if not b else f"[{b[0]:+.3f}, {b[1]:+.3f}]"

    def hops(r: dict[str, Any]) -> str:
        by = r.get("by_hops") or {}
        return ", ".join(f"{h}-hop {f(e['before'])} -> {f(e['after'])} ({f(e['gain'], True)})" for h, e in by.items())

    lines = ["| seed | n | EM before | EM after | gain | 95% interval | by hop count |", "|---|---|---|---|---|---|---|"]
    for seed, r in result["per_seed"].items():
        lines.append(f"| {seed} | {r['n'] or '-'} | {f(r['before'])} | {f(r['after'])} | {f(r['gain'], True)} "
                     f"| {ci(r['ci95'])} | {hops(r) or '-'} |")  # fmt: skip
    g = result["gain"]
    lines.append(f"| mean | | {f(result['before_mean'])} | {f(result['after_mean'])} | {f(g['mean'], True)} "
                 f"| {ci(g['mean_ci95'])} | |")  # fmt: skip
    lines.append(f"\nmin gain {f(g['min'], True)}, max gain {f(g['max'], True)} over {len(result['seeds'])} seeds")
    return "\n".join(lines)
