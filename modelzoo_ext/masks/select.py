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
  threshold for 15-bit keys with fewer, cheaper passes): one 32,768-bin histogram for
  15-bit keys, a second 65,536-bin histogram of the low bits inside the one high bucket that
  holds the threshold for 31-bit keys (radix select). Histograms add across tensors, so the
  global threshold is found in a streaming pass with bounded memory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from modelzoo_ext.errors import UserError

HIGH_BINS = 1 << 15  # key >> LOW_BITS of a 31-bit key, or a whole 15-bit key
LOW_BITS = 16
LOW_BINS = 1 << LOW_BITS
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


def key_bits(keys: torch.Tensor) -> int:
    """15 for int16 keys (bf16/fp16 scores), 31 for int32 keys (fp32 scores, random)."""
    if keys.dtype == torch.int16:
        return 15
    if keys.dtype == torch.int32:
        return 31
    raise TypeError(f"keys must be int16 or int32, got {keys.dtype}")


def high_histogram(keys: torch.Tensor) -> torch.Tensor:
    """int64 [32768]: counts of the top 15 bits of each key."""
    flat = keys.reshape(-1)
    if keys.dtype == torch.int32:
        flat = flat >> LOW_BITS
    return torch.bincount(flat, minlength=HIGH_BINS)


def low_histogram(keys: torch.Tensor, high: int) -> torch.Tensor:
    """int64 [65536]: counts of the low 16 bits of the int32 keys whose top bits equal `high`."""
    flat = keys.reshape(-1)
    inside = flat[(flat >> LOW_BITS) == high]
    return torch.bincount(inside & (LOW_BINS - 1), minlength=LOW_BINS)


def _digit_for_rank(hist: torch.Tensor, rank: int) -> tuple[int, int]:
    """The bin d holding the `rank`-th largest element (rank >= 1) and how many lie above it."""
    from_top = torch.flip(hist, [0]).cumsum(0)
    index = int(torch.searchsorted(from_top, torch.tensor(rank, dtype=from_top.dtype)))
    digit = hist.numel() - 1 - index
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
        self.high: dict[str, torch.Tensor] = {}
        self.low: dict[str, dict[int, torch.Tensor]] = {}
        self._digits: list[tuple[int, int] | None] | None = None

    def add_high(self, name: str, keys: torch.Tensor, hist: torch.Tensor | None = None) -> None:
        """Count one tensor's keys (pass `hist` when `high_histogram(keys)` is already known)."""
        self.high[name] = (high_histogram(keys) if hist is None else hist).to(torch.int32)

    @property
    def numel(self) -> int:
        return int(sum(int(h.sum(dtype=torch.int64)) for h in self.high.values()))

    def total_high(self) -> torch.Tensor:
        """int64 [32768]: the summed high histogram."""
        return torch.stack(list(self.high.values())).sum(dim=0, dtype=torch.int64)

    def high_digits(self) -> list[tuple[int, int] | None]:
        """Per level: (high bin holding the threshold, count above it), or None for keep-all/none."""
        if self._digits is None:
            total, numel = self.total_high(), self.numel
            self._digits = [_digit_for_rank(total, k) if 0 < k < numel else None for k in self.kept]
        return self._digits

    def needs_low_pass(self) -> bool:
        """31-bit keys need a second pass to resolve the low 16 bits."""
        return self.bits > 15 and any(d is not None for d in self.high_digits())

    def add_low(self, name: str, keys: torch.Tensor) -> None:
        """Second pass (31-bit keys only): count low bits inside each level's high bucket."""
        buckets = {d[0] for d in self.high_digits() if d is not None}
        self.low[name] = {high: low_histogram(keys, high).to(torch.int32) for high in buckets}

    def _threshold(self, level: int) -> Threshold:
        k, digit = self.kept[level], self.high_digits()[level]
        if digit is None:
            return Threshold(0, 0, keep_all=k > 0, keep_none=k <= 0)
        high, above = digit
        if self.bits <= 15:
            return Threshold(high, k - above)
        low_total = torch.stack([h[high] for h in self.low.values()]).sum(dim=0, dtype=torch.int64)
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


def threshold_mask(
    keys: torch.Tensor, threshold: Threshold, ties_budget: int, ties_present: int | None = None
) -> tuple[torch.Tensor, int]:
    """Bool mask of keys above the threshold plus the first `ties_budget` ties (row-major order).

    Returns (mask, ties used). `ties_present` (how many keys equal the threshold, known from
    the histograms) saves locating the ties when all of them are kept. The comparisons run in
    numpy, whose vectorised int16/int32 compares were ~10x faster than torch's here.
    """
    if threshold.keep_all:
        return torch.ones(keys.shape, dtype=torch.bool), 0
    if threshold.keep_none:
        return torch.zeros(keys.shape, dtype=torch.bool), 0
    flat = keys.reshape(-1).numpy()
    if ties_budget <= 0:
        return torch.from_numpy(flat > threshold.key).reshape(keys.shape), 0
    if ties_present is not None and ties_budget >= ties_present:
        return torch.from_numpy(flat >= threshold.key).reshape(keys.shape), ties_present
    mask = flat > threshold.key
    ties = np.flatnonzero(flat == threshold.key)[:ties_budget]
    mask[ties] = True
    return torch.from_numpy(mask).reshape(keys.shape), int(ties.size)


def top_k_mask(keys: torch.Tensor, kept: int) -> torch.Tensor:
    """Exactly `kept` True entries at the largest keys, ties to the earliest positions."""
    finder = ThresholdFinder([kept], key_bits(keys))
    finder.add_high("", keys)
    if finder.needs_low_pass():
        finder.add_low("", keys)
    ((cut),) = finder.plan()[""]
    return threshold_mask(keys, *cut)[0]


# ---------------------------------------------------------------- structured selections


def _top_along_last(keys: torch.Tensor, kept: int) -> torch.Tensor:
    """Keep the `kept` largest keys along the last dim (stable: ties to the lower index)."""
    mask = torch.zeros(keys.shape, dtype=torch.bool)
    if kept > 0:
        order = torch.sort(keys, dim=-1, descending=True, stable=True).indices
        mask.scatter_(-1, order[..., :kept], True)
    return mask


def per_row_mask(keys: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Each output row keeps exactly its share of its own inputs (Wanda's comparison group)."""
    return _top_along_last(keys, kept_count(keys.shape[1], sparsity))


def n_m_mask(keys: torch.Tensor, n: int, m: int, *, name: str = "") -> torch.Tensor:
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


def line_mask(line_scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Bool [lines]: keep the best-scoring whole lines (rows or columns), ties to the lower index."""
    return _top_along_last(line_scores, kept_count(line_scores.numel(), sparsity))


def rows_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Whole output rows kept or pruned; a row's score is the float64 sum of its element scores."""
    keep = line_mask(scores.double().sum(dim=1), sparsity)
    return keep[:, None].expand(scores.shape).clone()


def cols_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Whole input columns kept or pruned; a column's score is the float64 sum of its scores."""
    keep = line_mask(scores.double().sum(dim=0), sparsity)
    return keep[None, :].expand(scores.shape).clone()
