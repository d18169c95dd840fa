"""What a finished reference run writes: its LoRA factors and the export the run config asks for.

    lora.safetensors        the trained LoRA factors (HF module names)
    masks.safetensors       a copy of the mask file the run used
    adapter/                a PEFT adapter, when `export_kind` says adapter (s2d, dense LoRA)
    merged/                 the merged model, when it says merged (s2s; s2d with
                            preserve_sparsity_on_merge), checked: zero violations or an error
    sparsity_report.json    `check_sparsity` of the merged model against the masks

The choice is `SparseLoRAConfig.export_kind` (`modelzoo_ext.run_config.modes`), the same rule
`convert cs-to-hf` and the sweep use.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from gpu_reference.distributed import load_lora_factors_, lora_factors
from gpu_reference.model import load_hf_model
from modelzoo_ext.atomic import atomic_dir, atomic_file
from modelzoo_ext.errors import UserError
from modelzoo_ext.run_config import SparseLoRAConfig
from modelzoo_ext.sparse_lora import apply_sparse_lora_, check_sparsity, merge_sparse_lora_, save_adapter


def whole_model(
    model: torch.nn.Module, hf_model: str | Path, config: SparseLoRAConfig, masks: dict, rebuild: bool
):
    """The whole trained model on the CPU, in float32. `rebuild` (under FSDP rank 0 holds only a
    shard of the base; a bfloat16 base is not the float32 one on disk): the base from disk plus
    the trained factors."""
    if not rebuild:
        return model.cpu()
    trained = lora_factors(model)
    rebuilt = load_hf_model(hf_model)
    apply_sparse_lora_(rebuilt, config, masks)
    load_lora_factors_(rebuilt, trained)
    return rebuilt


def export_run(
    model: torch.nn.Module, config: SparseLoRAConfig, run_dir: Path, hf_model: str | Path,
    masks: dict[str, torch.Tensor], masks_file: str | None,
) -> str:  # fmt: skip
    """Write the files of the module docstring into `run_dir`; returns the export kind."""
    from safetensors.torch import save_file

    with atomic_file(run_dir / "lora.safetensors") as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in lora_factors(model).items()}, str(tmp))
    if masks_file:
        with atomic_file(run_dir / "masks.safetensors") as tmp:
            shutil.copyfile(masks_file, tmp)
    if config.export_kind == "adapter":
        # Mixtral: PEFT's transformers-5 fused-expert wrapper refuses lora_dropout != 0 (inference ignores it).
        moe = getattr(getattr(model, "config", None), "num_local_experts", None)
        save_adapter(
            model,
            run_dir / "adapter",
            base_model_name_or_path=str(hf_model),
            lora_dropout=0.0 if moe else None,
        )
        return "adapter"
    merge_sparse_lora_(model)
    with atomic_dir(run_dir / "merged") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        for item in Path(hf_model).iterdir():
            if item.is_file() and ("token" in item.name or item.name == "special_tokens_map.json"):
                shutil.copy(item, tmp / item.name)
    if masks:
        report = check_sparsity(model, masks)
        with atomic_file(run_dir / "sparsity_report.json") as tmp:
            tmp.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        if not report.ok:
            raise UserError(
                f"the merged model violates its masks ({report.total_violations} weights)",
                where=str(run_dir / "sparsity_report.json"),
            )
    return "merged"
