"""`sparse-lora validate`: does a checkpoint on disk respect its masks? (after training, before eval)

The checkpoint is a HF model directory or a CS `.mdl`; the mask file may be in either naming
(it is converted to the checkpoint's naming and row order with the rule table). Per tensor:
nonzeros off the mask (violations), mask and weight densities, and the mask's checksum. A
`.mdl` that embeds `<param>_mask` entries must embed the same masks as the file.

Valid only when at least one tensor was checked, every mask found its weight with the same
shape, and no violation was found (the seed project's validator passed vacuously when nothing
matched; this one cannot).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mask_converters.cs_checkpoint import CSCheckpoint
from mask_converters.cs_config import find_model_section, load_yaml
from mask_converters.cs_to_hf import infer_family
from mask_converters.mask_naming import LazyMasks
from mask_converters.rules import MASK_SUFFIX, RopeLayout
from modelzoo_ext.errors import UserError
from modelzoo_ext.hf_checkpoint import HFCheckpoint
from modelzoo_ext.sparse_lora.check import check_sparsity

HF_FAMILIES = {"llama": "llama", "mistral": "mistral"}


def _open_checkpoint(path: Path, family: str | None, config_path: str | Path | None):
    """(source with keys()/get(), naming, family, RopeLayout) for a HF directory or a .mdl."""
    if path.is_dir():
        checkpoint = HFCheckpoint(path)
        config = checkpoint.config
        family = family or HF_FAMILIES.get(config.get("model_type", ""))
        if family is None:
            raise UserError(
                f"unknown model_type {config.get('model_type')!r}", where=str(path), fix="pass --family"
            )
        return checkpoint, "hf", family, RopeLayout.from_hf_config(config)
    checkpoint = CSCheckpoint(path)
    if config_path is not None:
        model = find_model_section(load_yaml(config_path), str(config_path))
    elif checkpoint.metadata and isinstance(checkpoint.metadata[-1].get("params", {}).get("model"), dict):
        model = checkpoint.metadata[-1]["params"]["model"]
    else:
        raise UserError(
            "the checkpoint records no model config",
            where=str(path),
            fix="pass --config (the run's trainer YAML)",
        )
    return checkpoint, "cs", infer_family(model, family, str(path)), RopeLayout.from_cs_config(model)


def _embedded_mask_mismatches(source: CSCheckpoint, masks: LazyMasks) -> list[str]:
    """Names of `<param>_mask` entries in a .mdl that differ from the mask file's masks."""
    names = set(source.keys())
    return [
        name + MASK_SUFFIX
        for name in masks.keys()  # noqa: SIM118 (not a dict)
        if name + MASK_SUFFIX in names
        and not torch.equal(source.get(name + MASK_SUFFIX).bool(), masks.get(name))
    ]


def validate_checkpoint(
    checkpoint_path: str | Path,
    masks_path: str | Path,
    *,
    family: str | None = None,
    config_path: str | Path | None = None,
) -> dict[str, Any]:
    """Check every mask against the checkpoint's weight of the same name; returns the JSON report."""
    path = Path(checkpoint_path)
    if not Path(masks_path).is_file():
        raise UserError("mask file not found", where=str(masks_path))
    if not path.exists():
        raise UserError(
            "checkpoint not found", where=str(path), fix="pass a HF model directory or a .mdl file"
        )
    source, naming, family, layout = _open_checkpoint(path, family, config_path)
    masks = LazyMasks.from_file(masks_path, family, layout, naming=naming)
    report = check_sparsity(source, masks)
    embedded_mismatches = _embedded_mask_mismatches(source, masks) if naming == "cs" else []
    result = report.to_dict()
    result["ok"] = report.ok and not embedded_mismatches
    result.update(
        checkpoint=str(path),
        masks=str(masks_path),
        naming=naming,
        family=family,
        embedded_mask_mismatches=embedded_mismatches,
    )
    return result
