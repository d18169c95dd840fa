"""The study's intervals and paired comparisons (`modelzoo_ext.study.stats`) against their definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from modelzoo_ext.study import stats


@pytest.mark.parametrize(("successes", "n"), [(0, 40), (40, 40), (1, 7), (20, 40), (33, 3270)])
def test_wilson_matches_its_formula_and_contains_the_proportion(successes, n):
    low, high = stats.wilson(successes, n)
    p, z = successes / n, scipy_stats.norm.ppf(0.975)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert low == pytest.approx(max(0.0, centre - half), abs=1e-12)
    assert high == pytest.approx(min(1.0, centre + half), abs=1e-12)
    assert 0.0 <= low <= p <= high <= 1.0  # exactly, also at p = 0 and p = 1 (the plot's error bars)


def test_wilson_known_value():
    # 5 of 10: the textbook Wilson 95% interval (0.2366, 0.7634).
    low, high = stats.wilson(5, 10)
    assert (round(low, 4), round(high, 4)) == (0.2366, 0.7634)


@pytest.mark.parametrize("df", [1, 2, 4, 9, 29, 30])
def test_t95_table_is_students_t(df):
    assert stats.t95(df) == pytest.approx(scipy_stats.t.ppf(0.975, df), abs=1e-3)


def test_over_seeds_is_the_t_interval_of_the_seed_values():
    values = [0.61, 0.64, 0.58]
    estimate = stats.over_seeds(values)
    low, high = scipy_stats.t.interval(0.95, 2, loc=np.mean(values), scale=scipy_stats.sem(values))
    assert estimate.value == pytest.approx(np.mean(values))
    assert (estimate.low, estimate.high) == pytest.approx((low, high), abs=1e-3)
    single = stats.per_example_mean([1, 0, 1, 1])
    assert stats.over_seeds([0.75], single) is single  # one seed: that run's own interval


def test_paired_difference_is_deterministic_and_pairs_the_examples():
    rng = np.random.default_rng(0)
    a = (rng.random(200) < 0.7).astype(float)
    b = a.copy()
    b[:20] = 1 - b[:20]  # differ on 20 examples only
    first, second = stats.paired_difference(a, b), stats.paired_difference(a, b)
    assert first == second  # fixed bootstrap seed: same inputs, same interval
    assert first.value == pytest.approx((a - b).mean()) and first.n == 200
    # Pairing: the spread comes from the 20 differing examples only, far narrower than resampling
    # the two columns independently would give.
    draws = np.random.default_rng(1).integers(0, 200, size=(2, 2000, 200))
    unpaired = np.percentile(a[draws[0]].mean(1) - b[draws[1]].mean(1), [2.5, 97.5])
    assert first.high - first.low < 0.6 * (unpaired[1] - unpaired[0])
    same = stats.paired_difference(a, a)
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="matched"):
        stats.paired_difference(a, b[:-1])


def test_verdict_needs_an_interval_that_excludes_zero_and_enough_examples():
    assert stats.verdict(stats.Estimate(0.05, 0.01, 0.09, 100, "m"), "s2s", "s2d") == "s2s better"
    assert stats.verdict(stats.Estimate(-0.05, -0.09, -0.01, 100, "m"), "s2s", "s2d") == "s2d better"
    assert (
        stats.verdict(stats.Estimate(0.02, -0.01, 0.05, 100, "m"), "s2s", "s2d") == "no detectable difference"
    )
    # Lower is better (a loss): a negative difference favours the first.
    assert stats.verdict(stats.Estimate(-0.1, -0.2, -0.05, 100, "m"), "s2s", "s2d", False) == "s2s better"
    few = stats.Estimate(0.5, 0.4, 0.6, stats.MIN_EXAMPLES_FOR_VERDICT - 1, "m")
    assert stats.verdict(few, "s2s", "s2d").startswith("no verdict")


def test_ratio_weights_examples_by_their_tokens():
    sums, counts = np.array([10.0, 1.0, 4.0]), np.array([5.0, 1.0, 2.0])
    estimate = stats.ratio(sums, counts)
    assert estimate.value == pytest.approx(15.0 / 8.0)  # not the mean of per-example ratios (1.67)
    assert estimate.low <= estimate.value <= estimate.high
