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

from mask_converters.cs_checkpoint import CSCheckpoint, EmbeddedMasks
from modelzoo_ext.errors import UserError
from modelzoo_ext.families import resolve_family
from modelzoo_ext.hf_checkpoint import HFCheckpoint
from modelzoo_ext.masks.view import MaskView
from modelzoo_ext.name_map import MASK_SUFFIX, RopeLayout
from modelzoo_ext.run_config import find_model_section, load_yaml
from modelzoo_ext.sparse_lora.check import check_sparsity


def _open_checkpoint(path: Path, family: str | None, config_path: str | Path | None):
    """(source with keys()/get(), naming, family, RopeLayout) for a HF directory or a .mdl."""
    if path.is_dir():
        checkpoint = HFCheckpoint(path)
        config = checkpoint.config
        family = resolve_family(family, hf_config=config, where=str(path)).name
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
    family = resolve_family(family, model_name=model.get("name"), where=str(path)).name
    return checkpoint, "cs", family, RopeLayout.from_cs_config(model)


def _embedded_mask_mismatches(source: CSCheckpoint, masks: MaskView) -> list[str]:
    """Names of `<param>_mask` entries in a .mdl that differ from the mask file's masks."""
    embedded = EmbeddedMasks(source, [key for key in source.keys() if key.endswith(MASK_SUFFIX)])  # noqa: SIM118
    stored = set(embedded.keys())
    return [
        name + MASK_SUFFIX
        for name in masks.keys()  # noqa: SIM118 (not a dict)
        if name in stored and not torch.equal(embedded.get(name), masks.get(name))
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
    masks = MaskView(masks_path, naming, family, layout)
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
