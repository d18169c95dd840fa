"""`masks apply`: write the pruned Hugging Face checkpoint (zeros at pruned positions).

Shard by shard: each output shard has the same file name, tensors and header metadata as its
input shard; the index (if any) and every other file of the model directory (config,
tokenizer, generation config) are copied unchanged. Before the directory appears under its
final name, the result is read back and checked: every masked position is zero and every
other value is bit-identical to the input. A `sparse_lora_pruning.json` records which masks
produced the checkpoint from which source, with the fingerprints the provenance checks compare
(`modelzoo_ext.masks.provenance`). A transformers-5 Mixtral checkpoint keeps its experts fused
(`mlp.experts.gate_up_proj`, ...): the per-expert masks are placed into the stored tensor's
slices (`HFCheckpoint.stored_parts`), so the written file keeps its own layout.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from modelzoo_ext.atomic import atomic_dir
from modelzoo_ext.errors import UserError
from modelzoo_ext.hf_checkpoint import HFCheckpoint, open_shard
from modelzoo_ext.masks import checksum
from modelzoo_ext.masks.format import MaskFile
from modelzoo_ext.masks.provenance import PRUNING_RECORD, pruning_record

# Weights in other formats are never copied next to the pruned safetensors.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _as_bits(tensor: torch.Tensor) -> torch.Tensor:
    """Reinterpret as integers of the same width (compares -0.0, nan payloads bit for bit)."""
    return tensor.contiguous().view(_BITS[tensor.element_size()])


def check_masks_fit(mask_file: MaskFile, checkpoint: HFCheckpoint) -> None:
    """Refuse masks in Cerebras naming, or naming tensors the model lacks, or with other shapes."""
    mask_file.require_naming("hf", "masks apply")
    present = set(checkpoint.keys())
    for name in mask_file.keys():  # noqa: SIM118 (MaskFile is not a dict)
        if name not in present:
            raise UserError(
                f"the mask file has a mask for {name!r}, which the model lacks",
                where=f"{mask_file.path} vs {checkpoint.directory}",
                fix="use masks computed for this model (same architecture and parameter names)",
            )
        if checkpoint.shape(name) != mask_file.shape(name):
            raise UserError(
                f"mask shape {list(mask_file.shape(name))} != weight shape {list(checkpoint.shape(name))} for {name!r}",
                where=f"{mask_file.path} vs {checkpoint.directory}",
                fix="use masks computed for this model",
            )


def _prune(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return weight.masked_fill(~mask, 0)


def _stored_mask(checkpoint: HFCheckpoint, stored: str, weight: torch.Tensor, mask_file: MaskFile):
    """The mask of a stored tensor: its own, or the per-expert masks placed into the slices of a
    fused one (True where no mask covers it); None when no mask covers any of it."""
    parts = {name: index for name, index in checkpoint.stored_parts(stored).items() if name in mask_file}
    if not parts:
        return None
    if list(parts.values()) == [()]:
        return mask_file.get(stored)
    mask = torch.ones(weight.shape, dtype=torch.bool)
    for name, index in parts.items():
        mask[index] = mask_file.get(name)
    return mask


def _check_source(
    checkpoint: HFCheckpoint, stored: str, weight: torch.Tensor, mask_file: MaskFile, shard
) -> None:
    """Each masked part of the stored tensor is the weight the masks were computed for."""
    for name, index in checkpoint.stored_parts(stored).items():
        expected = mask_file.source_checksum(name) if name in mask_file else None
        if expected and not checksum.matches(expected, weight[index].contiguous()):
            raise UserError(
                f"weight {name!r} differs from the one the masks were computed for",
                where=f"{shard} vs {mask_file.path}",
                fix="recompute the masks for this checkpoint",
            )


def _verify_shard(written: Path, original: Path, mask_file: MaskFile, checkpoint: HFCheckpoint) -> None:
    with open_shard(written) as out, open_shard(original) as src:
        if set(out.keys()) != set(src.keys()):
            raise UserError("pruned shard lost tensors", where=str(written))
        for name in src.keys():  # noqa: SIM118 (safe_open is not a dict)
            weight = src.get_tensor(name)
            mask = _stored_mask(checkpoint, name, weight, mask_file)
            before, after = _as_bits(weight), _as_bits(out.get_tensor(name))
            expected = before.masked_fill(~mask, 0) if mask is not None else before
            if not torch.equal(after, expected):
                raise UserError(
                    f"pruned weight {name!r} is not the masked original (masked positions zero, rest identical)",
                    where=str(written),
                    fix="report this as a bug",
                )


def apply_masks(model_dir: str | Path, mask_path: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Write `out_dir`: the model with masked weights zeroed; returns the pruning record."""
    checkpoint = HFCheckpoint(model_dir)
    mask_file = MaskFile(mask_path)
    check_masks_fit(mask_file, checkpoint)
    out_dir = Path(out_dir)
    if out_dir.resolve() == checkpoint.directory.resolve():
        raise UserError(
            "--out is the input model directory", where=str(out_dir), fix="choose a new directory"
        )
    zeroed = 0
    with atomic_dir(out_dir) as tmp:
        for shard, names in tqdm(checkpoint.shards().items(), desc="apply masks", unit="shard", leave=False):
            with open_shard(shard) as f:
                header = f.metadata()
                tensors = {}
                for name in names:
                    weight = f.get_tensor(name)
                    mask = _stored_mask(checkpoint, name, weight, mask_file)
                    if mask is not None:
                        _check_source(checkpoint, name, weight, mask_file, shard)
                        zeroed += mask.numel() - int(torch.count_nonzero(mask))
                        weight = _prune(weight, mask)
                    tensors[name] = weight
            save_file(tensors, str(tmp / shard.name), metadata=header)
            del tensors
            _verify_shard(tmp / shard.name, shard, mask_file, checkpoint)
        for item in checkpoint.directory.iterdir():
            if item.is_file() and item.suffix not in WEIGHT_SUFFIXES and item.name != PRUNING_RECORD:
                shutil.copy2(item, tmp / item.name)
        record = {
            **pruning_record(mask_file, checkpoint, [tmp / shard.name for shard in checkpoint.shards()]),
            "method": mask_file.metadata.get("method"),
            "structure": mask_file.metadata.get("structure"),
            "achieved_sparsity": mask_file.metadata.get("achieved_sparsity"),
            "masked_tensors": len(mask_file),
            "zeroed_positions": zeroed,
        }
        (tmp / PRUNING_RECORD).write_text(json.dumps(record, indent=2))
    return record
