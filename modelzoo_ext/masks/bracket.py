"""Exact thresholds for 15-bit keys (bf16/fp16 magnitudes) without a full histogram.

A full 32,768-bin histogram costs about as much per weight as everything else together
(`torch.bincount` is serial and widens to int64). Vectorised numpy comparisons are ~10x
cheaper. So: a strided sample of the keys brackets the threshold [lo, hi] (6 standard errors
of the sample quantile either side); exact counts come from one comparison (keys > hi) and a
histogram of the few keys inside the bracket. If the threshold lies outside the bracket (it
practically never does), `plan()` returns None and the caller falls back to the full
histograms of `select.ThresholdFinder`. The result is identical either way: exact counts,
ties by position in sorted-name order.

Lifecycle (same tensors, same names, in any order, each pass):
    finder = BracketFinder([kept_1, ...], numel=total, step=total // 2**22 or 1)
    for name, keys in tensors: finder.add_sample(keys)        # pass A (cheap)
    for name, keys in tensors: finder.add_band(name, keys)    # pass B
    plan = finder.plan()  # name -> [(Threshold, ties kept here, ties present here)], or None
"""

from __future__ import annotations

import math

import numpy as np
import torch

from modelzoo_ext.masks.select import Threshold

MAX_KEY = (1 << 15) - 1
SAMPLE_TARGET = 1 << 16  # per tensor in layer scope


def sample_step(numel: int, target: int = SAMPLE_TARGET) -> int:
    """Stride giving about `target` samples out of `numel`."""
    return max(1, numel // target)


class BracketFinder:
    """Exact per-level thresholds over 15-bit int16 keys from a sample bracket and band counts."""

    def __init__(self, kept: list[int], *, numel: int, step: int) -> None:
        self.kept = kept
        self.numel = numel
        self.step = step
        self.samples: list[np.ndarray] = []
        self.above: dict[str, list[int]] = {}
        self.bands: dict[str, list[np.ndarray]] = {}
        self._brackets: list[tuple[int, int] | None] | None = None

    def add_sample(self, keys: torch.Tensor) -> None:
        """Pass A: keep every `step`-th key."""
        self.samples.append(keys.reshape(-1).numpy()[:: self.step].copy())

    def brackets(self) -> list[tuple[int, int] | None]:
        """Per level (lo, hi) holding the threshold with overwhelming probability; None = keep all/none."""
        if self._brackets is None:
            sample = np.concatenate(self.samples)
            self._brackets = [self._bracket(sample, k) for k in self.kept]
            self.samples = []
        return self._brackets

    def _bracket(self, sample: np.ndarray, kept: int) -> tuple[int, int] | None:
        if kept <= 0 or kept >= self.numel:
            return None
        m, q = sample.size, kept / self.numel
        rank = m * (1.0 - q)  # ascending rank of the threshold within the sample
        margin = 6.0 * math.sqrt(m * q * (1.0 - q)) + 16
        lo_rank, hi_rank = max(0, math.floor(rank - margin)), min(m - 1, math.ceil(rank + margin))
        part = np.partition(sample, [lo_rank, hi_rank])
        lo = int(part[lo_rank]) if lo_rank > 0 else 0
        hi = int(part[hi_rank]) if hi_rank < m - 1 else MAX_KEY
        return lo, hi

    def add_band(self, name: str, keys: torch.Tensor) -> None:
        """Pass B: per level, how many keys lie above the bracket, and a histogram inside it."""
        flat = keys.reshape(-1).numpy()
        self.above[name], self.bands[name] = [], []
        for bracket in self.brackets():
            if bracket is None:
                self.above[name].append(0)
                self.bands[name].append(np.zeros(1, dtype=np.int64))
                continue
            lo, hi = bracket
            self.above[name].append(int(np.count_nonzero(flat > hi)))
            offset = (flat - np.int16(lo)).view(np.uint16)  # keys below lo wrap to large values
            inside = offset[offset <= hi - lo]
            self.bands[name].append(np.bincount(inside, minlength=hi - lo + 1))

    def plan(self) -> dict[str, list[tuple[Threshold, int, int]]] | None:
        """Per tensor and level (Threshold, ties kept here, ties present here); None if a bracket missed."""
        names = sorted(self.above)
        plan: dict[str, list[tuple[Threshold, int, int]]] = {name: [] for name in names}
        for level, (kept, bracket) in enumerate(zip(self.kept, self.brackets(), strict=True)):
            if bracket is None:
                threshold = Threshold(0, 0, keep_all=kept > 0, keep_none=kept <= 0)
                for name in names:
                    plan[name].append((threshold, 0, 0))
                continue
            lo, hi = bracket
            above = sum(self.above[n][level] for n in names)
            band = np.sum([self.bands[n][level] for n in names], axis=0)
            need = kept - above
            if need <= 0 or need > int(band.sum()):
                return None  # the threshold is outside [lo, hi]
            from_top = np.cumsum(band[::-1])
            index = int(np.searchsorted(from_top, need))
            key = hi - index
            threshold = Threshold(key, need - (int(from_top[index]) - int(band[key - lo])))
            budget = threshold.ties
            for name in names:
                present = int(self.bands[name][level][key - lo])
                take = min(budget, present)
                budget -= take
                plan[name].append((threshold, take, present))
        return plan
