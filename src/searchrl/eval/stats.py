"""Bootstrap confidence intervals for evaluation metrics, plain and paired.

Every score the evaluation reports is a mean over questions (per dataset) or a macro average of
such means (over datasets). Its uncertainty comes from which questions were drawn, so intervals
are percentile bootstrap intervals over questions:

* :func:`resample_means`: ``resamples`` means of a vector, each over ``n`` values drawn with
  replacement (the replicates);
* :func:`grouped_intervals`: per group (dataset) and metric, the mean and its interval, and for the
  macro average over groups an interval from the same replicates (each group is resampled within
  itself, a stratified bootstrap, so every replicate keeps each dataset's size);
* :func:`bootstrap_mean` / :func:`paired_bootstrap`: the same for one statistic. A *paired*
  interval of ``B - A`` resamples the per-question differences, so what the two runs share (easy
  and hard questions) cancels out: it is narrower than comparing two separate intervals when the
  runs are correlated, and exactly ``[0, 0]`` for identical runs.

Randomness is a seeded NumPy generator per (seed, group, number of values): the metrics of one
dataset share their resamples (the same questions drawn), an interval does not change when other
datasets or metrics are added, and the same call always gives the same numbers.
``DEFAULT_RESAMPLES`` (2,000) puts the Monte Carlo error of a 95 % percentile bound at about 1 % of
the interval's width.

Left out: BCa and studentized intervals, significance tests and multiple-comparison corrections,
and variance between training seeds (an interval here is over questions for fixed runs).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_RESAMPLES = 2000
DEFAULT_SEED = 0
LEVEL = 0.95
_CHUNK_VALUES = 1 << 22  # values gathered at a time (bounds memory for large evaluations)


@dataclass(frozen=True)
class Interval:
    """A statistic (``estimate``) with its bootstrap interval ``[low, high]`` over ``n`` questions."""

    estimate: float
    low: float
    high: float
    n: int

    def bounds(self, digits: int = 6) -> list[float]:
        """``[low, high]`` rounded for JSON."""
        return [round(self.low, digits), round(self.high, digits)]


def bootstrap_settings(resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                       level: float = LEVEL) -> dict[str, object]:
    """How intervals were made, as recorded next to them in JSON outputs."""
    return {"method": "percentile", "level": level, "resamples": resamples, "seed": seed,
            "unit": "question", "avg": "each dataset resampled within itself, then macro-averaged"}


def _check(resamples: int, level: float) -> None:
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")


def rng_for(seed: int, *names: str) -> np.random.Generator:
    """A generator seeded by ``seed`` and ``names`` (e.g. dataset and metric): stable across runs
    and independent of which other names are drawn."""
    return np.random.default_rng([seed, *(zlib.crc32(n.encode()) for n in names)])


def resample_means(values: Sequence[float] | np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Means of ``resamples`` bootstrap samples of ``values`` (``n`` draws with replacement each).

    values: (n,) or (n, k) with n >= 1: the columns of a matrix share the draws (same questions).
    Returns (resamples,) or (resamples, k).
    """
    x = np.asarray(values, dtype=np.float64)
    cols = x.reshape(x.shape[0], -1).T.copy()  # (k, n): contiguous columns
    n = cols.shape[1]
    if n == 0:
        raise ValueError("cannot resample an empty vector")
    out = np.empty((resamples, cols.shape[0]), dtype=np.float64)
    step = max(1, _CHUNK_VALUES // n)
    for start in range(0, resamples, step):
        b = min(step, resamples - start)
        idx = rng.integers(0, n, size=(b, n), dtype=np.int64 if n > 2**31 - 1 else np.int32)  # (b, n)
        for j, col in enumerate(cols):
            out[start : start + b, j] = col[idx].mean(axis=1)
    return out if x.ndim > 1 else out[:, 0]


def percentile_bounds(replicates: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the replicates."""
    lo, hi = np.quantile(replicates, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def grouped_intervals(
    groups: Mapping[str, Mapping[str, Sequence[float] | None]],
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    level: float = LEVEL,
) -> dict[str, dict[str, Interval | None]]:
    """Intervals of each group's mean and of their macro average, per metric.

    groups: ``{group: {metric: per-question values}}``; a metric whose values are ``None`` or
    empty in a group has no interval there (``None``) and is left out of that metric's average,
    as :func:`searchrl.eval.runner.macro_average` leaves it out of the mean. Returns
    ``{"datasets": {group: {metric: Interval | None}}, "avg": {metric: Interval | None}}``; the
    average's ``n`` is the number of values over the groups that count.

    >>> r = grouped_intervals({"a": {"em": [1.0, 1.0]}, "b": {"em": [0.0, 0.0, 0.0]}})
    >>> r["avg"]["em"]
    Interval(estimate=0.5, low=0.5, high=0.5, n=5)
    """
    _check(resamples, level)
    per_group: dict[str, dict[str, Interval | None]] = {}
    reps: dict[str, list[tuple[np.ndarray, float, int]]] = {}
    for name, metrics in groups.items():
        per_group[name] = {m: None for m in metrics}
        by_size: dict[int, list[str]] = {}  # metrics over the same questions share the draws
        for metric, values in metrics.items():
            if values is not None and len(values) > 0:
                by_size.setdefault(len(values), []).append(metric)
        for n, names in by_size.items():
            x = np.column_stack([np.asarray(metrics[m], dtype=np.float64) for m in names])  # (n, k)
            r = resample_means(x, resamples, rng_for(seed, name, str(n)))  # (resamples, k)
            for j, metric in enumerate(names):
                mean = float(x[:, j].mean())
                per_group[name][metric] = Interval(mean, *percentile_bounds(r[:, j], level), n)
                reps.setdefault(metric, []).append((r[:, j], mean, n))
    avg: dict[str, Interval | None] = {}
    for metric in dict.fromkeys(m for ms in groups.values() for m in ms):
        parts = reps.get(metric)
        if not parts:
            avg[metric] = None
            continue
        macro = np.mean([r for r, _, _ in parts], axis=0)  # (resamples,)
        estimate = sum(e for _, e, _ in parts) / len(parts)
        avg[metric] = Interval(estimate, *percentile_bounds(macro, level), sum(n for _, _, n in parts))
    return {"datasets": per_group, "avg": avg}


def bootstrap_mean(
    values: Sequence[float] | Mapping[str, Sequence[float]],
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    level: float = LEVEL,
) -> Interval:
    """Interval of the mean of ``values``, or of the macro average when given ``{group: values}``.

    >>> bootstrap_mean([1.0, 0.0, 1.0, 1.0]).estimate
    0.75
    """
    groups = values if isinstance(values, Mapping) else {"all": values}
    result = grouped_intervals({g: {"value": v} for g, v in groups.items()}, resamples, seed, level)
    interval = result["avg"]["value"]
    if interval is None:
        raise ValueError("no values to bootstrap")
    return interval


def paired_bootstrap(
    a: Sequence[float] | Mapping[str, Sequence[float]],
    b: Sequence[float] | Mapping[str, Sequence[float]],
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    level: float = LEVEL,
) -> Interval:
    """Interval of ``mean(b) - mean(a)`` over paired questions (position ``i`` of ``a`` and ``b`` is
    the same question), resampling the questions; with ``{group: values}`` the macro average of
    the per-group differences.

    >>> paired_bootstrap([0.0, 1.0, 1.0], [0.0, 1.0, 1.0])
    Interval(estimate=0.0, low=0.0, high=0.0, n=3)
    """
    ga = a if isinstance(a, Mapping) else {"all": a}
    gb = b if isinstance(b, Mapping) else {"all": b}
    if list(ga) != list(gb):
        raise ValueError(f"paired groups differ: {list(ga)} vs {list(gb)}")
    diffs = {}
    for g in ga:
        xa, xb = np.asarray(ga[g], dtype=np.float64), np.asarray(gb[g], dtype=np.float64)
        if xa.shape != xb.shape:
            raise ValueError(f"group {g!r}: {len(xa)} values in a, {len(xb)} in b (they must pair up)")
        diffs[g] = xb - xa
    return bootstrap_mean(diffs, resamples, seed, level)


def normal_interval(p: float, n: int, level: float = LEVEL) -> tuple[float, float]:
    """The normal-approximation (Wald) interval of a proportion: a reference for tests and docs.

    >>> [round(x, 3) for x in normal_interval(0.5, 100)]
    [0.402, 0.598]
    """
    from statistics import NormalDist

    z = NormalDist().inv_cdf((1 + level) / 2)
    half = z * math.sqrt(p * (1 - p) / n)
    return p - half, p + half
