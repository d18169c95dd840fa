"""Intervals and paired comparisons for the study's numbers: one place, stated methods.

- One run's score on n examples: the mean of its per-example scores with a 95% interval; for 0/1
  scores (accuracy, exact match) the Wilson score interval, which stays inside [0, 1] and is honest
  at small n (40 questions: +-15 points at 50%); otherwise mean +- t * standard error.
- Several seeds of one grid point: the mean over seeds, with a t interval over the seed means
  (seed-to-seed spread); with one seed, that run's own interval.
- Two modes on the same examples (s2s vs s2d, each vs dense LoRA): the paired difference of
  per-example scores (averaged over the seeds both have), with a paired bootstrap 95% interval
  (2,000 resamples of the examples, percentile method, fixed seed: the same inputs give the same
  interval). An interval that covers zero reads "no detectable difference"; with fewer than 30
  examples no verdict is given at all.
- A loss per token over examples of different lengths: the ratio of summed loss to summed tokens,
  with a bootstrap interval over examples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 20251130
MIN_EXAMPLES_FOR_VERDICT = 30  # below this, bootstrap intervals of a paired difference are not trusted
# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (beyond: the normal's).
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip


@dataclass(frozen=True)
class Estimate:
    """A value with its 95% interval, how it was computed, and over how many units."""

    value: float
    low: float
    high: float
    n: int
    method: str

    def covers(self, x: float) -> bool:
        return self.low <= x <= self.high

    def as_record(self) -> dict:
        return {"value": self.value, "ci95": [self.low, self.high], "n": self.n, "method": self.method}

    def __str__(self) -> str:
        return f"{self.value:.4f} [{self.low:.4f}, {self.high:.4f}]"


def t95(df: int) -> float:
    """The two-sided 95% quantile of Student's t with `df` degrees of freedom."""
    return _T95[df - 1] if 1 <= df <= len(_T95) else Z95


def wilson(successes: float, n: int) -> tuple[float, float]:
    """Wilson score 95% interval of a proportion."""
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    denominator = 1 + Z95**2 / n
    centre = (p + Z95**2 / (2 * n)) / denominator
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / denominator
    # The interval contains p in exact arithmetic; at p = 0 or 1 rounding could put p outside by ~1e-17.
    return (min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half)))


def per_example_mean(scores: np.ndarray | list[float]) -> Estimate:
    """One run: mean of per-example scores; Wilson for 0/1 scores, else mean +- t * s / sqrt(n)."""
    x = np.asarray(scores, dtype=np.float64)
    n = len(x)
    mean = float(x.mean()) if n else math.nan
    if n and np.isin(x, (0.0, 1.0)).all():
        low, high = wilson(float(x.sum()), n)
        return Estimate(mean, low, high, n, "Wilson 95% interval over examples")
    if n < 2:
        return Estimate(mean, math.nan, math.nan, n, "single value")
    half = t95(n - 1) * float(x.std(ddof=1)) / math.sqrt(n)
    return Estimate(mean, mean - half, mean + half, n, "t 95% interval over examples")


def over_seeds(values: list[float], single: Estimate | None = None) -> Estimate:
    """Several seeds: mean and t interval over the seed values; one seed: `single` (its run's interval)."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 1 and single is not None:
        return single
    mean = float(x.mean())
    if len(x) < 2:
        return Estimate(mean, math.nan, math.nan, len(x), "one seed, no interval")
    half = t95(len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return Estimate(mean, mean - half, mean + half, len(x), f"t 95% interval over {len(x)} seeds")


def _bootstrap_indices(n: int, resamples: int) -> np.ndarray:
    return np.random.default_rng(BOOTSTRAP_SEED).integers(0, n, size=(resamples, n))


def paired_difference(a: np.ndarray, b: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES) -> Estimate:
    """mean(a - b) over matched examples with a paired bootstrap 95% interval (percentile)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired scores must be two matched 1-D arrays, got {a.shape} and {b.shape}")
    diff = a - b
    n = len(diff)
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0, "no shared examples")
    means = diff[_bootstrap_indices(n, resamples)].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return Estimate(float(diff.mean()), float(low), float(high), n, f"paired bootstrap over {n} examples")


def ratio(sums: np.ndarray, counts: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES) -> Estimate:
    """sum(sums) / sum(counts) (e.g. loss per token) with a bootstrap 95% interval over examples."""
    sums, counts = np.asarray(sums, dtype=np.float64), np.asarray(counts, dtype=np.float64)
    n = len(sums)
    value = float(sums.sum() / counts.sum())
    if n < 2:
        return Estimate(value, math.nan, math.nan, n, "single example")
    idx = _bootstrap_indices(n, resamples)
    ratios = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
    low, high = np.percentile(ratios, [2.5, 97.5])
    return Estimate(value, float(low), float(high), n, f"bootstrap over {n} examples")


def paired_ratio_difference(
    sums_a: np.ndarray, sums_b: np.ndarray, counts: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES
) -> Estimate:
    """(sum a - sum b) / sum counts over matched examples (same tokens), paired bootstrap interval."""
    diff, counts = np.asarray(sums_a, float) - np.asarray(sums_b, float), np.asarray(counts, float)
    n = len(diff)
    value = float(diff.sum() / counts.sum())
    idx = _bootstrap_indices(n, resamples)
    values = diff[idx].sum(axis=1) / counts[idx].sum(axis=1)
    low, high = np.percentile(values, [2.5, 97.5])
    return Estimate(value, float(low), float(high), n, f"paired bootstrap over {n} examples")


def verdict(difference: Estimate, first: str, second: str, higher_is_better: bool = True) -> str:
    """ "no detectable difference" when the interval covers 0; else which side is better; no
    verdict below `MIN_EXAMPLES_FOR_VERDICT` examples (the bootstrap interval is not trusted there)."""
    if difference.n < MIN_EXAMPLES_FOR_VERDICT:
        return f"no verdict (fewer than {MIN_EXAMPLES_FOR_VERDICT} examples)"
    if math.isnan(difference.low) or difference.covers(0.0):
        return "no detectable difference"
    better_first = (difference.value > 0) == higher_is_better
    return f"{first} better" if better_first else f"{second} better"
