"""The per-tensor work of `masks compute`'s passes, and the runner that feeds it.

`TensorJob` holds what one pass does with one tensor, on a worker thread: layer scope's only
pass (checksum, checks, keys, every level's mask), and global scope's first pass (checksum,
checks, and counts around guessed thresholds or exact key histograms), histogram passes and
masks pass (`compute._global_results` decides which run). `Passes.run` runs one of them over
the targeted tensors through the read-ahead pipeline (`stream.py`), in file order, and yields
each tensor's `TensorResult`.

Layer scope's unstructured selection of one tensor (`unstructured_masks`: the largest keys,
ties to the earliest positions) takes exact counts for 15-bit keys (`bracket.py`) and exact
key histograms otherwise, or when the counts give up (`select.ThresholdFinder`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from modelzoo_ext.hf_checkpoint import HFCheckpoint
from modelzoo_ext.masks import bracket, checksum, select, window
from modelzoo_ext.masks.format import PackedMask
from modelzoo_ext.masks.scores import Weight, key_dtype, line_scores_source, require_finite, score_keys
from modelzoo_ext.masks.select import Structure, Threshold, ThresholdFinder
from modelzoo_ext.masks.stream import local_buffer, pipeline
from modelzoo_ext.safetensors_file import TensorEntry

if TYPE_CHECKING:
    from modelzoo_ext.masks.compute import MaskRequest

Plan = dict[str, list[tuple[Threshold, int, int]]]


def _histogram_plan(kept: list[int], tensors) -> Plan:
    """Exact plan from full key histograms (any key width); `tensors` yields (name, keys) and is
    called again for the low-bits pass of 31-bit keys."""
    finder = None
    for name, keys in tensors():
        finder = finder or ThresholdFinder(kept, select.key_bits(keys))
        finder.add_high(name, keys)
    if finder.needs_low_pass():
        for name, keys in tensors():
            finder.add_low(name, keys)
    return finder.plan()


def _tensor_plan(name: str, keys: np.ndarray, levels) -> list[tuple[Threshold, int, int]]:
    """Layer scope, unstructured: one tensor's exact cut per level from its full key histograms."""
    kept = [select.kept_count(keys.size, s) for s in levels]
    return _histogram_plan(kept, lambda: [(name, keys)])[name]


def unstructured_masks(
    name: str, keys: np.ndarray, levels
) -> tuple[list[Callable[[], np.ndarray]], list[int]]:
    """Layer scope, one tensor: each level's exact mask (the largest keys, ties to the earliest
    positions; as a producer, see `bracket.tensor_masks`) and threshold key; 15-bit keys by exact
    counts, others (or when the counts give up) by histograms."""
    if keys.dtype == np.int16:
        kept = [select.kept_count(keys.size, s) for s in levels]
        found = bracket.tensor_masks(keys, kept, step=bracket.sample_step(keys.size))
        if found is not None:
            return found
    plan = _tensor_plan(name, keys, levels)
    producers = [lambda cut=cut: select.threshold_mask(keys, *cut)[0] for cut in plan]
    return producers, [cut[0].key for cut in plan]


@dataclass
class TensorResult:
    """What a worker hands back for one tensor: its source checksum and, per pass, its share."""

    name: str
    dtype: str
    numel: int
    source: str | None = None
    masks: list[PackedMask] = field(default_factory=list)
    threshold_keys: list[int | None] = field(default_factory=list)
    shape: tuple[int, ...] = ()
    bits: int = 0
    histogram: np.ndarray | None = None  # exact counts of the key's top 15 bits
    low: dict[int, np.ndarray] | None = None
    counted: dict[tuple[int, int], window.Window] | None = None


class TensorJob:
    """The per-tensor work of each pass, run on the worker threads (`stream.pipeline`)."""

    def __init__(self, checkpoint, request, structure, levels, statistics, histogram) -> None:
        self.checkpoint = checkpoint
        self.request = request
        self.structure = structure
        self.levels = levels
        self.statistics = statistics
        self.histogram = histogram

    def _keys(self, entry: TensorEntry, raw: np.ndarray, first_pass: bool) -> tuple[Weight, np.ndarray]:
        weight = Weight.from_raw(entry, raw)
        buffer = local_buffer("keys", entry.numel, key_dtype(weight.dtype))  # reused: no page faults
        keys = score_keys(
            self.request.method,
            weight,
            seed=self.request.seed,
            statistic=self.statistics.get(entry.name),
            out=buffer,
        )
        if first_pass:
            magnitude = keys if self.request.method == "magnitude" else None
            require_finite(entry.name, weight, str(self.checkpoint.directory), magnitude)
            self.histogram.add(weight, magnitude)
        return weight, keys

    def _result(self, entry: TensorEntry, raw: np.ndarray | None) -> TensorResult:
        source = None if raw is None else checksum.array_checksum(raw)
        return TensorResult(entry.name, entry.dtype, entry.numel, source, shape=entry.shape)

    def layer(self, entry: TensorEntry, raw: np.ndarray) -> TensorResult:
        """Layer scope, the only pass: checksum, checks, keys, every level's mask."""
        result = self._result(entry, raw)
        weight, keys = self._keys(entry, raw, first_pass=True)
        producers, result.threshold_keys = _layer_masks(
            self.request, self.structure, self.levels, weight, keys, self.statistics.get(entry.name)
        )
        result.masks = [PackedMask.of(produce().reshape(weight.shape)) for produce in producers]
        return result

    def first(
        self, windows: set[tuple[int, int]] | None
    ) -> Callable[[TensorEntry, np.ndarray], TensorResult]:
        """Global scope, first pass: checksum, checks, and for 15-bit keys the counts in each
        window around a guessed threshold (`window.GlobalCounts`), for 31-bit keys (`windows`
        None) the exact high-bits histogram."""

        def work(entry: TensorEntry, raw: np.ndarray) -> TensorResult:
            result = self._result(entry, raw)
            _, keys = self._keys(entry, raw, first_pass=True)
            result.bits = select.key_bits(keys)
            if windows is None:
                result.histogram = select.high_histogram(keys)
            elif result.bits == 15:
                result.counted = {w: window.count_window(keys, *w) for w in windows}
            return result

        return work

    def histograms(self, entry: TensorEntry, raw: np.ndarray) -> TensorResult:
        """Global scope, 15-bit keys when the counts missed: exact key histograms."""
        result = self._result(entry, None)
        result.histogram = select.high_histogram(self._keys(entry, raw, first_pass=False)[1])
        return result

    def low(self, buckets: set[int]) -> Callable[[TensorEntry, np.ndarray], TensorResult]:
        """Global scope, 31-bit keys: the low-bits histograms inside the threshold buckets."""

        def work(entry: TensorEntry, raw: np.ndarray) -> TensorResult:
            result = self._result(entry, None)
            result.low = select.low_histograms(self._keys(entry, raw, first_pass=False)[1], buckets)
            return result

        return work

    def masks(self, plan: Plan) -> Callable[[TensorEntry, np.ndarray], TensorResult]:
        """Global scope, last pass: every level's mask from the global plan."""

        def work(entry: TensorEntry, raw: np.ndarray) -> TensorResult:
            result = self._result(entry, None)
            keys = self._keys(entry, raw, first_pass=False)[1]
            for cut in plan[entry.name]:
                result.masks.append(PackedMask.of(select.threshold_mask(keys, *cut)[0]))
                result.threshold_keys.append(cut[0].key)
            return result

        return work


def _layer_masks(
    request: MaskRequest, structure: Structure, levels, weight: Weight, keys: np.ndarray, statistic
) -> tuple[list[Callable[[], np.ndarray]], list[int | None]]:
    """One tensor's mask for every level (layer scope) as producers to call one at a time, and
    each level's threshold key (or None)."""
    none = [None] * len(levels)
    if structure.kind == "N:M":
        return [lambda: select.n_m_mask(keys, structure.n, structure.m, name=weight.name)], none
    if structure.kind in ("rows", "cols"):
        scores = line_scores_source(request.method, weight, seed=request.seed, statistic=statistic)
        pick = select.rows_mask if structure.kind == "rows" else select.cols_mask
        return [lambda s=s: pick(scores, s) for s in levels], none
    if request.method == "wanda":  # Wanda's comparison group: each output row
        return [lambda s=s: select.per_row_mask(keys, s) for s in levels], none
    return unstructured_masks(weight.name, keys, levels)


class Passes:
    """Runs passes of a `TensorJob` over the targeted tensors through the read-ahead pipeline."""

    def __init__(self, checkpoint: HFCheckpoint, entries: list[TensorEntry], workers: int) -> None:
        self.checkpoint = checkpoint
        self.entries = entries
        self.workers = workers
        self.total = sum(e.numel for e in entries)
        largest = max(e.nbytes for e in entries)
        # Enough read-ahead to keep the disk busy while both workers compute; bounded so that
        # peak memory stays a few tensors above the packed masks.
        self.budget = max(64 << 20, 2 * largest)

    def run(self, work, desc: str) -> Iterator[TensorResult]:
        """`work(entry, raw)` for every targeted tensor, in file order, with a progress bar."""
        results = pipeline(self.checkpoint.read, self.entries, work, workers=self.workers, budget=self.budget)
        with tqdm(total=self.total, desc=desc, unit="weights", unit_scale=True, leave=False) as bar:
            for result in results:
                bar.update(result.numel)
                yield result
