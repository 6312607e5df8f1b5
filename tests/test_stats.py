"""The bootstrap against references: the closed-form mean and variance of the bootstrap
distribution, the normal approximation of a proportion's interval on a large sample, exact
enumeration on a tiny one, paired intervals that shrink with correlation, [0, 0] for identical
runs, the stratified macro average, and determinism with a seed."""

from __future__ import annotations

import itertools
import math
from statistics import NormalDist

import numpy as np
import pytest

from searchrl.eval.stats import (
    bootstrap_mean, grouped_intervals, normal_interval, paired_bootstrap, percentile_bounds,
    resample_means, rng_for,
)  # fmt: skip

Z95 = NormalDist().inv_cdf(0.975)


def bernoulli(n: int, p: float, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random(n) < p).astype(float)


def test_replicates_have_the_closed_form_mean_and_variance():
    x = np.random.default_rng(3).normal(2.0, 1.5, size=50)
    reps = resample_means(x, 40000, np.random.default_rng(0))
    # the bootstrap distribution of a mean: E = mean(x), Var = population variance / n
    assert reps.mean() == pytest.approx(x.mean(), abs=0.01)
    assert reps.var() == pytest.approx(x.var() / len(x), rel=0.03)


def test_tiny_sample_matches_exact_enumeration():
    """All 3^3 equally likely resamples of [0, 1, 5]: the Monte Carlo distribution matches it."""
    x = [0.0, 1.0, 5.0]
    exact = np.array([np.mean([x[i] for i in idx]) for idx in itertools.product(range(3), repeat=3)])
    reps = resample_means(x, 60000, np.random.default_rng(1))
    for value in np.unique(exact):
        assert np.mean(np.isclose(reps, value)) == pytest.approx(np.mean(np.isclose(exact, value)), abs=0.006)
    # the exact distribution's 2.5 % and 97.5 % quantiles (a step function: inverted CDF)
    exact_bounds = tuple(float(np.quantile(exact, q, method="inverted_cdf")) for q in (0.025, 0.975))
    assert exact_bounds == (0.0, 5.0) and percentile_bounds(reps) == exact_bounds
    x = [0.0, 1.0, 2.0, 3.0]  # 256 resamples, 1/256 each at the ends: the bounds are inside
    exact = np.array([np.mean([x[i] for i in idx]) for idx in itertools.product(range(4), repeat=4)])
    exact_bounds = tuple(float(np.quantile(exact, q, method="inverted_cdf")) for q in (0.025, 0.975))
    assert percentile_bounds(resample_means(x, 60000, np.random.default_rng(2))) == exact_bounds


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_interval_of_a_proportion_matches_the_normal_approximation(p):
    x = bernoulli(4000, p, seed=int(p * 10))
    ci = bootstrap_mean(x.tolist())
    lo, hi = normal_interval(x.mean(), len(x))
    width = hi - lo
    assert ci.estimate == pytest.approx(x.mean())
    assert ci.low == pytest.approx(lo, abs=0.05 * width) and ci.high == pytest.approx(hi, abs=0.05 * width)
    assert ci.n == 4000


def test_paired_interval_shrinks_when_runs_are_correlated():
    a = bernoulli(1000, 0.5, seed=0)
    flip = bernoulli(1000, 0.1, seed=1).astype(bool)
    correlated = np.where(flip, 1 - a, a)  # B agrees with A on ~90 % of the questions
    independent = bernoulli(1000, 0.5, seed=2)
    near = paired_bootstrap(a.tolist(), correlated.tolist())
    far = paired_bootstrap(a.tolist(), independent.tolist())
    w_near, w_far = near.high - near.low, far.high - far.low
    # closed form of the paired difference's sd: sqrt(var(b - a) / n)
    for ci, b in ((near, correlated), (far, independent)):
        half = Z95 * math.sqrt(np.var(b - a) / len(a))
        assert ci.high - ci.low == pytest.approx(2 * half, rel=0.1)
        assert ci.estimate == pytest.approx(b.mean() - a.mean())
    assert w_near < 0.5 * w_far
    # an unpaired view (two separate intervals) is about as wide as the independent case
    separate = math.hypot(*(bootstrap_mean(v.tolist()).high - bootstrap_mean(v.tolist()).low
                            for v in (a, correlated)))  # fmt: skip
    assert w_near < 0.5 * separate


def test_identical_runs_give_zero_and_shifted_runs_a_point():
    a = bernoulli(300, 0.4, seed=5).tolist()
    same = paired_bootstrap(a, a)
    assert (same.estimate, same.low, same.high) == (0.0, 0.0, 0.0)
    shifted = paired_bootstrap(a, [v + 0.25 for v in a])  # every question +0.25: no spread
    assert shifted.low == pytest.approx(0.25) and shifted.high == pytest.approx(0.25)
    groups = {"nq": a[:100], "hotpotqa": a[100:]}
    assert paired_bootstrap(groups, groups).bounds() == [0.0, 0.0]


def test_seeded_and_deterministic():
    x = np.random.default_rng(0).random(200).tolist()
    assert bootstrap_mean(x, seed=7) == bootstrap_mean(x, seed=7)
    assert bootstrap_mean(x, seed=7) != bootstrap_mean(x, seed=8)
    assert rng_for(1, "nq", "em").random() == rng_for(1, "nq", "em").random()
    # a group's interval does not depend on which other groups are computed alongside it
    alone = grouped_intervals({"nq": {"em": x}})["datasets"]["nq"]["em"]
    together = grouped_intervals({"hp": {"em": x[:50]}, "nq": {"em": x}})["datasets"]["nq"]["em"]
    assert alone == together


def test_macro_average_is_stratified():
    """The average's interval against the closed form of a macro average of independent means."""
    groups = {"a": bernoulli(400, 0.2, 10), "b": bernoulli(900, 0.6, 11), "c": bernoulli(250, 0.45, 12)}
    r = grouped_intervals({g: {"em": v.tolist(), "none": None} for g, v in groups.items()})
    avg = r["avg"]["em"]
    assert avg.estimate == pytest.approx(np.mean([v.mean() for v in groups.values()]))
    assert avg.n == 1550
    sd = math.sqrt(sum(v.var() / len(v) for v in groups.values())) / len(groups)
    assert avg.high - avg.low == pytest.approx(2 * Z95 * sd, rel=0.1)
    assert r["avg"]["none"] is None and r["datasets"]["a"]["none"] is None
    for g, v in groups.items():
        assert r["datasets"][g]["em"].estimate == pytest.approx(v.mean())


def test_bad_inputs():
    with pytest.raises(ValueError, match="pair up"):
        paired_bootstrap([1.0, 0.0], [1.0])
    with pytest.raises(ValueError, match="resamples"):
        bootstrap_mean([1.0], resamples=0)
    with pytest.raises(ValueError, match="no values"):
        bootstrap_mean([])
