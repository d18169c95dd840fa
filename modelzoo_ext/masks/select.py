"""Turn importance scores into exact masks: structures (unstructured, N:M, rows, cols) and scopes.

Scores arrive as integer *keys* whose integer order is the score order (see `scores.py`:
non-negative floats keep their order when their bits are read as integers; bf16/fp16 give
15-bit keys, fp32 31-bit keys). Integer keys make every selection exact and portable:

- Counts are exact: a tensor (or, in global scope, all targeted tensors together) keeps exactly
  `kept_count(numel, sparsity)` elements.
- Ties are broken by position: among equal keys the element that comes first is kept first
  (row-major within a tensor; tensors in sorted-name order in global scope). Masks of several
  sparsity levels computed from the same keys are therefore nested.
- The threshold comes from exact histograms of the key bits (`bracket.py` finds the same
  threshold for one tensor's 15-bit keys from a few exact counts): one 32,768-bin histogram
  for 15-bit keys, a second 65,536-bin histogram of the low bits inside the one high bucket
  that holds the threshold for 31-bit keys (radix select). Histograms add across tensors, so
  the global threshold is found in a streaming pass with bounded memory.

Keys and masks are numpy arrays (no torch needed); `rows`/`cols` rank lines by float64 sums
computed with torch, as the scores they sum are (`scores.line_scores_source`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from modelzoo_ext.errors import UserError

if TYPE_CHECKING:
    import torch

HIGH_BINS = 1 << 15  # key >> LOW_BITS of a 31-bit key, or a whole 15-bit key
LOW_BITS = 16
LOW_BINS = 1 << LOW_BITS
_CHUNK = 1 << 18  # np.bincount widens its input to int64: chunks keep that copy in cache
STRUCTURES = ("unstructured", "N:M", "rows", "cols")


def kept_count(numel: int, sparsity: float) -> int:
    """Elements kept out of `numel` at `sparsity`: numel - round(sparsity * numel)."""
    return numel - round(sparsity * numel)


def check_sparsity(sparsity: float, where: str = "--sparsity") -> float:
    """Refuse a sparsity outside [0, 1)."""
    if not (0.0 <= sparsity < 1.0):
        raise UserError(
            f"sparsity {sparsity} is outside [0, 1)", where=where, fix="pass a fraction such as 0.5"
        )
    return float(sparsity)


@dataclass(frozen=True)
class Structure:
    """A pruning structure: 'unstructured', 'rows', 'cols' or N:M (n kept of every m inputs)."""

    kind: str
    n: int = 0
    m: int = 0

    @classmethod
    def parse(cls, text: str) -> Structure:
        """'unstructured' | 'rows' | 'cols' | 'N:M' such as '2:4'."""
        if text in ("unstructured", "rows", "cols"):
            return cls(text)
        match = re.fullmatch(r"(\d+):(\d+)", text)
        if not match:
            raise UserError(
                f"unknown structure {text!r}", where="--structure", fix="use unstructured, rows, cols or N:M"
            )
        n, m = int(match.group(1)), int(match.group(2))
        if not (0 < n < m):
            raise UserError(
                f"N:M needs 0 < N < M, got {text}", where="--structure", fix="use e.g. 2:4 or 4:8"
            )
        return cls("N:M", n, m)

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "N:M" else self.kind

    @property
    def fixed_sparsity(self) -> float | None:
        """N:M fixes the sparsity at 1 - N/M; other structures take it from the user."""
        return 1.0 - self.n / self.m if self.kind == "N:M" else None


# ---------------------------------------------------------------- thresholds from histograms


def key_bits(keys: np.ndarray) -> int:
    """15 for int16 keys (bf16/fp16 scores), 31 for int32 keys (fp32 scores, random)."""
    if keys.dtype == np.int16:
        return 15
    if keys.dtype == np.int32:
        return 31
    raise TypeError(f"keys must be int16 or int32, got {keys.dtype}")


def _bincount(values: np.ndarray, bins: int) -> np.ndarray:
    """int64 [bins]: counts of non-negative integer `values` (< bins), in cache-sized chunks."""
    flat = values.reshape(-1)
    counts = np.zeros(bins, dtype=np.int64)
    for start in range(0, flat.size, _CHUNK):
        counts += np.bincount(flat[start : start + _CHUNK], minlength=bins)
    return counts


def high_histogram(keys: np.ndarray) -> np.ndarray:
    """int64 [32768]: counts of the top 15 bits of each key."""
    flat = keys.reshape(-1)
    if keys.dtype == np.int32:
        flat = flat >> LOW_BITS
    return _bincount(flat, HIGH_BINS)


def low_histogram(keys: np.ndarray, high: int) -> np.ndarray:
    """int64 [65536]: counts of the low 16 bits of the int32 keys whose top bits equal `high`."""
    flat = keys.reshape(-1)
    inside = flat[(flat >> LOW_BITS) == high]
    return _bincount(inside & (LOW_BINS - 1), LOW_BINS)


def _digit_for_rank(hist: np.ndarray, rank: int) -> tuple[int, int]:
    """The bin d holding the `rank`-th largest element (rank >= 1) and how many lie above it."""
    from_top = np.cumsum(hist[::-1])
    index = int(np.searchsorted(from_top, rank))
    digit = hist.size - 1 - index
    return digit, int(from_top[index]) - int(hist[digit])


@dataclass(frozen=True)
class Threshold:
    """Keep every key > `key`, plus the first `ties` elements (by position) whose key == `key`.

    `keep_all`/`keep_none` cover k == numel and k == 0.
    """

    key: int
    ties: int
    keep_all: bool = False
    keep_none: bool = False


class ThresholdFinder:
    """Exact top-k thresholds over one or more tensors' keys, seen in streaming passes.

    Lifecycle (tensors may come in any order, e.g. shard by shard; each pass sees all of them):
        finder = ThresholdFinder([kept_1, kept_2, ...], bits)   # one kept count per level
        for name, keys in tensors: finder.add_high(name, keys)
        if finder.needs_low_pass():
            for name, keys in tensors: finder.add_low(name, keys)
        plan = finder.plan()   # name -> [(Threshold, ties kept here, ties present here)] per level
        mask, _ = threshold_mask(keys, *plan[name][level])

    Per-tensor histograms are kept (int32, 128 KiB per tensor and pass), so ties at the
    threshold are handed out in sorted-name order whatever order the tensors were read in.
    """

    def __init__(self, kept: list[int], bits: int) -> None:
        self.kept = kept
        self.bits = bits
        self.high: dict[str, np.ndarray] = {}
        self.low: dict[str, dict[int, np.ndarray]] = {}
        self._digits: list[tuple[int, int] | None] | None = None

    def add_high(self, name: str, keys: np.ndarray | None, hist: np.ndarray | None = None) -> None:
        """Count one tensor's keys (pass `hist` when `high_histogram(keys)` is already known)."""
        self.high[name] = (high_histogram(keys) if hist is None else hist).astype(np.int32)

    @property
    def numel(self) -> int:
        return int(sum(int(h.sum(dtype=np.int64)) for h in self.high.values()))

    def total_high(self) -> np.ndarray:
        """int64 [32768]: the summed high histogram."""
        return np.sum(list(self.high.values()), axis=0, dtype=np.int64)

    def high_digits(self) -> list[tuple[int, int] | None]:
        """Per level: (high bin holding the threshold, count above it), or None for keep-all/none."""
        if self._digits is None:
            total, numel = self.total_high(), self.numel
            self._digits = [_digit_for_rank(total, k) if 0 < k < numel else None for k in self.kept]
        return self._digits

    def needs_low_pass(self) -> bool:
        """31-bit keys need a second pass to resolve the low 16 bits."""
        return self.bits > 15 and any(d is not None for d in self.high_digits())

    def add_low(self, name: str, keys: np.ndarray) -> None:
        """Second pass (31-bit keys only): count low bits inside each level's high bucket."""
        self.set_low(name, low_histograms(keys, self.low_buckets()))

    def low_buckets(self) -> set[int]:
        """The high buckets holding a level's threshold (what `low_histograms` must count)."""
        return {d[0] for d in self.high_digits() if d is not None}

    def set_low(self, name: str, histograms: dict[int, np.ndarray]) -> None:
        """Second pass, counted elsewhere (e.g. a worker thread) with `low_histograms`."""
        self.low[name] = {high: h.astype(np.int32) for high, h in histograms.items()}

    def _threshold(self, level: int) -> Threshold:
        k, digit = self.kept[level], self.high_digits()[level]
        if digit is None:
            return Threshold(0, 0, keep_all=k > 0, keep_none=k <= 0)
        high, above = digit
        if self.bits <= 15:
            return Threshold(high, k - above)
        low_total = np.sum([h[high] for h in self.low.values()], axis=0, dtype=np.int64)
        low, above_low = _digit_for_rank(low_total, k - above)
        return Threshold((high << LOW_BITS) | low, k - above - above_low)

    def _ties_in(self, name: str, key: int) -> int:
        if self.bits <= 15:
            return int(self.high[name][key])
        return int(self.low[name][key >> LOW_BITS][key & (LOW_BINS - 1)])

    def plan(self) -> dict[str, list[tuple[Threshold, int, int]]]:
        """name -> per level (Threshold, ties to keep here, ties present here); ties go in sorted-name order."""
        plan: dict[str, list[tuple[Threshold, int, int]]] = {name: [] for name in self.high}
        for level in range(len(self.kept)):
            threshold = self._threshold(level)
            budget = threshold.ties
            for name in sorted(self.high):
                present = (
                    0 if threshold.keep_all or threshold.keep_none else self._ties_in(name, threshold.key)
                )
                take = min(budget, present)
                budget -= take
                plan[name].append((threshold, take, present))
        return plan


def low_histograms(keys: np.ndarray, buckets: set[int]) -> dict[int, np.ndarray]:
    """`low_histogram` of `keys` for each high bucket in `buckets`."""
    return {high: low_histogram(keys, high) for high in buckets}


def threshold_mask(
    keys: np.ndarray, threshold: Threshold, ties_budget: int, ties_present: int | None = None
) -> tuple[np.ndarray, int]:
    """Bool mask of keys above the threshold plus the first `ties_budget` ties (row-major order).

    Returns (mask, ties used). `ties_present` (how many keys equal the threshold, known from
    the histograms) saves locating the ties when all of them are kept.
    """
    if threshold.keep_all:
        return np.ones(keys.shape, dtype=bool), 0
    if threshold.keep_none:
        return np.zeros(keys.shape, dtype=bool), 0
    flat = keys.reshape(-1)
    if ties_budget <= 0:
        return (flat > threshold.key).reshape(keys.shape), 0
    if ties_present is not None and ties_budget >= ties_present:
        return (flat >= threshold.key).reshape(keys.shape), ties_present
    mask = flat > threshold.key
    ties = np.flatnonzero(flat == threshold.key)[:ties_budget]
    mask[ties] = True
    return mask.reshape(keys.shape), int(ties.size)


# ---------------------------------------------------------------- structured selections


def _top_along_last(keys: np.ndarray, kept: int) -> np.ndarray:
    """Keep the `kept` largest keys along the last dim (stable: ties to the lower index)."""
    mask = np.zeros(keys.shape, dtype=bool)
    if kept > 0:
        descending = np.negative(keys, dtype=np.float64 if keys.dtype.kind == "f" else np.int64)
        order = np.argsort(descending, axis=-1, kind="stable")
        np.put_along_axis(mask, order[..., :kept], True, axis=-1)
    return mask


def per_row_mask(keys: np.ndarray, sparsity: float) -> np.ndarray:
    """Each output row keeps exactly its share of its own inputs (Wanda's comparison group)."""
    return _top_along_last(keys, kept_count(keys.shape[1], sparsity))


def n_m_mask(keys: np.ndarray, n: int, m: int, *, name: str = "") -> np.ndarray:
    """Exactly n kept of every m consecutive inputs of each row; keys [out, in] with in % m == 0."""
    out_features, in_features = keys.shape
    if in_features % m:
        raise UserError(
            f"N:M needs the input dimension divisible by M: {in_features} % {m} != 0",
            where=name,
            fix="choose M dividing the input size, or exclude this tensor",
        )
    groups = keys.reshape(out_features, in_features // m, m)
    return _top_along_last(groups, n).reshape(out_features, in_features)


def line_mask(line_scores: np.ndarray, sparsity: float) -> np.ndarray:
    """Bool [lines]: keep the best-scoring whole lines (rows or columns), ties to the lower index."""
    return _top_along_last(line_scores, kept_count(line_scores.size, sparsity))


def rows_mask(scores: torch.Tensor, sparsity: float) -> np.ndarray:
    """Whole output rows kept or pruned; a row's score is the float64 sum of its element scores."""
    keep = line_mask(scores.double().sum(dim=1).numpy(), sparsity)
    return np.repeat(keep[:, None], scores.shape[1], axis=1)


def cols_mask(scores: torch.Tensor, sparsity: float) -> np.ndarray:
    """Whole input columns kept or pruned; a column's score is the float64 sum of its scores."""
    keep = line_mask(scores.double().sum(dim=0).numpy(), sparsity)
    return np.repeat(keep[None, :], scores.shape[0], axis=0)
