"""`masks import`: bring masks researchers already have into this tool's mask file.

Sources (chosen by what OLD is):
- a directory: an already-pruned Hugging Face checkpoint; mask = (weight != 0) for each tensor
  the target rule selects;
- `.npz`: arrays of 0/1 or bool, keyed by parameter or module names (loaded without pickle);
- `.pt` / `.pth` / `.bin`: the seed project's `{"masks": {module_name: bool tensor}, "metadata":
  {...}}`. Pickle can run code, so these are refused unless the user opts in
  (`allow_pickle=True`, `--allow-pickle`), and then loaded with `torch.load(weights_only=True)`.

Module names (`model.layers.0.self_attn.q_proj`) become parameter names (`...q_proj.weight`).
Every mask is checked against `--model` (tensor exists, same shape), every tensor the target
rule selects must have a mask, and the `--model` weights' checksums (BLAKE3) are recorded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelzoo_ext.errors import UserError
from modelzoo_ext.hf_checkpoint import HFCheckpoint
from modelzoo_ext.masks.checksum import file_sha256, tensor_checksum
from modelzoo_ext.masks.format import MaskWriter
from modelzoo_ext.masks.provenance import source_record
from modelzoo_ext.masks.targets import TargetRule

PICKLE_SUFFIXES = (".pt", ".pth", ".bin")


def _as_bool(name: str, value: Any, where: str) -> torch.Tensor:
    """A bool tensor from a bool or 0/1 tensor/array; anything else is refused."""
    tensor = torch.as_tensor(np.asarray(value)) if not isinstance(value, torch.Tensor) else value
    if tensor.dtype == torch.bool:
        return tensor
    if not ((tensor == 0) | (tensor == 1)).all():
        raise UserError(
            f"mask {name!r} holds values other than 0/1 ({tensor.dtype})",
            where=where,
            fix="store boolean masks (True = kept)",
        )
    return tensor != 0


def _read_pickle(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    try:
        payload = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(
            f"torch.load(weights_only=True) refused the file ({str(exc).splitlines()[0]})",
            where=str(path),
            fix="re-save the masks as plain tensors in a dict, or as .npz",
        ) from exc
    if not isinstance(payload, dict) or not isinstance(payload.get("masks"), dict):
        raise UserError(
            'expected a dict {"masks": {module_name: bool tensor}, "metadata": {...}}',
            where=str(path),
            fix="save the masks in that layout, or as .npz",
        )
    return payload["masks"], payload.get("metadata") or {}


def _read_npz(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    try:
        with np.load(str(path), allow_pickle=False) as data:
            return {key: data[key] for key in data.files}, {}
    except Exception as exc:
        raise UserError(f"cannot read .npz ({exc})", where=str(path), fix="check the file") from exc


def _param_name(key: str, present: set[str], where: str) -> str:
    """A parameter name for a parameter or module name."""
    for candidate in (key, f"{key}.weight"):
        if candidate in present:
            return candidate
    raise UserError(
        f"mask {key!r} matches no tensor of the model (tried {key!r} and {key + '.weight'!r})",
        where=where,
        fix="check that --model is the model these masks were made for",
    )


def _from_pruned_checkpoint(old: Path, rule: TargetRule) -> dict[str, torch.Tensor]:
    pruned = HFCheckpoint(old)
    names = rule.select(pruned.shapes(), where=str(old))
    return {name: weight != 0 for name, weight in pruned.iter_tensors(names)}


def read_foreign_masks(
    old: str | Path, *, allow_pickle: bool = False, rule: TargetRule | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Masks (name as stored -> bool) and a provenance record from a foreign source."""
    old = Path(old)
    rule = rule or TargetRule()
    if old.is_dir():
        return _from_pruned_checkpoint(old, rule), {
            "format": "zeros of a pruned checkpoint",
            "path": str(old),
        }
    if not old.is_file():
        raise UserError("file to import not found", where=str(old), fix="check the path")
    if old.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise UserError(
                f"{old.suffix} files are pickle, which can run code when loaded; refused by default",
                where=str(old),
                fix="pass --allow-pickle if you trust it (it is then loaded with weights_only=True), or use .npz",
            )
        raw, original = _read_pickle(old)
        record = {"format": "seed .pt (torch.load weights_only=True)", "original_metadata": original}
    elif old.suffix == ".npz":
        raw, original = _read_npz(old)
        record = {"format": "npz"}
    else:
        raise UserError(
            f"cannot import {old.suffix or 'this'} files",
            where=str(old),
            fix="import a .pt/.pth (with --allow-pickle), a .npz, or a pruned HF checkpoint directory",
        )
    masks = {str(key): _as_bool(str(key), value, str(old)) for key, value in raw.items()}
    record.update(path=str(old.resolve()), sha256=file_sha256(old))
    return masks, json.loads(json.dumps(record, default=str))


def import_masks(
    old: str | Path,
    model_dir: str | Path,
    out: str | Path,
    *,
    allow_pickle: bool = False,
    include: str | None = None,
    exclude: str | None = None,
) -> dict[str, Any]:
    """Write `out` (our mask file, HF names) from `old`; returns its metadata."""
    rule = TargetRule(include, exclude)
    raw, record = read_foreign_masks(old, allow_pickle=allow_pickle, rule=rule)
    checkpoint = HFCheckpoint(model_dir)
    shapes = checkpoint.shapes()
    where = f"{old} vs {model_dir}"
    masks: dict[str, torch.Tensor] = {}
    for key, mask in raw.items():
        name = _param_name(key, set(shapes), where)
        if name in masks:
            raise UserError(f"two masks map to {name!r}", where=str(old))
        if tuple(mask.shape) != shapes[name]:
            raise UserError(
                f"mask shape {list(mask.shape)} != weight shape {list(shapes[name])} for {name!r}",
                where=where,
                fix="check that --model is the model these masks were made for",
            )
        masks[name] = mask
    missing = rule.missing(shapes, masks)
    if missing:
        raise UserError(
            f"{len(missing)} targeted tensors have no mask, e.g. {missing[:3]}",
            where=str(old),
            fix="restrict the target rule with --include/--exclude to the tensors the file masks",
        )
    writer = MaskWriter(
        out,
        naming="hf",
        metadata={
            "method": "imported",
            "structure": "unstructured",
            "scope": None,
            "seed": None,
            "requested_sparsity": None,
            "target_rule": rule.describe(),
            "source_model": source_record(checkpoint),
            "imported_from": record,
        },
    )
    for name, weight in checkpoint.iter_tensors(sorted(masks)):
        writer.add(name, masks[name], source_checksum=tensor_checksum(weight))
    return writer.write()
