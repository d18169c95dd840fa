"""`masks compute`: stream a Hugging Face checkpoint tensor by tensor and write one mask file per level.

Lifecycle:
    request = MaskRequest(method="magnitude", structure="unstructured", scope="global", sparsities=(0.5, 0.7))
    results = compute_masks("path/to/hf_model", request, "masks.safetensors")
    # -> masks_sparsity0.5.safetensors, masks_sparsity0.7.safetensors (+ .stats.json, .png each)

Pipeline (`stream.py`): one thread reads the next tensors (`os.preadv`, in file order) while
two workers each take a whole tensor: checksum of its bytes (BLAKE3), checks, keys,
selection, packing. Memory: the tensors in flight (a byte budget of a few of the largest
tensors) and their keys; each packed mask goes to the writer's spool file as it is made, except
in one-pass global scope, which holds them (numel/8 bytes per level) to the end, and is used
only where that fits beside the largest shard (`_one_pass_allowance`).

Passes over the weights: `layer` scope one. `global` scope one for 15-bit keys (bf16/fp16
magnitudes: a 4 MB sample guesses the thresholds, the pass counts around them and keeps what
the masks need, `window.GlobalCounts`; three when a guess misses) and three for 31-bit keys
(fp32, random, data-driven scores: the two histogram passes of `select.ThresholdFinder`, then
masks). One scoring pass serves every requested level, and the masks of the levels are
nested (same keys, same tie order).

Magnitude and random masks import numpy but not torch (start-up); the data-driven methods
(calibration) and `rows`/`cols` (line sums) import torch when they run.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from modelzoo_ext.errors import UserError
from modelzoo_ext.hf_checkpoint import HFCheckpoint, TensorEntry
from modelzoo_ext.masks import bracket, checksum, select, window
from modelzoo_ext.masks.calibration import CalibrationConfig
from modelzoo_ext.masks.format import MaskWriter, PackedMask
from modelzoo_ext.masks.scores import (
    DATA_DRIVEN,
    METHODS,
    Weight,
    key_dtype,
    line_scores_source,
    require_finite,
    score_keys,
)
from modelzoo_ext.masks.select import Structure, Threshold, ThresholdFinder
from modelzoo_ext.masks.stats import LevelReport, MagnitudeHistogram
from modelzoo_ext.masks.stream import local_buffer, pipeline
from modelzoo_ext.masks.targets import TargetRule

SCOPES = ("layer", "global")


@dataclass(frozen=True)
class MaskRequest:
    """What to compute: method, structure, scope, sparsity levels, targets, seed, calibration."""

    method: str = "magnitude"
    structure: str = "unstructured"
    scope: str = "layer"
    sparsities: tuple[float, ...] = (0.5,)
    seed: int = 0
    include: str | None = None
    exclude: str | None = None
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    def checked(self) -> tuple[Structure, tuple[float, ...]]:
        """Validate the combination; returns the parsed structure and the sparsity levels."""
        if self.method not in METHODS:
            raise UserError(f"unknown method {self.method!r}", where="--method", fix=f"use one of {METHODS}")
        if self.scope not in SCOPES:
            raise UserError(f"unknown scope {self.scope!r}", where="--scope", fix=f"use one of {SCOPES}")
        structure = Structure.parse(self.structure)
        if self.scope == "global" and structure.kind != "unstructured":
            raise UserError(
                f"--scope global applies to unstructured masks only, not {structure}",
                where="--scope",
                fix="use --scope layer (N:M, rows and cols are selected per tensor)",
            )
        levels = tuple(select.check_sparsity(s) for s in self.sparsities)
        if structure.kind == "N:M":
            fixed = structure.fixed_sparsity
            if any(abs(s - fixed) > 1e-9 for s in levels):
                raise UserError(
                    f"{structure} fixes the sparsity at {fixed:g}, but {list(levels)} was requested",
                    where="--sparsity",
                    fix=f"omit --sparsity or pass {fixed:g}",
                )
            levels = (fixed,)
        if not levels:
            raise UserError("no sparsity level given", where="--sparsity", fix="pass e.g. --sparsity 0.5 0.7")
        if len(set(levels)) != len(levels):
            raise UserError(f"repeated sparsity levels {list(levels)}", where="--sparsity")
        return structure, levels


def level_paths(out: str | Path, sparsities: tuple[float, ...]) -> list[Path]:
    """`out` itself for one level; `<stem>_sparsity<S><suffix>` beside it for several."""
    out = Path(out)
    if len(sparsities) == 1:
        return [out]
    suffix = out.suffix or ".safetensors"
    return [out.with_name(f"{out.stem}_sparsity{s:g}{suffix}") for s in sparsities]


def source_record(checkpoint: HFCheckpoint) -> dict[str, Any]:
    """What the mask file records about its source checkpoint (`HFCheckpoint.describe`)."""
    return checkpoint.describe()


@contextlib.contextmanager
def _one_torch_thread(needed: bool) -> Iterator[None]:
    """Torch work (data-driven scores, line sums) runs on the two workers: one torch thread each.

    Intra-op threads competing with the other worker and the reader were measured several
    times slower than one thread on a 2-core machine. Without torch work, torch is not imported.
    """
    if not needed:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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


def _unstructured_masks(
    name: str, keys: np.ndarray, levels
) -> tuple[list[Callable[[], np.ndarray]], list[int]]:
    """Layer scope: each level's exact mask (as a producer, see `bracket.tensor_masks`) and
    threshold key; 15-bit keys by exact counts, others (or when the counts give up) by histograms."""
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


class _Job:
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
    return _unstructured_masks(weight.name, keys, levels)


class _Passes:
    """Runs passes of a `_Job` over the targeted tensors through the read-ahead pipeline."""

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


def _global_results(passes: _Passes, job: _Job, kept: list[int], sources: dict[str, tuple[str, str]]):
    """Global scope: every tensor's masks (`TensorResult`s) from exact cuts over all targets.

    15-bit keys (bf16/fp16 magnitudes): a sample of a few MB guesses the thresholds, and one
    pass counts around them and yields the masks (`window.GlobalCounts`), which it holds until
    the end: only where they fit the memory bound (`_one_pass_allowance`). 31-bit keys, a
    model too large for that, or a guess that missed: exact key histograms
    (`select.ThresholdFinder`), then a masks pass that streams each mask to the writer.
    """
    counts, windows = None, None
    if job.request.method == "magnitude" and all(e.dtype in ("bfloat16", "float16") for e in passes.entries):
        pieces = window.sample_chunks(passes.entries)
        sample = [np.bitwise_and(passes.checkpoint.read(p).view(np.int16), np.int16(0x7FFF)) for p in pieces]
        counts = window.GlobalCounts(kept, passes.total, np.concatenate(sample))
        if counts.held_bytes() > _one_pass_allowance(passes.checkpoint):
            counts = None  # e.g. Mixtral-8x7B: its packed masks alone exceed a shard; stream instead
        else:
            windows = set(counts.windows().values())
    bits, histograms = None, {}
    for result in passes.run(job.first(windows), "global scope: checks and counts"):
        sources[result.name] = (result.dtype, result.source)
        bits = bits or result.bits
        if result.bits != bits:
            raise UserError(
                "global scope needs one key width: the targeted weights mix 16-bit and 32-bit floats",
                where=result.name,
                fix="use --scope layer, or select tensors of one dtype with --include/--exclude",
            )
        if counts is not None:
            counts.add(result.name, result.shape, result.counted)
        else:
            histograms[result.name] = result.histogram
    if counts is not None:
        finished = counts.finish()
        if finished is not None:
            return _packed_results(finished, counts.shapes, sources, passes.workers)
        counts = None  # free the counts before the histogram passes
        for result in passes.run(job.histograms, "global scope: histograms"):
            histograms[result.name] = result.histogram
    finder = ThresholdFinder(kept, bits)
    for name, histogram in histograms.items():
        finder.add_high(name, None, histogram)
    if finder.needs_low_pass():
        for result in passes.run(job.low(finder.low_buckets()), "global scope: histograms"):
            finder.set_low(result.name, result.low)
    return passes.run(job.masks(finder.plan()), "global scope: masks")


def _one_pass_allowance(checkpoint: HFCheckpoint) -> int:
    """Bytes the one-pass global scope may hold (its masks and window keys) while peak memory
    stays within the largest shard + 1 GB: that shard's size + 0.5 GB (the other 0.5 GB for the
    process, the tensors in flight and their keys)."""
    return max(p.stat().st_size for p in checkpoint.weight_files()) + (512 << 20)


def _packed_results(finished, shapes, sources, workers: int) -> list[TensorResult]:
    """`TensorResult`s from `GlobalCounts.finish()`: bits set and checksums on `workers` threads."""

    def result(name: str) -> TensorResult:
        shape = shapes[name]
        out = TensorResult(name, sources[name][0], int(np.prod(shape)), shape=shape)
        for level in finished[name]:
            out.masks.append(PackedMask.of_packed(level.packed(), shape, level.kept))
            out.threshold_keys.append(level.key)
        return out

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(result, sorted(finished)))


def compute_masks(
    model_dir: str | Path, request: MaskRequest, out: str | Path, *, plot: bool = True, workers: int = 2
) -> list[dict[str, Any]]:
    """Compute masks for every level in `request`; returns each level's stats (also written as JSON).

    Output per level: the mask file (see `format.py`), `<file stem>.stats.json` and, unless
    `plot=False`, `<file stem>.png`. Nothing is written when any input is bad. `workers`:
    threads selecting masks of different tensors at once (2 uses two cores).
    """
    started = time.perf_counter()
    structure, levels = request.checked()
    checkpoint = HFCheckpoint(model_dir)
    shapes = checkpoint.shapes()
    rule = TargetRule(request.include, request.exclude)
    names = rule.select(shapes, where=str(checkpoint.directory))
    total = sum(shapes[name][0] * shapes[name][1] for name in names)

    statistics, calibration = {}, None
    if request.method in DATA_DRIVEN:
        from modelzoo_ext.masks import calibration as calibration_module

        statistics, calibration = calibration_module.calibration_statistics(
            model_dir, request.method, names, request.calibration
        )

    provenance = {
        "method": request.method,
        "structure": str(structure),
        "scope": request.scope,
        "seed": request.seed,
        "target_rule": rule.describe(),
        "source_model": source_record(checkpoint),
        "calibration": calibration,
    }
    paths = level_paths(out, levels)
    writers = [
        MaskWriter(path, naming="hf", metadata={**provenance, "requested_sparsity": s})
        for path, s in zip(paths, levels, strict=True)
    ]
    thresholds: list[dict[str, int | None]] = [{} for _ in levels]
    histogram = MagnitudeHistogram(enabled=plot)
    job = _Job(checkpoint, request, structure, levels, statistics, histogram)
    passes = _Passes(checkpoint, checkpoint.entries(names), workers)
    sources: dict[str, tuple[str, str]] = {}  # name -> (dtype, source checksum), from the first pass
    needs_torch = request.method in DATA_DRIVEN or structure.kind in ("rows", "cols")

    with _one_torch_thread(needs_torch):
        if request.scope == "layer":
            results = passes.run(job.layer, "masks (layer scope)")
        else:
            results = _global_results(passes, job, [select.kept_count(total, s) for s in levels], sources)
        for result in results:
            _, source = sources.setdefault(result.name, (result.dtype, result.source))
            for i, mask in enumerate(result.masks):
                writers[i].add_packed(result.name, mask, source_checksum=source)
                thresholds[i][result.name] = result.threshold_keys[i]

    dtypes = {name: dtype for name, (dtype, _) in sources.items()}
    results = []
    for i, writer in enumerate(writers):
        writer.metadata["weight_dtypes"] = sorted(set(dtypes.values()))
        metadata = writer.write()
        writers[i] = None  # free this level's packed masks once written
        report = LevelReport(writer.path, metadata, thresholds[i], dtypes, histogram)
        results.append(report.write(plot=plot, seconds=time.perf_counter() - started))
    return results
