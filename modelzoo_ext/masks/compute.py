"""`masks compute`: stream a Hugging Face checkpoint tensor by tensor and write one mask file per level.

Lifecycle:
    request = MaskRequest(method="magnitude", structure="unstructured", scope="global", sparsities=(0.5, 0.7))
    results = compute_masks("path/to/hf_model", request, "masks.safetensors")
    # -> masks_sparsity0.5.safetensors, masks_sparsity0.7.safetensors (+ .stats.json, .png each)

Memory: one weight tensor (and its keys) at a time, plus the packed masks (numel/8 bytes per
level). `layer` scope reads the weights once. `global` scope reads them three times for bf16/
fp16 magnitudes (checks and a sample, counts inside the sampled bracket, masks; `bracket.py`)
and three times for 31-bit keys (fp32, random, data-driven scores: two histogram passes of
`select.ThresholdFinder`, then masks). One scoring pass serves every requested level, and the
masks of the levels are nested (same keys, same tie order).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from modelzoo_ext.errors import UserError
from modelzoo_ext.hf_checkpoint import HFCheckpoint
from modelzoo_ext.masks import select
from modelzoo_ext.masks.bracket import BracketFinder, sample_step
from modelzoo_ext.masks.calibration import CalibrationConfig, calibration_statistics
from modelzoo_ext.masks.format import MaskWriter, tensor_sha256
from modelzoo_ext.masks.scores import DATA_DRIVEN, METHODS, line_scores_source, require_finite, score_keys
from modelzoo_ext.masks.select import Structure, Threshold, ThresholdFinder
from modelzoo_ext.masks.stats import LevelReport, MagnitudeHistogram
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
def _one_torch_thread() -> Iterator[None]:
    """Selection is memory-bound elementwise work; the second core hashes weights meanwhile.

    With intra-op threads competing against the hashing thread (or other processes), torch's
    thread pool was measured several times slower than one thread on a 2-core machine.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Scorer:
    """Reads targeted weights shard by shard, checks and hashes them once, and turns them into keys.

    The sha256 of each weight is computed on a worker thread (hashlib releases the GIL) while
    the main thread selects the masks; at most one hash is in flight, so at most two weights
    are in memory.
    """

    def __init__(self, checkpoint: HFCheckpoint, request: MaskRequest, statistics: dict[str, torch.Tensor]):
        self.checkpoint = checkpoint
        self.request = request
        self.statistics = statistics
        self.dtypes: dict[str, torch.dtype] = {}
        self._hashes: dict[str, Future] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")

    def sha256(self, name: str) -> str:
        """The source weight's sha256 (waits for the worker thread if needed)."""
        return self._hashes[name].result()

    def stream(self, names: list[str], total: int, desc: str):
        """Yield (name, weight, keys) shard by shard, with a progress bar counting weights."""
        first_pass = not self.dtypes
        in_flight: Future | None = None
        with tqdm(total=total, desc=desc, unit="weights", unit_scale=True, leave=False) as bar:
            for name, weight in self.checkpoint.iter_tensors(names):
                keys = score_keys(
                    self.request.method,
                    name,
                    weight,
                    seed=self.request.seed,
                    statistic=self.statistics.get(name),
                )
                if first_pass:
                    magnitude = keys if self.request.method == "magnitude" else None
                    require_finite(name, weight, str(self.checkpoint.directory), magnitude)
                    if in_flight is not None:
                        in_flight.result()
                    in_flight = self._hashes[name] = self._pool.submit(tensor_sha256, weight)
                    self.dtypes[name] = weight.dtype
                bar.update(weight.numel())
                yield name, weight, keys
        if first_pass:
            for future in self._hashes.values():
                future.result()


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


def _tensor_plan(name: str, keys: torch.Tensor, levels) -> list[tuple[Threshold, int, int]]:
    """Layer scope, unstructured: one tensor's exact cut per level."""
    kept = [select.kept_count(keys.numel(), s) for s in levels]
    if keys.dtype == torch.int16:
        finder = BracketFinder(kept, numel=keys.numel(), step=sample_step(keys.numel()))
        finder.add_sample(keys)
        finder.add_band(name, keys)
        plan = finder.plan()
        if plan is not None:
            return plan[name]
    return _histogram_plan(kept, lambda: [(name, keys)])[name]


def _layer_masks(
    request: MaskRequest, structure: Structure, levels, name: str, weight, keys, statistic
) -> tuple[list[torch.Tensor], list[int | None]]:
    """One tensor's mask for every level (layer scope), and each level's threshold key (or None)."""
    none = [None] * len(levels)
    if structure.kind == "N:M":
        return [select.n_m_mask(keys, structure.n, structure.m, name=name)], none
    if structure.kind in ("rows", "cols"):
        scores = line_scores_source(request.method, name, weight, seed=request.seed, statistic=statistic)
        pick = select.rows_mask if structure.kind == "rows" else select.cols_mask
        return [pick(scores, s) for s in levels], none
    if request.method == "wanda":  # Wanda's comparison group: each output row
        return [select.per_row_mask(keys, s) for s in levels], none
    plan = _tensor_plan(name, keys, levels)
    return [select.threshold_mask(keys, *cut)[0] for cut in plan], [cut[0].key for cut in plan]


def _global_plan(scorer: _Scorer, names: list[str], total: int, levels, histogram) -> Plan:
    """Global scope: exact cuts over all targeted tensors, in streaming passes.

    15-bit keys: a sampling pass (also the first pass: checks, hashes), then band counts
    (`bracket.py`); 31-bit keys, or a missed bracket: full key histograms.
    """
    kept = [select.kept_count(total, s) for s in levels]
    bracket = BracketFinder(kept, numel=total, step=sample_step(total, 1 << 22))
    narrow = True
    for _, weight, keys in scorer.stream(names, total, "global scope: checks and samples"):
        histogram.add(weight, keys if scorer.request.method == "magnitude" else None)
        narrow = narrow and keys.dtype == torch.int16
        if narrow:
            bracket.add_sample(keys)
    if narrow:
        for name, _, keys in scorer.stream(names, total, "global scope: counts"):
            bracket.add_band(name, keys)
        plan = bracket.plan()
        if plan is not None:
            return plan

    def tensors():
        return ((name, keys) for name, _, keys in scorer.stream(names, total, "global scope: histograms"))

    return _histogram_plan(kept, tensors)


def compute_masks(
    model_dir: str | Path, request: MaskRequest, out: str | Path, *, plot: bool = True
) -> list[dict[str, Any]]:
    """Compute masks for every level in `request`; returns each level's stats (also written as JSON).

    Output per level: the mask file (see `format.py`), `<file stem>.stats.json` and, unless
    `plot=False`, `<file stem>.png`. Nothing is written when any input is bad.
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
        statistics, calibration = calibration_statistics(
            model_dir, request.method, names, request.calibration
        )

    scorer = _Scorer(checkpoint, request, statistics)
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
    magnitude = request.method == "magnitude"

    with _one_torch_thread():
        if request.scope == "layer":
            for name, weight, keys in scorer.stream(names, total, "masks (layer scope)"):
                histogram.add(weight, keys if magnitude else None)
                level_masks, level_keys = _layer_masks(
                    request, structure, levels, name, weight, keys, statistics.get(name)
                )
                for i, mask in enumerate(level_masks):
                    writers[i].add(name, mask, source_sha256=scorer.sha256(name))
                    thresholds[i][name] = level_keys[i]
        else:
            plan = _global_plan(scorer, names, total, levels, histogram)
            for name, _, keys in scorer.stream(names, total, "global scope: masks"):
                for i, cut in enumerate(plan[name]):
                    writers[i].add(
                        name, select.threshold_mask(keys, *cut)[0], source_sha256=scorer.sha256(name)
                    )
                    thresholds[i][name] = cut[0].key

    results = []
    for i, writer in enumerate(writers):
        writer.metadata["weight_dtypes"] = sorted(
            {str(d).removeprefix("torch.") for d in scorer.dtypes.values()}
        )
        metadata = writer.write()
        writers[i] = None  # free this level's packed masks once written
        report = LevelReport(writer.path, metadata, thresholds[i], scorer.dtypes, histogram)
        results.append(report.write(plot=plot, seconds=time.perf_counter() - started))
    return results
