"""Save sparse-to-dense LoRA factors as a Hugging Face PEFT adapter.

The directory holds what `peft.PeftModel.from_pretrained(hf_base, dir)` reads:
- `adapter_config.json`: a LoRA config (r, lora_alpha, lora_dropout, target_modules, ...);
- `adapter_model.safetensors`: `base_model.model.<module>.lora_A.weight` [r, in] and
  `...lora_B.weight` [out, r] for every SparseLoRALinear;
plus `sparse_lora.json` (ours; PEFT ignores it): the mode and the checksum of every mask.

s2d computes x (W*M)^T + s x A^T B^T, so the adapter reproduces the trained model only on a base
whose weights are already pruned with the same masks (the pruned HF checkpoint). s2s cannot be a
PEFT adapter at all: its update is masked, (s*B@A) * M, which PEFT's LoRA cannot express; export
the merged model plus the mask file instead. The model must use HF module names.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from modelzoo_ext.atomic import atomic_dir
from modelzoo_ext.errors import UserError
from modelzoo_ext.masks.format import tensor_sha256
from modelzoo_ext.sparse_lora.apply import sparse_lora_layers
from modelzoo_ext.sparse_lora.kernels import SPARSE_TO_SPARSE
from modelzoo_ext.sparse_lora.layer import SparseLoRALinear

PEFT_PREFIX = "base_model.model."


def _peft_target_modules(model: nn.Module, layers: dict[str, SparseLoRALinear]) -> list[str]:
    """Leaf names (q_proj, ...) when they select exactly our layers in PEFT's suffix matching,
    otherwise the full qualified names."""
    leaves = sorted({name.rsplit(".", 1)[-1] for name in layers})
    selected = {
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear | SparseLoRALinear) and name.rsplit(".", 1)[-1] in leaves
    }
    return leaves if selected == set(layers) else sorted(layers)


def _common(layers: dict[str, SparseLoRALinear], attribute: str):
    values = {getattr(layer, attribute) for layer in layers.values()}
    if len(values) != 1:
        raise UserError(
            f"layers disagree on {attribute}: {sorted(values)}",
            fix="export models built by one apply_sparse_lora_ call (one config)",
        )
    return values.pop()


def save_adapter(
    model: nn.Module,
    out_dir: str | Path,
    base_model_name_or_path: str | None = None,
    *,
    lora_dropout: float | None = None,
) -> Path:
    """Write `model`'s sparse-to-dense LoRA factors as a PEFT adapter directory (atomically).

    `lora_dropout` overrides the layers' dropout in `adapter_config.json` (Mixtral exports write
    0.0: PEFT's wrapper of transformers 5's fused experts refuses any other; inference ignores it).

    Raises UserError for sparse-to-sparse layers, merged layers or a model without sparse LoRA.
    Returns `out_dir`.
    """
    layers = sparse_lora_layers(model)
    if not layers:
        raise UserError("the model holds no SparseLoRALinear layers", fix="call apply_sparse_lora_ first")
    s2s = [
        name for name, layer in layers.items() if layer.mode == SPARSE_TO_SPARSE and layer.mask is not None
    ]
    if s2s:
        raise UserError(
            f"sparse_to_sparse cannot be saved as a PEFT adapter ({len(s2s)} layers, e.g. {s2s[0]}): its update "
            "(s*B@A) * M is masked, which a PEFT LoRA adapter cannot express",
            fix="export the merged model (merge_sparse_lora_, zero violations) together with the mask file",
        )
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:
        raise UserError(f"layers are merged ({merged[0]}, ...)", fix="unmerge() before saving an adapter")
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": _common(layers, "r"),
        "lora_alpha": _common(layers, "alpha"),
        "lora_dropout": _common(layers, "dropout_p") if lora_dropout is None else lora_dropout,
        "target_modules": _peft_target_modules(model, layers),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach().contiguous().cpu()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach().contiguous().cpu()
    provenance = {
        "mode": "dense_lora" if all(layer.mask is None for layer in layers.values()) else "sparse_to_dense",
        "requires_base_pruned_with_masks": True,
        "mask_sha256": {
            f"{name}.weight": tensor_sha256(layer.mask)
            for name, layer in layers.items()
            if layer.mask is not None
        },
    }
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "sparse_lora.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return out_dir
