"""`sparse-lora convert hf-to-cs`: a HF model directory (+ masks) -> a ModelZoo checkpoint.

Output directory:
- `model.mdl`: the model state in ModelZoo's layout (`model.`-prefixed names, q/k rows
  interleaved, the legacy `ln_f` duplicate and a tied `lm_head` that ModelZoo's strict loading
  expects; mapped by `name_map.hf_to_cs_state`, as ModelZoo's registry entries map it), plus
  `<param>_mask` (bool) for every masked weight, permuted like its weight;
- `model_config.yaml`: the `trainer.init.model` section to paste into a trainer YAML (without
  the keys ModelZoo 2.10 rejects);
- `masks_cs.safetensors`: the masks in CS naming (when `--masks` was given);
- `sparse_lora_provenance.json`: the fingerprints of the `.mdl` and of its HF source, and which
  masks it embeds, for the provenance check of every run that starts from it.

Masks must belong to the checkpoint (`modelzoo_ext.masks.provenance`): its source, or its pruned
output; anything else is refused unless `--skip-provenance-check`.

Streaming: tensors are read from the safetensors shards, converted and written one at a time
(see `cs_checkpoint.save_cs_checkpoint`); nothing holds the whole model. Mixtral's experts are
stacked into ModelZoo's fused [out, E, in] tensors (`modelzoo_ext.name_map`), so the peak is one
fused tensor and its E parts (2 x 1.75 GiB in fp32 for Mixtral-8x7B's w1); the model config gets
`moe.moe_implementation: optimized`, the layout that loads this checkpoint. A transformers-5
checkpoint with fused experts is read through the same per-expert names (`HFCheckpoint`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml

from mask_converters.cs_checkpoint import LazyTensor, save_cs_checkpoint
from mask_converters.mask_files import write_view
from modelzoo_ext.atomic import atomic_dir
from modelzoo_ext.errors import UserError
from modelzoo_ext.hf_checkpoint import HFCheckpoint
from modelzoo_ext.masks.format import MaskFile
from modelzoo_ext.masks.provenance import CS_PROVENANCE, check_hf_checkpoint, cs_provenance_record
from modelzoo_ext.masks.view import MaskView
from modelzoo_ext.name_map import (
    MASK_SUFFIX,
    CSSource,
    RopeLayout,
    hf_to_cs_name,
    hf_to_cs_state,
    is_fused,
    make_cs_tensor,
)
from modelzoo_ext.run_config import hf_to_cs_model_config, trainer_yaml_model_section

CHECKPOINT_NAME = "model.mdl"
CONFIG_NAME = "model_config.yaml"
CS_MASKS_NAME = "masks_cs.safetensors"


def _check_masks_fit(masks: MaskFile, checkpoint: HFCheckpoint) -> None:
    present = set(checkpoint.keys())  # noqa: SIM118 (not a dict)
    missing = [name for name in masks.keys() if name not in present]  # noqa: SIM118 (not a dict)
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
    """CS name -> LazyTensor for every HF tensor (`name_map.hf_to_cs_state`: renamed, q/k rows
    permuted, experts stacked, `ln_f` beside the final norm)."""
    where = str(checkpoint.directory)
    state = hf_to_cs_state(checkpoint.keys(), family, layout.num_experts, where=where)
    return {cs_name: _lazy_hf(checkpoint, source, family, layout) for cs_name, source in state.items()}


def _lazy_hf(checkpoint: HFCheckpoint, source: CSSource, family: str, layout: RopeLayout) -> LazyTensor:
    """The CS tensor made of the HF tensors `source.hf_names` (one, or every expert of a fused tensor)."""
    first = checkpoint.entry(source.hf_names[0])
    shape = first.shape
    if is_fused(source.made_as, family):
        shape = (shape[0], len(source.hf_names), *shape[1:])
    return LazyTensor(
        shape,
        getattr(torch, first.dtype),
        lambda: make_cs_tensor(source, checkpoint.get, family, layout),
    )


def _tie_lm_head(state: dict[str, LazyTensor], checkpoint: HFCheckpoint, family: str, config: dict) -> None:
    """A tied `lm_head` (the embedding), which ModelZoo's strict loading expects."""
    lm_head = hf_to_cs_name("lm_head.weight", family)
    if lm_head not in state:
        if not config.get("tie_word_embeddings"):
            raise UserError(
                "the checkpoint has no lm_head.weight and tie_word_embeddings is false",
                where=str(checkpoint.directory),
                fix="pass a causal-LM checkpoint (LlamaForCausalLM/MistralForCausalLM)",
            )
        state[lm_head] = state[hf_to_cs_name("model.embed_tokens.weight", family)]


def _mask_entries(view: MaskView) -> dict[str, LazyTensor]:
    """`<param>_mask` entries (bool, CS row order) for every mask of the view (CS naming)."""
    return {
        name + MASK_SUFFIX: LazyTensor(
            tuple(view.info(name)["shape"]), torch.bool, lambda n=name: view.get(n)
        )
        for name in view.keys()  # noqa: SIM118 (not a dict)
    }


def convert_hf_to_cs(
    model_dir: str | Path,
    out_dir: str | Path,
    family: str,
    masks_path: str | Path | None = None,
    *,
    skip_provenance_check: bool = False,
) -> dict[str, Any]:
    """Convert a HF model directory (and its masks) into `out_dir` (see module docstring).

    The masks must belong to the checkpoint (`modelzoo_ext.masks.provenance`: its source or its
    pruned output) unless `skip_provenance_check`. Returns a summary: paths written, tensor and
    mask counts, how the masks' provenance was accepted, the model section.
    """
    checkpoint = HFCheckpoint(model_dir)
    config = checkpoint.require_config()
    layout = RopeLayout.from_hf_config(config)
    model_section = hf_to_cs_model_config(config, family)
    state = _weight_entries(checkpoint, family, layout)
    _tie_lm_head(state, checkpoint, family, config)
    masks = view = provenance = None
    if masks_path is not None:
        masks = MaskFile(masks_path).require_naming("hf", "convert hf-to-cs")
        _check_masks_fit(masks, checkpoint)
        provenance = check_hf_checkpoint(masks, checkpoint, skip=skip_provenance_check)
        view = MaskView(masks, "cs", family, layout)
        state.update(_mask_entries(view))
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_cs_checkpoint(tmp / CHECKPOINT_NAME, state, model_section)
        (tmp / CONFIG_NAME).write_text(
            yaml.safe_dump(trainer_yaml_model_section(model_section), sort_keys=False)
        )
        if view is not None:
            write_view(view, tmp / CS_MASKS_NAME)
        record = cs_provenance_record(tmp / CHECKPOINT_NAME, checkpoint, masks)
        (tmp / CS_PROVENANCE).write_text(json.dumps(record, indent=2) + "\n")
    return {
        "checkpoint": str(out_dir / CHECKPOINT_NAME),
        "config": str(out_dir / CONFIG_NAME),
        "masks": str(out_dir / CS_MASKS_NAME) if masks is not None else None,
        "tensors": len(state),
        "masked_tensors": len(masks) if masks is not None else 0,
        "masks_provenance": provenance,
        "model": model_section,
    }
