"""`masks compute`: stream a Hugging Face checkpoint tensor by tensor and write one mask file per level.

Lifecycle:
    request = MaskRequest(method="magnitude", structure="unstructured", scope="global", sparsities=(0.5, 0.7))
    results = compute_masks("path/to/hf_model", request, "masks.safetensors")
    # -> masks_sparsity0.5.safetensors, masks_sparsity0.7.safetensors (+ .stats.json, .png each)

Pipeline (`passes.py`, on `stream.py`): one thread reads the next tensors (`os.preadv`, in file
order) while two workers each take a whole tensor: checksum of its bytes (BLAKE3), checks, keys,
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

Outputs (`_LevelOutputs`): each level's mask file, `<stem>.stats.json` and `<stem>.png`, written
under temporary names and renamed together once all are complete (`atomic.atomic_files`); an
error at any point (bad input, a worker, a full disk) closes every level's spool and leaves none
of them.

Magnitude and random masks import numpy but not torch (start-up); the data-driven methods
(calibration) and `rows`/`cols` (line sums) import torch when they run.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modelzoo_ext.atomic import atomic_files
from modelzoo_ext.errors import UserError
from modelzoo_ext.hf_checkpoint import HFCheckpoint
from modelzoo_ext.masks import select, window
from modelzoo_ext.masks.calibration import CalibrationConfig
from modelzoo_ext.masks.format import MaskWriter, PackedMask
from modelzoo_ext.masks.passes import Passes, Plan, TensorJob, TensorResult
from modelzoo_ext.masks.provenance import source_record
from modelzoo_ext.masks.scores import (
    DATA_DRIVEN,
    METHODS,
)
from modelzoo_ext.masks.select import Structure, ThresholdFinder
from modelzoo_ext.masks.stats import LevelReport, MagnitudeHistogram, report_paths
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


@dataclass
class _FirstPass:
    """What the global scope's first pass finds: every tensor's dtype and source checksum, the key
    width, and (when no one-pass counts are made) every tensor's exact high-bits histogram."""

    sources: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    bits: int = 0
    histograms: dict[str, np.ndarray] = field(default_factory=dict)


def _global_results(passes: Passes, job: TensorJob, kept: list[int]) -> Iterator[TensorResult]:
    """Global scope: every tensor's masks from exact cuts over all targets, in one way or the other:

    - one pass (`window.GlobalCounts`): for 15-bit keys (bf16/fp16 magnitudes) whose masks fit
      the memory bound (`_one_pass_allowance`), a sample of a few MB guesses the thresholds and
      the first pass counts around them; when the exact totals settle every threshold, the masks
      follow from the counts (held until the end) without reading the weights again;
    - histograms (`select.ThresholdFinder`), for everything else and when a guess missed: the key
      histograms (from the first pass, or a second pass after a miss; 31-bit keys need a low-bits
      pass too), then a masks pass that streams each mask to the writer.

    Each result carries its tensor's dtype and source checksum (computed in the first pass).
    """
    counts = _one_pass_counts(passes, job, kept)
    first = _first_pass(passes, job, counts)
    finished = None if counts is None else counts.finish()
    if finished is not None:
        results = _packed_results(finished, counts.shapes, first.sources, passes.workers)
    else:
        counts = None  # free the counts before the histogram passes
        results = passes.run(job.masks(_histogram_cuts(passes, job, kept, first)), "global scope: masks")
    for result in results:
        result.dtype, result.source = first.sources[result.name]
        yield result


def _one_pass_counts(passes: Passes, job: TensorJob, kept: list[int]) -> window.GlobalCounts | None:
    """The one-pass counts, with thresholds guessed from a sample; None where they do not apply
    (keys other than bf16/fp16 magnitudes) or their masks would exceed the memory bound."""
    if job.request.method != "magnitude" or any(
        e.dtype not in ("bfloat16", "float16") for e in passes.entries
    ):
        return None
    pieces = window.sample_chunks(passes.entries)
    sample = [np.bitwise_and(passes.checkpoint.read(p).view(np.int16), np.int16(0x7FFF)) for p in pieces]
    counts = window.GlobalCounts(kept, passes.total, np.concatenate(sample))
    if counts.held_bytes() > _one_pass_allowance(passes.checkpoint):
        return None  # e.g. Mixtral-8x7B: its packed masks alone exceed a shard; stream instead
    return counts


def _first_pass(passes: Passes, job: TensorJob, counts: window.GlobalCounts | None) -> _FirstPass:
    """Checksums and checks of every tensor, and its counts (into `counts`) or its histogram."""
    windows = None if counts is None else set(counts.windows().values())
    first = _FirstPass()
    for result in passes.run(job.first(windows), "global scope: checks and counts"):
        first.sources[result.name] = (result.dtype, result.source)
        first.bits = first.bits or result.bits
        if result.bits != first.bits:
            raise UserError(
                "global scope needs one key width: the targeted weights mix 16-bit and 32-bit floats",
                where=result.name,
                fix="use --scope layer, or select tensors of one dtype with --include/--exclude",
            )
        if counts is not None:
            counts.add(result.name, result.shape, result.counted)
        else:
            first.histograms[result.name] = result.histogram
    return first


def _histogram_cuts(passes: Passes, job: TensorJob, kept: list[int], first: _FirstPass) -> Plan:
    """Every tensor's exact cut per level from the key histograms (counted again when the first
    pass made one-pass counts instead)."""
    histograms = first.histograms
    if not histograms:
        histograms = {r.name: r.histogram for r in passes.run(job.histograms, "global scope: histograms")}
    finder = ThresholdFinder(kept, first.bits)
    for name, histogram in histograms.items():
        finder.add_high(name, None, histogram)
    if finder.needs_low_pass():
        for result in passes.run(job.low(finder.low_buckets()), "global scope: histograms"):
            finder.set_low(result.name, result.low)
    return finder.plan()


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
    `plot=False`, `<file stem>.png`; all of them appear under their final names, or none (bad
    input, or any error on the way). `workers`: threads selecting masks of different tensors at
    once (2 uses two cores).
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
    job = TensorJob(checkpoint, request, structure, levels, statistics, MagnitudeHistogram(enabled=plot))
    passes = Passes(checkpoint, checkpoint.entries(names), workers)
    needs_torch = request.method in DATA_DRIVEN or structure.kind in ("rows", "cols")
    with _LevelOutputs(out, levels, provenance, plot=plot) as outputs, _one_torch_thread(needs_torch):
        if request.scope == "layer":
            results = passes.run(job.layer, "masks (layer scope)")
        else:
            results = _global_results(passes, job, [select.kept_count(total, s) for s in levels])
        for result in results:
            outputs.add(result)
        return outputs.write(job.histogram, started=started)


class _LevelOutputs:
    """Every level's outputs: its mask file (each tensor's mask handed to the level's spooling
    writer as it comes), `<stem>.stats.json` and `<stem>.png`. `write` puts all of them under
    their final names, or none (`atomic_files`); leaving the block any other way (an error
    mid-way) drops every writer's spool, and nothing is written.
    """

    def __init__(self, out: str | Path, levels: tuple[float, ...], provenance: dict[str, Any], *, plot: bool):
        self.writers = [
            MaskWriter(path, naming="hf", metadata={**provenance, "requested_sparsity": level})
            for path, level in zip(level_paths(out, levels), levels, strict=True)
        ]
        self.plot = plot
        self.thresholds: list[dict[str, int | None]] = [{} for _ in levels]
        self.dtypes: dict[str, str] = {}

    def __enter__(self) -> _LevelOutputs:
        return self

    def __exit__(self, *exc) -> None:
        for writer in self.writers:
            writer.close()

    def add(self, result: TensorResult) -> None:
        """One tensor's mask (and threshold key) at every level."""
        self.dtypes[result.name] = result.dtype
        for writer, thresholds, mask, key in zip(
            self.writers, self.thresholds, result.masks, result.threshold_keys, strict=True
        ):
            writer.add_packed(result.name, mask, source_checksum=result.source)
            thresholds[result.name] = key

    def write(self, histogram: MagnitudeHistogram, *, started: float) -> list[dict[str, Any]]:
        """Write every level's files; returns each level's stats (`started`: `perf_counter` at the
        start of the command, for the stats' `seconds_since_start`)."""
        files = {writer.path: report_paths(writer.path) for writer in self.writers}
        finals = [
            p for mask, (stats, figure) in files.items() for p in (mask, stats, figure if self.plot else None)
        ]
        stats = []
        with atomic_files(p for p in finals if p is not None) as staged:
            for writer, thresholds in zip(self.writers, self.thresholds, strict=True):
                writer.metadata["weight_dtypes"] = sorted(set(self.dtypes.values()))
                metadata = writer.write_to(staged[writer.path])
                report = LevelReport(
                    writer.path,
                    staged[writer.path].stat().st_size,
                    metadata,
                    thresholds,
                    self.dtypes,
                    histogram,
                )
                stats_file, figure_file = files[writer.path]
                seconds = time.perf_counter() - started
                stats.append(report.write(staged[stats_file], staged.get(figure_file), seconds=seconds))
        return stats
