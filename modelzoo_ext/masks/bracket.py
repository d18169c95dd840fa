"""Exact thresholds for one tensor's 15-bit keys (bf16/fp16 magnitudes) from a few exact counts.

A full 32,768-bin histogram costs more per weight than everything else together (`np.bincount`
widens every key to int64), and gathering the keys inside a sampled bracket costs about as
much (a scattered 4% of the keys). Counting `keys > v` is one vectorised comparison. So:

- a strided sample of the keys guesses the threshold key t (the `kept`-th largest);
- exact counts F(v) = #(keys > v) decide it: t is the smallest v with F(v) < kept, so the
  search keeps lo < t <= hi with F(lo) >= kept > F(hi) and probes guesses, then steps that
  double, then halves, until hi = lo + 1. bf16 keys near a threshold each hold ~0.2% of a
  tensor, so the guess is right or one key off: two or three counts per level;
- the ties at t are F(t - 1) - F(t); the first `kept - F(t)` of them (row-major) are kept.

The result is exact by construction, whatever the guess: the sample only decides how many
counts are needed. After `MAX_PROBES` counts the search gives up and returns None; the caller
then uses the full histograms of `select.ThresholdFinder` (same answer, slower).
"""

from __future__ import annotations

import numpy as np

from modelzoo_ext.masks.select import Threshold

MAX_KEY = (1 << 15) - 1
SAMPLE_TARGET = 1 << 16
MAX_PROBES = 12  # about the cost of one full histogram


def sample_step(numel: int, target: int = SAMPLE_TARGET) -> int:
    """Stride giving about `target` samples out of `numel`."""
    return max(1, numel // target)


class CountSearch:
    """Exact per-level thresholds of one tensor's int16 keys from counts of `keys > v`."""

    def __init__(self, keys: np.ndarray, *, step: int) -> None:
        self.flat = keys.reshape(-1)
        self.sample = np.sort(self.flat[::step])
        self.counts: dict[int, int] = {-1: self.flat.size, MAX_KEY: 0}
        self.probes = 0
        self._scratch = np.empty(self.flat.size, dtype=bool)

    def above(self, key: int) -> int:
        """F(key) = #(keys > key), counted once per key."""
        if key not in self.counts:
            np.greater(self.flat, key, out=self._scratch)
            self.counts[key] = int(np.count_nonzero(self._scratch))
            self.probes += 1
        return self.counts[key]

    def guess(self, kept: int) -> int:
        """The sample's estimate of the `kept`-th largest key."""
        position = self.sample.size - round(kept / self.flat.size * self.sample.size)
        return int(self.sample[min(max(position, 0), self.sample.size - 1)])

    def _bounds(self, kept: int) -> tuple[int, int]:
        """The tightest lo < hi among the keys counted so far: F(lo) >= kept > F(hi)."""
        lo = max(k for k, c in self.counts.items() if c >= kept)
        hi = min(k for k, c in self.counts.items() if c < kept)
        return lo, hi

    def threshold(self, kept: int) -> tuple[Threshold, int] | None:
        """(Threshold, ties present at it) for keeping `kept` (0 < kept < numel), or None on give-up."""
        probe, steps, last, turned = self.guess(kept), _gallop(), None, False
        limit = self.probes + MAX_PROBES
        while True:
            lo, hi = self._bounds(kept)
            if hi == lo + 1:
                break
            if self.probes >= limit:
                return None
            if turned or not lo < probe < hi:  # t lies between two counted keys: halve
                probe = (lo + hi) // 2
            upward = self.above(probe) >= kept  # then t > probe
            turned = turned or (last is not None and upward != last)
            last = upward
            probe += next(steps) if upward else -next(steps)
        above = self.counts[hi]
        return Threshold(hi, kept - above), self.counts[lo] - above


def _gallop():
    """Steps away from the guess while it stays on one side: 1, 1, 2, 4, 8, ..."""
    yield 1
    step = 1
    while True:
        yield step
        step *= 2


def tensor_plan(keys: np.ndarray, kept: list[int], *, step: int) -> list[tuple[Threshold, int, int]] | None:
    """Per level (Threshold, ties kept, ties present) for one tensor's int16 keys, or None on give-up."""
    search = CountSearch(keys, step=step)
    plan = []
    for k in kept:
        if k <= 0 or k >= keys.size:
            plan.append((Threshold(0, 0, keep_all=k > 0, keep_none=k <= 0), 0, 0))
            continue
        found = search.threshold(k)
        if found is None:
            return None
        threshold, present = found
        plan.append((threshold, threshold.ties, present))
    return plan
