"""`masks validate`: check a mask file on its own and against the model it was computed for.

Checks (each reported as {"check", "ok", "detail"} in a JSON report; the file is valid only when
all hold):
- the file reads: safetensors header, metadata checksum, declared tensors present;
- every mask's checksum (a single flipped bit anywhere in the file fails here or above);
- per-tensor kept counts match the metadata, and the achieved sparsity is recomputed;
- the N:M pattern, when the file's structure is N:M (exactly N kept in every M inputs);
- with `--expected-sparsity S --tolerance T`: |achieved - S| <= T;
- with `--model`: every mask names a tensor of the model with the same shape, every tensor the
  recorded target rule selects has a mask, and each weight's checksum matches the one recorded
  (check `source <algorithm> <name>`: blake3, or sha256 for format-version-1 files). The
  weights are read ahead and hashed on two threads (`stream.py`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from modelzoo_ext.errors import UserError
from modelzoo_ext.hf_checkpoint import HFCheckpoint
from modelzoo_ext.masks import checksum
from modelzoo_ext.masks.format import MaskFile
from modelzoo_ext.masks.select import Structure
from modelzoo_ext.masks.stream import pipeline
from modelzoo_ext.masks.targets import TargetRule


class Report:
    """Accumulates check results."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.checks: list[dict[str, Any]] = []

    def add(self, check: str, ok: bool, detail: str = "") -> bool:
        self.checks.append({"check": check, "ok": bool(ok), "detail": detail})
        return ok

    @property
    def ok(self) -> bool:
        return all(c["ok"] for c in self.checks)

    def as_dict(self, **extra: Any) -> dict[str, Any]:
        failures = [c for c in self.checks if not c["ok"]]
        return {
            "mask_file": str(self.path),
            "valid": self.ok,
            "failures": len(failures),
            **extra,
            "checks": self.checks,
        }


def _n_m_violations(mask: torch.Tensor, n: int, m: int) -> int:
    """How many groups of m consecutive inputs do not keep exactly n."""
    out_features, in_features = mask.shape
    if in_features % m:
        return out_features * ((in_features + m - 1) // m)
    kept = mask.reshape(out_features, in_features // m, m).sum(dim=-1)
    return int(torch.count_nonzero(kept != n))


def _check_masks(mask_file: MaskFile, report: Report) -> tuple[int, int]:
    """Checksums, counts and N:M pattern of every mask; returns (kept, numel) over the file."""
    structure_text = mask_file.metadata.get("structure", "unstructured")
    structure = Structure.parse(structure_text) if ":" in str(structure_text) else None
    kept_total = numel_total = 0
    for name in tqdm(mask_file.keys(), desc="validate masks", unit="tensor", leave=False):
        info = mask_file.info(name)
        try:
            mask = mask_file.get(name)
        except UserError as exc:
            report.add(f"checksum {name}", False, str(exc))
            continue
        report.add(f"checksum {name}", True)
        kept = int(torch.count_nonzero(mask))
        report.add(f"kept count {name}", kept == info["kept"], f"file {kept}, metadata {info['kept']}")
        kept_total += kept
        numel_total += mask.numel()
        if structure is not None:
            bad = _n_m_violations(mask, structure.n, structure.m)
            report.add(f"{structure} pattern {name}", bad == 0, f"{bad} groups violate {structure}")
    return kept_total, numel_total


def _check_against_model(mask_file: MaskFile, model_dir: str | Path, report: Report) -> None:
    checkpoint = HFCheckpoint(model_dir)
    present = set(checkpoint.keys())
    usable = []
    for name in mask_file.keys():  # noqa: SIM118 (MaskFile is not a dict)
        if name not in present:
            report.add(f"tensor exists {name}", False, f"the model {model_dir} has no tensor {name!r}")
            continue
        shape, expected = checkpoint.shape(name), mask_file.shape(name)
        if report.add(f"shape {name}", shape == expected, f"mask {list(expected)}, weight {list(shape)}"):
            usable.append(name)
    rule = TargetRule.from_metadata(mask_file.metadata.get("target_rule"))
    if rule is not None:
        missing = rule.missing(present, mask_file.keys())
        report.add("every targeted tensor has a mask", not missing, f"missing: {missing[:10]}")
    recorded = {n: mask_file.source_checksum(n) for n in usable}
    entries = checkpoint.entries([n for n in usable if recorded[n]])
    if not entries:
        return

    def same_source(entry, raw) -> tuple[str, str, bool]:
        algorithm = checksum.algorithm_of(recorded[entry.name])
        return entry.name, algorithm, checksum.array_checksum(raw, algorithm) == recorded[entry.name]

    budget = max(64 << 20, 2 * max(e.nbytes for e in entries))
    results = pipeline(checkpoint.read, entries, same_source, workers=2, budget=budget)
    for name, algorithm, same in tqdm(
        results, total=len(entries), desc="hash weights", unit="tensor", leave=False
    ):
        report.add(
            f"source {algorithm} {name}",
            same,
            "" if same else "the weight differs from the one the mask was computed for",
        )


def validate_masks(
    mask_path: str | Path,
    *,
    model_dir: str | Path | None = None,
    expected_sparsity: float | None = None,
    tolerance: float = 0.0,
) -> dict[str, Any]:
    """Run every check; returns the JSON report (`report["valid"]` is True only if all hold)."""
    report = Report(Path(mask_path))
    try:
        mask_file = MaskFile(mask_path)
    except UserError as exc:
        report.add("file readable", False, str(exc))
        return report.as_dict()
    report.add("file readable", True, "header, metadata checksum and tensor list")
    kept, numel = _check_masks(mask_file, report)
    achieved = 1.0 - kept / max(numel, 1)
    recorded = mask_file.metadata.get("achieved_sparsity")
    report.add(
        "achieved sparsity matches metadata",
        recorded is not None and abs(achieved - recorded) < 1e-12,
        f"recomputed {achieved}, metadata {recorded}",
    )
    if expected_sparsity is not None:
        report.add(
            "expected sparsity",
            abs(achieved - expected_sparsity) <= tolerance,
            f"achieved {achieved:.6f}, expected {expected_sparsity} +- {tolerance}",
        )
    if model_dir is not None:
        _check_against_model(mask_file, model_dir, report)
    return report.as_dict(
        achieved_sparsity=achieved,
        tensors=len(mask_file),
        method=mask_file.metadata.get("method"),
        structure=mask_file.metadata.get("structure"),
    )
