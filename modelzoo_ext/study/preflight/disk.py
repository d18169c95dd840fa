"""Check 6: the disk budget: the bytes each run will write, summed, against what the filesystem takes.

    outputs = run_outputs(cfg, counts, backend="cs3", hf_dir=..., evaluated=3270)   # one run
    budget = DiskBudget(runs=[...], assets=[...], room=filesystem_room(DIR), concurrency=4)
    disk_check(budget, alternatives)      # FAIL with the numbers and the retention that would fit

Bytes are counted from the architecture (`model_counts`: parameters from config.json, the
targeted weights, the LoRA factors) and the formats, per file a run leaves:

- CS checkpoint (`checkpoint_<step>.mdl`, `cstorch.save`, HDF5): every model parameter in float32
  (plus ModelZoo's duplicate final norm `ln_f`), one bool byte per targeted weight (cstorch's
  `<param>_mask`), the LoRA factors in float32 and their optimizer state (AdamW: 8 bytes per
  factor weight), plus HDF5's cost per tensor (`H5_TENSOR_BYTES`, `H5_SHARE`: measured with
  cerebras-pytorch 2.10);
- reference checkpoint (`checkpoints/step_N.pt`, `torch.save`): the LoRA factors, their
  optimizer state and the RNG states, plus torch's cost per tensor;
- exports: `merged` is the whole model in float32 (both `convert cs-to-hf` and the reference
  trainer write float32), `adapter` the LoRA factors; both carry the masks (1 bit per targeted
  weight) and the tokenizer files; the reference trainer also writes `lora.safetensors` and a
  copy of the mask file;
- logs and metrics (an allowance per run and per step, `LOG_BYTES`), evaluation results (per
  evaluated example, `EVAL_BYTES_PER_EXAMPLE`);
- a sweep's shared assets still to build: mask files, pruned checkpoints (the base's dtype), and
  the prepared data (int32 [N, 3, msl] before gzip: an upper bound).

How many checkpoints: ModelZoo writes one every `checkpoint.steps` and at the last step (none at
all without `checkpoint.steps`), plus step 0 with `save_initial_checkpoint`; the reference trainer
every `checkpoint.steps` and at the last step. `KeepNCheckpoints(n)` keeps the newest n and deletes
the oldest right after the save that makes n + 1, so a run holds n + 1 for a moment; a sweep's
`train.keep_checkpoints: 0` deletes them once the run's export is checked. The peak of a sweep is
what its finished runs keep plus the extra checkpoints of the runs that may train at once.

A run's estimate is tested against the files a tiny run writes (tests/test_preflight.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelzoo_ext.run_config import RunConfig
from modelzoo_ext.study.preflight.model_counts import ModelCounts
from modelzoo_ext.study.preflight.quota import Room
from modelzoo_ext.study.preflight.report import FAIL, PASS, Check

GB = 10**9
# cstorch.save (HDF5): per tensor ~10 KiB, and a share of the data (chunk indexes) - measured on
# cerebras-pytorch 2.10 (10 to 400 tensors of 40 B to 40 MB: 9.9-10.5 KiB each, +0.15-0.3% of the data).
H5_TENSOR_BYTES = 10 * 1024
H5_SHARE = 0.003
# torch.save: zip entry and pickle per tensor (368 bytes measured on the tiny run's step_N.pt: 28
# factors, each with AdamW's exp_avg, exp_avg_sq and step); the RNG states (CPU generator, 5,056 bytes).
PT_TENSOR_BYTES = 368
RNG_BYTES = 5_056
# safetensors: the JSON header entry per tensor; a mask file's per-tensor metadata (checksums).
SAFETENSORS_TENSOR_BYTES = 160
MASK_TENSOR_BYTES = 400
# Logs, metrics and events: per run and per step (the reference trainer's metrics.jsonl row and
# TensorBoard events; ModelZoo's run logs and loss log). A CS-3 appliance run's compile logs were
# not measured here: the allowance is ModelZoo's CPU-backend logs (0.2 MB for the tiny run) x 80.
LOG_BYTES = {"cs3": (16 * 2**20, 300), "gpu": (2**20, 700), "cpu": (2**20, 700)}
# Evaluation: eval.json and one JSONL row per evaluated example (scores, key digest, target).
EVAL_BYTES_PER_EXAMPLE = 2_048
EVAL_FIXED_BYTES = 64 * 1024
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adam": 8, "sgd": 4}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "vocab.json", "merges.txt")  # fmt: skip
TOKENIZER_ALLOWANCE = 20 * 2**20  # where the HF directory is not here to measure
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class Term:
    """Bytes of one kind of file, and how they were counted."""

    name: str
    bytes: int
    note: str = ""


@dataclass(frozen=True)
class RunOutputs:
    """What one run leaves on disk (`kept`) and the more it holds at its peak (`peak_extra`)."""

    label: str
    kept: tuple[Term, ...]
    peak_extra: int = 0

    @property
    def total(self) -> int:
        return sum(t.bytes for t in self.kept)


def gb(n: int | float) -> str:
    """Bytes in decimal units: `112.5 GB`, `3.2 TB`, `840.0 MB`."""
    for unit, size in (("PB", 10**15), ("TB", 10**12), ("GB", GB), ("MB", 10**6)):
        if abs(n) >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n / 1000:,.1f} kB"


# -- counting --------------------------------------------------------------------------------------
def checkpoints_written(cfg: RunConfig, backend: str) -> int:
    """How many checkpoints a run writes (module docstring)."""
    every = cfg.init.checkpoint.steps if cfg.init.checkpoint else None
    steps = cfg.max_steps
    if backend == "cs3":
        initial = 1 if cfg.init.checkpoint and cfg.init.checkpoint.save_initial_checkpoint else 0
        return (math.ceil(steps / min(every, steps)) if every else 0) + initial
    return math.ceil(steps / min(every, steps)) if every else 1


def _optimizer_bytes(cfg: RunConfig) -> int:
    name = next(iter(cfg.init.optimizer), "AdamW").lower()
    settings = cfg.init.optimizer.get(next(iter(cfg.init.optimizer), ""), {}) or {}
    if name == "sgd" and not settings.get("momentum"):
        return 0
    return OPTIMIZER_STATE_BYTES.get(name, 8)


def cs_checkpoint_bytes(cfg: RunConfig, counts: ModelCounts) -> int:
    """One `checkpoint_<step>.mdl` of a cszoo fit run."""
    targets = len(counts.targets)
    data = (4 * (counts.base_params + counts.hidden_size) + counts.target_weights
            + (4 + _optimizer_bytes(cfg)) * counts.lora_params)  # fmt: skip
    tensors = (
        counts.base_tensors + 1 + targets * (1 + 2 + 2 * 4) + 8
    )  # mask, A and B, 4 optimizer entries each
    return int(data * (1 + H5_SHARE)) + tensors * H5_TENSOR_BYTES


def reference_checkpoint_bytes(cfg: RunConfig, counts: ModelCounts) -> int:
    """One `checkpoints/step_N.pt` of the reference trainer."""
    tensors = len(counts.targets) * 2 * 4  # A and B: each its weight and three optimizer entries
    return (4 + _optimizer_bytes(cfg)) * counts.lora_params + RNG_BYTES + tensors * PT_TENSOR_BYTES


def mask_file_bytes(counts: ModelCounts) -> int:
    """A mask file: 1 bit per targeted weight (per-tensor padding to a byte), and its metadata."""
    packed = sum(math.ceil(math.prod(s) / 8) for s in counts.targets.values())
    return packed + len(counts.targets) * MASK_TENSOR_BYTES


def tokenizer_bytes(hf_dir: Path | None) -> tuple[int, str]:
    if hf_dir is not None and hf_dir.is_dir():
        return sum((hf_dir / n).stat().st_size for n in TOKENIZER_FILES if (hf_dir / n).is_file()), "measured"
    return TOKENIZER_ALLOWANCE, "allowance: the HF directory is not here"


def model_file_bytes(counts: ModelCounts, dtype_bytes: int) -> int:
    """A whole HF model in safetensors at `dtype_bytes` per parameter."""
    return counts.base_params * dtype_bytes + counts.base_tensors * SAFETENSORS_TENSOR_BYTES


def export_terms(cfg: RunConfig, counts: ModelCounts, backend: str, hf_dir: Path | None) -> list[Term]:
    """The files of the run's export (and the reference trainer's own copies)."""
    kind = cfg.sparse_lora.export_kind
    masked = not cfg.sparse_lora.dense_baseline
    masks = mask_file_bytes(counts) if masked else 0
    lora = 4 * counts.lora_params + 2 * len(counts.targets) * SAFETENSORS_TENSOR_BYTES
    tokenizer, how = tokenizer_bytes(hf_dir)
    if kind == "merged":
        terms = [Term("export: merged model", model_file_bytes(counts, 4) + tokenizer + masks,
                      f"float32, {counts.base_params:,} parameters; tokenizer {how}; masks as bits")]  # fmt: skip
    else:
        terms = [
            Term(
                "export: adapter",
                lora + masks,
                f"{counts.lora_params:,} LoRA weights in float32; masks as bits",
            )
        ]
    if backend != "cs3":
        terms.append(Term("LoRA factors and mask copy", lora + masks, "lora.safetensors, masks.safetensors"))
    return terms


def run_outputs(
    cfg: RunConfig, counts: ModelCounts, *, backend: str, label: str, hf_dir: Path | None = None,
    evaluated: int | None = None, keep: int | None = None, keep_is_sweep: bool = False,
) -> RunOutputs:  # fmt: skip
    """The bytes one run writes (module docstring).

    keep: the checkpoints kept (None: the run config's KeepNCheckpoints, or all); with
    `keep_is_sweep`, 0 means the sweep deletes them once the export is checked.
    evaluated: examples the run's evaluation scores (None: the run is not evaluated here).
    """
    written = checkpoints_written(cfg, backend)
    each = cs_checkpoint_bytes(cfg, counts) if backend == "cs3" else reference_checkpoint_bytes(cfg, counts)
    n = cfg.keep_checkpoints if keep is None else keep
    held = written if n is None else min(written, max(1, n) + 1)  # n + 1 for a moment
    left = 0 if (keep_is_sweep and keep == 0) else (written if n is None else min(written, n))
    fixed, per_step = LOG_BYTES[backend]
    terms = [Term("checkpoints", left * each, f"{left} of {written} written, {gb(each)} each ({backend})")]
    terms += export_terms(cfg, counts, backend, hf_dir)
    terms.append(Term("logs and metrics", fixed + per_step * cfg.max_steps, "allowance"))
    if evaluated:
        terms.append(Term("evaluation results", EVAL_FIXED_BYTES + EVAL_BYTES_PER_EXAMPLE * evaluated,
                          f"{evaluated:,} examples"))  # fmt: skip
    return RunOutputs(label, tuple(terms), peak_extra=max(0, held - left) * each)


def pruned_bytes(counts: ModelCounts, hf_config: dict[str, Any], hf_dir: Path | None) -> int:
    """`masks apply` output: the base in its own dtype, with its tokenizer."""
    dtype = DTYPE_BYTES.get(str(hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32"), 4)
    return model_file_bytes(counts, dtype) + tokenizer_bytes(hf_dir)[0]


def data_bytes(samples: int, max_seq_length: int) -> int:
    """Prepared data before gzip: int32 [N, 3, msl] (an upper bound of the HDF5 files)."""
    return samples * 3 * max_seq_length * 4


# -- the budget ------------------------------------------------------------------------------------
@dataclass
class DiskBudget:
    """Runs and assets still to be written, against the room of their filesystem."""

    runs: list[RunOutputs]
    room: Room
    assets: list[Term] = field(default_factory=list)
    concurrency: int = 1  # runs that may train at once (each may hold one extra checkpoint)
    setting: str = ""  # the retention this budget assumes

    @property
    def total(self) -> int:
        return sum(r.total for r in self.runs) + sum(t.bytes for t in self.assets)

    @property
    def peak(self) -> int:
        extras = sorted((r.peak_extra for r in self.runs), reverse=True)[: max(1, self.concurrency)]
        return self.total + sum(extras)

    @property
    def fits(self) -> bool:
        return self.peak <= self.room.limit

    def by_term(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for term in [t for r in self.runs for t in r.kept] + self.assets:
            out[term.name] = out.get(term.name, 0) + term.bytes
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def describe(self) -> str:
        terms = ", ".join(f"{name} {gb(n)}" for name, n in list(self.by_term().items())[:5])
        room = self.room
        quota = "" if room.quota_left is None else f", quota left {gb(room.quota_left)}"
        return (f"{len(self.runs)} runs: {gb(self.total)} kept ({terms}); peak {gb(self.peak)} with "
                f"{self.concurrency} run(s) at once; {room.path}: free {gb(room.free)}{quota}")  # fmt: skip


def disk_check(budget: DiskBudget, alternatives: list[DiskBudget]) -> Check:
    """Fits, or FAIL with the numbers and the retention settings (from `alternatives`) that fit."""
    name = "disk budget"
    if budget.fits:
        return Check(name, PASS, f"fits: {budget.describe()}")
    fitting = [b for b in alternatives if b.fits]
    if fitting:
        fix = "fits with " + "; or ".join(f"{b.setting} (peak {gb(b.peak)})" for b in fitting)
    else:
        tried = (
            "; ".join(f"{b.setting}: peak {gb(b.peak)}" for b in alternatives)
            or "no retention setting applies"
        )
        fix = f"no retention setting makes it fit ({tried}): free space, or split the sweep"
    return Check(name, FAIL, f"does not fit: {budget.describe()}. {fix}")
