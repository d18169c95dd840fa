"""Global scope, bf16/fp16 magnitudes: exact thresholds over all tensors in one pass.

A 4 MB sample (`sample_chunks`: pages spread evenly over the targeted bytes, read before the
pass) guesses each level's threshold key (`bracket.first_count`). The one pass over the weights
then counts, in every tensor, the keys above a small window around the guess (kept as packed
bits: they are in the mask whatever the exact threshold) and those inside it (positions and
offsets: about 1% of bf16 keys, 0.6-1.4% of a Gaussian weight's at 30-90% sparsity). The exact totals then decide the threshold inside the window
and every mask follows without reading the weights again, ties going to tensors in sorted-name
order (`GlobalCounts.finish`). If the threshold lies outside the window (the sample off by
more than `WINDOW` keys), `finish` says so and the caller counts full key histograms instead
(`select.ThresholdFinder`): the same masks, two more passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from modelzoo_ext.masks.bracket import MAX_KEY, first_count
from modelzoo_ext.masks.stream import local_buffer
from modelzoo_ext.safetensors_file import TensorEntry

SAMPLE_CHUNKS = 1024  # pieces read before the pass: ~2M keys, 4 MB
SAMPLE_CHUNK_BYTES = 4096
WINDOW = 1  # keys counted either side of a guessed threshold c (c - 1 .. c + 2)


def sample_chunks(entries: list[TensorEntry], count: int = SAMPLE_CHUNKS) -> list[TensorEntry]:
    """`count` small pieces spread evenly over the targeted tensors' bytes, as entries to read.

    Evenly over the concatenated bytes, so every weight is equally likely to be sampled whatever
    its tensor's size; a piece is one page (4 KiB), cheap to read even from a cold disk.
    """
    total = sum(e.nbytes for e in entries)
    stride = max(total // count, SAMPLE_CHUNK_BYTES)
    pieces, start = [], 0
    for entry in entries:
        first = -(-start // stride) * stride - start  # the first sampled offset inside this tensor
        for offset in range(first, entry.nbytes, stride):
            size = min(SAMPLE_CHUNK_BYTES, entry.nbytes - offset) & ~1  # whole 16-bit keys
            begin = entry.begin + (offset & ~1)
            if size:
                pieces.append(
                    TensorEntry(entry.name, entry.shard, "int16", (size // 2,), begin, begin + size)
                )
        start += entry.nbytes
    return pieces


@dataclass
class Window:
    """One tensor's keys around a guessed global threshold: keys > hi as packed bits, and the
    positions (ascending) of the keys in [lo, hi] with their offsets from lo."""

    above: np.ndarray  # packed little-endian bits of keys > hi
    above_count: int
    positions: np.ndarray
    offsets: np.ndarray  # uint8: key - lo


def count_window(keys: np.ndarray, lo: int, hi: int) -> Window:
    """What `GlobalCounts` needs of one tensor for one window [lo, hi] (run on a worker)."""
    flat = keys.reshape(-1)
    above_bits = np.greater(flat, hi, out=local_buffer("window-above", flat.size, bool))
    above, above_count = np.packbits(above_bits, bitorder="little"), int(np.count_nonzero(above_bits))
    inside = np.greater(flat, lo - 1, out=local_buffer("window-inside", flat.size, bool))
    np.logical_xor(inside, above_bits, out=inside)  # lo <= key <= hi
    positions = np.flatnonzero(inside)
    positions = positions.astype(np.int32) if flat.size < 2**31 else positions
    return Window(above, above_count, positions, (flat[positions] - lo).astype(np.uint8))


class GlobalCounts:
    """Exact global thresholds of 15-bit keys in one pass over the weights, which also makes the masks.

    Lifecycle:
        counts = GlobalCounts(kept, numel, sample)   # sample: keys of `sample_chunks` (a few MB)
        for every tensor (one pass): counts.add(name, shape, {w: count_window(keys, *w) for w in counts.windows()})
        masks = counts.finish()   # name -> per level (packed mask, kept, threshold key); None on a miss
        # (call each level's `packed()`: setting the bits is left to the caller's threads)

    The sample guesses each level's threshold; the pass counts, in every tensor, the keys above
    a window of `WINDOW` keys either side of the guess (kept as packed bits) and those inside
    it (positions and values: about 1% of bf16 keys). When the exact totals put the threshold
    inside the window, every mask follows without reading the weights again, ties going to
    tensors in sorted-name order. On a miss (the sample off by more than the window) the caller
    counts full key histograms instead (`select.ThresholdFinder`): the same masks, two more passes.
    """

    def __init__(self, kept: list[int], numel: int, sample: np.ndarray) -> None:
        self.kept = kept
        self.numel = numel
        histogram = np.bincount(sample, minlength=MAX_KEY + 1)
        self.sample_size = int(histogram.sum())
        self.sample_above = self.sample_size - np.cumsum(histogram)
        self.tensors: dict[str, dict[tuple[int, int], Window]] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}

    def windows(self) -> dict[int, tuple[int, int]]:
        """Level -> window [lo, hi] around its guessed threshold (levels keeping some, not all)."""
        windows = {}
        for level, kept in enumerate(self.kept):
            if 0 < kept < self.numel and self.sample_size:
                c = first_count(self.sample_above, self.sample_size, kept / self.numel)
                windows[level] = (max(c - WINDOW, 0), min(c + 1 + WINDOW, MAX_KEY))
        return windows

    def held_bytes(self) -> int:
        """What the pass will hold until `finish`, estimated from the sample: per distinct window,
        the packed bits of every weight plus 5 bytes (int32 position, uint8 offset) per key inside it."""
        held = 0
        for lo, hi in set(self.windows().values()):
            above_lo = self.sample_above[lo - 1] if lo else self.sample_size
            inside = (above_lo - self.sample_above[hi]) / max(self.sample_size, 1)
            held += int(self.numel * (1 / 8 + 5 * inside))
        return held

    def add(self, name: str, shape: tuple[int, ...], windows: dict[tuple[int, int], Window]) -> None:
        """One tensor's `count_window` for every window."""
        self.tensors[name] = windows
        self.shapes[name] = shape

    def finish(self) -> dict[str, list[LevelMask]] | None:
        """name -> per level `LevelMask`; None when a window missed."""
        names = sorted(self.tensors)
        result: dict[str, list[LevelMask]] = {name: [] for name in names}
        windows = self.windows()
        shared = {w for w in windows.values() if list(windows.values()).count(w) > 1}
        for level, kept in enumerate(self.kept):
            if level in windows:
                plan = self._level(names, windows[level], kept, copy=windows[level] in shared)
            elif 0 < kept < self.numel:
                return None  # no sample to guess from
            else:  # keep all or nothing
                plan = [self._constant(name, kept > 0) for name in names]
            if plan is None:
                return None
            for name, mask in zip(names, plan, strict=True):
                result[name].append(mask)
        return result

    def _constant(self, name: str, keep: bool) -> LevelMask:
        numel = int(np.prod(self.shapes[name]))
        packed = np.packbits(np.full(numel, keep), bitorder="little")
        return LevelMask(packed, np.zeros(0, dtype=np.int64), numel if keep else 0, 0, copy=False)

    def _level(
        self, names: list[str], window: tuple[int, int], kept: int, copy: bool
    ) -> list[LevelMask] | None:
        lo, hi = window
        counted = [self.tensors[name][window] for name in names]
        above_hi = sum(w.above_count for w in counted)  # F(hi)
        inside = np.sum([np.bincount(w.offsets, minlength=hi - lo + 1) for w in counted], axis=0)
        above = above_hi + np.cumsum(inside[::-1])[::-1] - inside  # F(v) for v = lo..hi
        if not above_hi < kept <= above[0] + inside[0]:  # F(hi) < kept <= F(lo - 1)
            return None
        key = lo + int(np.argmax(above < kept))  # the smallest v with F(v) < kept
        budget = kept - int(above[key - lo])
        plan = []
        for w in counted:
            ties = w.positions[w.offsets == key - lo]
            take = min(budget, ties.size)
            budget -= take
            extra = np.concatenate([w.positions[w.offsets > key - lo], ties[:take]])
            plan.append(LevelMask(w.above, extra, w.above_count + extra.size, key, copy))
        return plan


@dataclass
class LevelMask:
    """One tensor's mask at one level, before its bits are set: packed bits of keys above the
    window, the positions to add (distinct, all outside those bits), the kept count, the key."""

    above: np.ndarray
    extra: np.ndarray
    kept: int
    key: int
    copy: bool  # `above` is shared with another level

    def packed(self) -> np.ndarray:
        """The packed mask (little-endian bits): `above` with the bits at `extra` set."""
        out = self.above.copy() if self.copy else self.above
        if self.extra.size:
            np.bitwise_or.at(out, self.extra >> 3, np.left_shift(1, self.extra & 7).astype(np.uint8))
        return out
