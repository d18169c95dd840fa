"""`sparse-lora convert hf-to-cs`: a HF model directory (+ masks) -> a ModelZoo checkpoint.

Output directory:
- `model.mdl`: the model state in ModelZoo's layout (`model.`-prefixed names, q/k rows
  interleaved), plus `<param>_mask` (bool) for every masked weight, permuted like its weight;
- `model_config.yaml`: the `trainer.init.model` section to paste into a trainer YAML (without
  the keys ModelZoo 2.10 rejects);
- `masks_cs.safetensors`: the masks in CS naming (when `--masks` was given).

Streaming: tensors are read from the safetensors shards, converted and written one at a time
(see `cs_checkpoint.save_cs_checkpoint`); nothing holds the whole model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from mask_converters.cs_checkpoint import LazyTensor, save_cs_checkpoint
from mask_converters.cs_config import hf_to_cs_model_config, trainer_yaml_model_section
from mask_converters.mask_naming import converted_masks, provenance
from mask_converters.rules import (
    HF_RECOMPUTED,
    MASK_SUFFIX,
    RopeLayout,
    cs_aliases,
    hf_to_cs_name,
    map_names,
    to_cs,
)
from modelzoo_ext.atomic import atomic_dir
from modelzoo_ext.errors import UserError
from modelzoo_ext.hf_checkpoint import HFCheckpoint
from modelzoo_ext.masks.format import MaskFile, MaskWriter

CHECKPOINT_NAME = "model.mdl"
CONFIG_NAME = "model_config.yaml"
CS_MASKS_NAME = "masks_cs.safetensors"


def _hf_masks(masks_path: str | Path, family: str, layout: RopeLayout) -> MaskFile:
    masks = MaskFile(masks_path)
    if masks.naming != "hf":
        raise UserError(
            f"hf-to-cs needs masks in HF naming; this file is in {masks.naming!r} naming",
            where=str(masks_path),
            fix="convert it with `sparse-lora masks cs-to-hf` first",
        )
    return masks


def _check_masks_fit(masks: MaskFile, checkpoint: HFCheckpoint) -> None:
    missing = [name for name in masks.keys() if name not in checkpoint.key_to_shard]  # noqa: SIM118 (not a dict)
    if missing:
        raise UserError(
            f"{len(missing)} masks name no tensor of the checkpoint: {missing[:10]}",
            where=str(masks.path),
            fix="use the mask file computed for this model",
        )
    wrong = [
        f"{name}: mask {masks.shape(name)} vs weight {checkpoint.shape(name)}"
        for name in masks.keys()  # noqa: SIM118 (not a dict)
        if masks.shape(name) != checkpoint.shape(name)
    ]
    if wrong:
        raise UserError(f"mask shapes differ from their weights: {wrong[:10]}", where=str(masks.path))


def _weight_entries(checkpoint: HFCheckpoint, family: str, layout: RopeLayout) -> dict[str, LazyTensor]:
    """CS name -> LazyTensor for every HF tensor (renamed, q/k rows permuted)."""
    names = [n for n in checkpoint.keys() if not HF_RECOMPUTED.fullmatch(n)]  # noqa: SIM118 (not a dict)
    mapped = map_names(names, family, to_cs=True, where=str(checkpoint.directory))
    state: dict[str, LazyTensor] = {}
    for hf_name in names:
        state[mapped[hf_name]] = _lazy_hf(checkpoint, hf_name, family, layout)
    return state


def _lazy_hf(checkpoint: HFCheckpoint, hf_name: str, family: str, layout: RopeLayout) -> LazyTensor:
    from safetensors import safe_open

    with safe_open(str(checkpoint.key_to_shard[hf_name]), framework="pt") as f:
        dtype = f.get_slice(hf_name).get_dtype()
    return LazyTensor(
        checkpoint.shape(hf_name),
        _safetensors_dtype(dtype),
        lambda: to_cs(hf_name, checkpoint.get(hf_name), family, layout)[1],
    )


def _safetensors_dtype(name: str):
    import torch

    table = {
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "F64": torch.float64,
        "I64": torch.int64,
        "I32": torch.int32,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
    }
    if name not in table:
        raise UserError(f"unsupported tensor dtype {name} in the checkpoint")
    return table[name]


def _add_derived_entries(
    state: dict[str, LazyTensor], checkpoint: HFCheckpoint, family: str, config: dict
) -> None:
    """CS duplicates (`ln_f`) and a tied `lm_head`, which ModelZoo's strict loading expects."""
    for alias, original in cs_aliases(family).items():
        for suffix in ("weight", "bias"):
            if f"{original}.{suffix}" in state:
                state[f"{alias}.{suffix}"] = state[f"{original}.{suffix}"]
    lm_head = hf_to_cs_name("lm_head.weight", family)
    if lm_head not in state:
        if not config.get("tie_word_embeddings"):
            raise UserError(
                "the checkpoint has no lm_head.weight and tie_word_embeddings is false",
                where=str(checkpoint.directory),
                fix="pass a causal-LM checkpoint (LlamaForCausalLM/MistralForCausalLM)",
            )
        state[lm_head] = state[hf_to_cs_name("model.embed_tokens.weight", family)]


def _mask_entries(masks: MaskFile, family: str, layout: RopeLayout) -> dict[str, LazyTensor]:
    import torch

    entries = {}
    for hf_name in masks.keys():  # noqa: SIM118 (not a dict)
        cs_name = hf_to_cs_name(hf_name, family)
        entries[cs_name + MASK_SUFFIX] = LazyTensor(
            masks.shape(hf_name), torch.bool, lambda n=hf_name: to_cs(n, masks.get(n), family, layout)[1]
        )
    return entries


def convert_hf_to_cs(
    model_dir: str | Path, out_dir: str | Path, family: str, masks_path: str | Path | None = None
) -> dict[str, Any]:
    """Convert a HF model directory (and its masks) into `out_dir` (see module docstring).

    Returns a summary: paths written, tensor and mask counts, the model section.
    """
    checkpoint = HFCheckpoint(model_dir)
    config = checkpoint.config
    if not config:
        raise UserError("config.json is missing", where=str(model_dir), fix="pass a HF model directory")
    layout = RopeLayout.from_hf_config(config)
    model_section = hf_to_cs_model_config(config, family)
    state = _weight_entries(checkpoint, family, layout)
    _add_derived_entries(state, checkpoint, family, config)
    masks = None
    if masks_path is not None:
        masks = _hf_masks(masks_path, family, layout)
        _check_masks_fit(masks, checkpoint)
        state.update(_mask_entries(masks, family, layout))
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_cs_checkpoint(tmp / CHECKPOINT_NAME, state, model_section)
        (tmp / CONFIG_NAME).write_text(
            yaml.safe_dump(trainer_yaml_model_section(model_section), sort_keys=False)
        )
        if masks is not None:
            writer = MaskWriter(tmp / CS_MASKS_NAME, naming="cs", metadata=provenance(masks))
            for name, mask, source in converted_masks(masks, family, layout, to_naming="cs"):
                writer.add(name, mask, source_checksum=source)
            writer.write()
    return {
        "checkpoint": str(out_dir / CHECKPOINT_NAME),
        "config": str(out_dir / CONFIG_NAME),
        "masks": str(out_dir / CS_MASKS_NAME) if masks is not None else None,
        "tensors": len(state),
        "masked_tensors": len(masks) if masks is not None else 0,
        "model": model_section,
    }
