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
  The comparisons that counted F(t) and F(t - 1) are kept and become the mask: keys > t, plus
  the first ties among (keys > t - 1) ^ (keys > t), so the mask costs no further pass.

The result is exact by construction, whatever the guess: the sample only decides how many
counts are needed. After `MAX_PROBES` counts the search gives up and returns None; the caller
then uses the full histograms of `select.ThresholdFinder` (same answer, slower).
`window.py` does the same over all tensors at once (global scope).
"""

from __future__ import annotations

import numpy as np

from modelzoo_ext.masks.select import Threshold
from modelzoo_ext.masks.stream import local_buffer

MAX_KEY = (1 << 15) - 1
SAMPLE_TARGET = 1 << 17  # error of the guessed quantile ~0.14%: under one bf16 key near a median
MAX_PROBES = 12  # about the cost of one full histogram
_SCAN_CHUNK = 1 << 20  # elements per step when looking for the kept ties
KEEP_COMPARISONS = 4  # the latest `keys > v` arrays kept for the masks (the bracketing pair is among them)


def sample_step(numel: int, target: int = SAMPLE_TARGET) -> int:
    """Stride giving about `target` samples out of `numel`."""
    return max(1, numel // target)


def sample_histogram(keys: np.ndarray, step: int) -> np.ndarray:
    """int64 [32768]: counts of every `step`-th key."""
    return np.bincount(keys.reshape(-1)[::step], minlength=MAX_KEY + 1)


def first_count(sample_above: np.ndarray, sample_size: int, fraction: float) -> int:
    """The key c to count first when keeping `fraction` of the keys: F(c) and F(c + 1), and with
    them the threshold, are most likely to bracket the kept count.

    `sample_above[v]` = #(sample > v). The sample's threshold estimate g has F(g) < target <=
    F(g - 1); the true threshold is g or the neighbour across the nearer of those two edges:
    c = g when the target is nearer F(g) (t in {g, g + 1}), else c = g - 1 (t in {g - 1, g}).
    """
    target = fraction * sample_size
    g = int(np.argmax(sample_above < target))  # the smallest v with sample F(v) < target
    at_or_above = sample_above[g - 1] if g else sample_size  # sample F(g - 1)
    return g if target - sample_above[g] < at_or_above - target else g - 1


class CountSearch:
    """Exact per-level thresholds of one tensor's int16 keys from counts of `keys > v`."""

    def __init__(self, keys: np.ndarray, *, step: int) -> None:
        self.flat = keys.reshape(-1)
        counts = sample_histogram(self.flat, step)
        self.sample_size = int(counts.sum())
        self.sample_above = self.sample_size - np.cumsum(counts)  # #(sample > v) for every key v
        self.sampled = np.flatnonzero(counts)  # the keys the sample holds, ascending
        self.counts: dict[int, int] = {-1: self.flat.size, MAX_KEY: 0}
        self.probes = 0
        self._above: dict[int, np.ndarray] = {}  # latest comparisons, oldest first
        self._slots: dict[int, int] = {}  # key -> which reused buffer holds its comparison

    def above(self, key: int) -> int:
        """F(key) = #(keys > key), counted once per key."""
        if key not in self.counts:
            self.counts[key] = int(np.count_nonzero(self._compare(key)))
            self.probes += 1
        return self.counts[key]

    def _compare(self, key: int, pinned: int | None = None) -> np.ndarray:
        """keys > key (bool, flat), kept among the latest few in this thread's reused buffers;
        the comparison for `pinned` is never the one evicted to make room."""
        if key not in self._above:
            if len(self._above) >= KEEP_COMPARISONS:
                oldest = next(k for k in self._above if k != pinned)
                del self._above[oldest]
                del self._slots[oldest]
            slot = min(set(range(KEEP_COMPARISONS)) - set(self._slots.values()))
            self._slots[key] = slot
            buffer = local_buffer(f"above{slot}", self.flat.size, bool)
            self._above[key] = np.greater(self.flat, key, out=buffer)
        return self._above[key]

    def mask(self, threshold: Threshold, present: int) -> np.ndarray:
        """The flat mask for `threshold` (from `threshold()`): keys > t plus its first ties.

        The result is one of this thread's buffers: pack it before asking for the next mask.
        Partly kept ties are located from whichever end is nearer (keys > t plus the first ties,
        or keys >= t less the last ones), scanning only as far as needed.
        """
        above = self._compare(threshold.key)
        if threshold.ties == 0:
            return above
        at_or_above = self._compare(threshold.key - 1, pinned=threshold.key)
        if threshold.ties == present:
            return at_or_above
        if threshold.ties <= present // 2:
            base, other, count, from_end = above, at_or_above, threshold.ties, False
        else:
            base, other, count, from_end = at_or_above, above, present - threshold.ties, True
        positions = _first_differences(base, other, count, from_end)
        for key in [k for k, a in self._above.items() if a is base]:
            del self._above[key], self._slots[key]  # becomes the mask: no longer a comparison
        base[positions] = not from_end
        return base

    def guess(self, kept: int) -> int:
        """The key to count first (see `first_count`)."""
        return first_count(self.sample_above, self.sample_size, kept / self.flat.size)

    def _bounds(self, kept: int) -> tuple[int, int]:
        """The tightest lo < hi among the keys counted so far: F(lo) >= kept > F(hi)."""
        lo = max(k for k, c in self.counts.items() if c >= kept)
        hi = min(k for k, c in self.counts.items() if c < kept)
        return lo, hi

    def threshold(self, kept: int) -> tuple[Threshold, int] | None:
        """(Threshold, ties present at it) for keeping `kept` (0 < kept < numel), or None on give-up.

        Probes walk over the sampled keys (so weights with few distinct values, far apart as
        integers, take as few counts as dense ones): away from the guess in steps that double,
        then halving once the threshold is bracketed (`_split`).
        """
        probe, steps, last, turned = self.guess(kept), _gallop(), None, False
        limit, gap_checked = self.probes + MAX_PROBES, set()
        while True:
            lo, hi = self._bounds(kept)
            if hi == lo + 1:
                break
            if self.probes >= limit:
                return None
            if turned or probe is None or not lo < probe < hi:
                probe = self._split(lo, hi, gap_checked)
            upward = self.above(probe) >= kept  # then t > probe
            turned = turned or (last is not None and upward != last)
            last = upward
            probe = self._sampled_neighbour(probe, next(steps) if upward else -next(steps))
        above = self.counts[hi]
        return Threshold(hi, kept - above), self.counts[lo] - above

    def _sampled_neighbour(self, key: int, step: int) -> int | None:
        """The sampled key `step` places above (below, if negative) `key` in sampled order."""
        index = int(np.searchsorted(self.sampled, key, side="right" if step > 0 else "left"))
        index += step - 1 if step > 0 else step
        return int(self.sampled[index]) if 0 <= index < self.sampled.size else None

    def _split(self, lo: int, hi: int, gap_checked: set) -> int:
        """A key inside (lo, hi): the middle sampled key there; with none sampled, first hi - 1
        (the threshold is usually hi itself, a key that occurs), then the integer midpoint."""
        first, stop = np.searchsorted(self.sampled, [lo + 1, hi])
        if stop > first:
            return int(self.sampled[(first + stop) // 2])
        if hi not in gap_checked:
            gap_checked.add(hi)
            return hi - 1
        return (lo + hi) // 2


def _first_differences(a: np.ndarray, b: np.ndarray, count: int, from_end: bool) -> np.ndarray:
    """The first (or last) `count` positions where `a` and `b` differ, scanning in chunks."""
    found, total, size = [], 0, a.size
    starts = range(0, size, _SCAN_CHUNK)
    for start in reversed(starts) if from_end else starts:
        stop = min(start + _SCAN_CHUNK, size)
        hits = np.flatnonzero(a[start:stop] != b[start:stop]) + start
        found.append(hits)
        total += hits.size
        if total >= count:
            break
    positions = np.concatenate(found) if found else np.zeros(0, dtype=np.int64)
    if from_end:
        return np.sort(positions)[-count:]
    return positions[:count]


def _gallop():
    """Steps away from the guess while it stays on one side: 1, 1, 2, 4, 8, ..."""
    yield 1
    step = 1
    while True:
        yield step
        step *= 2


def tensor_masks(keys: np.ndarray, kept: list[int], *, step: int) -> tuple[list, list[int]] | None:
    """One tensor's exact masks, as producers to call one at a time (each returns a flat bool
    array valid until the next call: pack it first), and each level's threshold key; None on
    give-up."""
    search = CountSearch(keys, step=step)
    producers, threshold_keys = [], []
    for k in kept:
        if k <= 0 or k >= keys.size:
            producers.append(lambda k=k: np.full(keys.size, k > 0))
            threshold_keys.append(0)
            continue
        found = search.threshold(k)
        if found is None:
            return None
        producers.append(lambda found=found: search.mask(*found))
        threshold_keys.append(found[0].key)
    return producers, threshold_keys
