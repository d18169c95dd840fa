"""Does a set of weights respect its masks? Exact zeros off the mask, counted per tensor.

Every export of the project calls `check_sparsity` and refuses to write a "sparse" model whose
report is not `.ok`. It checks the tensors as stored: merge a sparse-LoRA model first
(`merge_sparse_lora_`) to check what it computes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from modelzoo_ext.masks.format import tensor_sha256


class _TensorSource(Protocol):
    def keys(self): ...
    def get(self, name: str): ...


@dataclass
class TensorCheck:
    """One masked tensor: `violations` = entries != 0 where the mask is False (NaN counts)."""

    name: str
    shape: list[int]
    violations: int
    mask_density: float
    weight_density: float
    mask_sha256: str


@dataclass
class SparsityReport:
    """Per-tensor checks, plus the mask names the weights lack and shapes that disagree."""

    tensors: list[TensorCheck] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    shape_mismatches: list[str] = field(default_factory=list)

    @property
    def matched(self) -> int:
        """How many masks found a weight of the same shape."""
        return len(self.tensors)

    @property
    def total_violations(self) -> int:
        return sum(t.violations for t in self.tensors)

    @property
    def ok(self) -> bool:
        """True only when something was checked, every mask matched, and no violation was found."""
        return (
            self.matched > 0 and not self.missing and not self.shape_mismatches and self.total_violations == 0
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (for run records and export metadata)."""
        return {
            "ok": self.ok,
            "matched": self.matched,
            "total_violations": self.total_violations,
            "missing": list(self.missing),
            "shape_mismatches": list(self.shape_mismatches),
            "tensors": [asdict(t) for t in self.tensors],
        }

    def __str__(self) -> str:
        status = "OK" if self.ok else "FAILED"
        text = (
            f"sparsity check {status}: {self.matched} tensors, {self.total_violations} violations, "
            f"{len(self.missing)} missing, {len(self.shape_mismatches)} shape mismatches"
        )
        bad = [f"  {t.name}: {t.violations} nonzeros off the mask" for t in self.tensors if t.violations]
        return "\n".join([text, *bad, *(f"  missing: {n}" for n in self.missing), *self.shape_mismatches])


@torch.no_grad()
def check_tensor(name: str, weight: torch.Tensor, mask: torch.Tensor) -> TensorCheck:
    """Count nonzeros of `weight` [out, in] where `mask` (bool, same shape) is False."""
    mask = mask.to(device=weight.device, dtype=torch.bool)
    nonzero = weight != 0
    return TensorCheck(
        name=name,
        shape=list(weight.shape),
        violations=int((nonzero & ~mask).sum()),
        mask_density=float(mask.sum()) / max(1, mask.numel()),
        weight_density=float(nonzero.sum()) / max(1, weight.numel()),
        mask_sha256=tensor_sha256(mask),
    )


def check_sparsity(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor] | _TensorSource,
    masks: Mapping[str, torch.Tensor] | _TensorSource,
) -> SparsityReport:
    """Check every mask against the weight of the same name.

    Args:
        model_or_state_dict: an nn.Module (its `state_dict()`), a dict name -> tensor, or any
            object with `.keys()` and `.get(name)` (e.g. `HFCheckpoint`, read one tensor at a time).
        masks: dict name -> bool [out, in], or a `MaskFile` (read lazily).
    Returns a `SparsityReport`; it is never `.ok` when no mask matched.
    """
    source = (
        model_or_state_dict.state_dict()
        if isinstance(model_or_state_dict, nn.Module)
        else model_or_state_dict
    )
    names = set(source.keys())
    report = SparsityReport()
    for name in sorted(masks.keys()):
        if name not in names:
            report.missing.append(name)
            continue
        weight, mask = source.get(name), masks.get(name)
        if tuple(weight.shape) != tuple(mask.shape):
            report.shape_mismatches.append(
                f"{name}: weight {tuple(weight.shape)} vs mask {tuple(mask.shape)}"
            )
            continue
        report.tensors.append(check_tensor(name, weight, mask))
    return report
