"""Model configs of the ModelZoo variants: the stock Llama/Mistral config plus a `sparse_lora` block.

    model:
      name: sparse_lora_llama          # or sparse_lora_mistral
      ...every key of ModelZoo's `llama` (or `mistral`) model config...
      sparse_lora:
        mode: sparse_to_sparse         # or sparse_to_dense
        r: 16
        alpha: 32.0
        target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]
        mask_path: masks/llama-8b-wanda-0.5.safetensors

Validation is ModelZoo's own (pydantic, `extra="forbid"`): an unknown key anywhere, including in
`sparse_lora`, an unknown mode or a missing `mask_path` fails `cszoo fit` / `cszoo config
validate` before anything is built. `target_modules` are Hugging Face module names; the model
maps them to ModelZoo's modules through `mask_converters.rules`.

Importing this module imports ModelZoo.
"""

from __future__ import annotations

from typing import Literal

from cerebras.modelzoo.models.nlp.llama.model import LlamaModelConfig
from cerebras.modelzoo.models.nlp.mistral.model import MistralModelConfig
from pydantic import field_validator

from mask_converters.rules import hf_module_to_cs_module
from modelzoo_ext.sparse_lora import SparseLoRAConfig


def _check_targets(sparse_lora: SparseLoRAConfig, family: str) -> SparseLoRAConfig:
    """Every HF target must name exactly one ModelZoo decoder module (raises ValueError otherwise)."""
    unknown = []
    for target in sparse_lora.target_modules:
        try:
            hf_module_to_cs_module(target, family)
        except Exception:  # UserError from the rule table; pydantic wants ValueError
            unknown.append(target)
    if unknown:
        raise ValueError(
            f"sparse_lora.target_modules {unknown} name no {family} decoder linear; use Hugging Face "
            "module names: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
        )
    return sparse_lora


class SparseLoRALlamaModelConfig(LlamaModelConfig):
    """ModelZoo's Llama config plus the `sparse_lora` block."""

    name: Literal["sparse_lora_llama"]
    sparse_lora: SparseLoRAConfig
    "Sparse LoRA: mode, rank, targets (Hugging Face module names) and the mask file."

    @field_validator("sparse_lora", mode="after")
    @classmethod
    def _targets_exist(cls, value: SparseLoRAConfig) -> SparseLoRAConfig:
        return _check_targets(value, "llama")

    @property
    def family(self) -> str:
        return "llama"


class SparseLoRAMistralModelConfig(MistralModelConfig):
    """ModelZoo's Mistral config plus the `sparse_lora` block."""

    name: Literal["sparse_lora_mistral"]
    sparse_lora: SparseLoRAConfig
    "Sparse LoRA: mode, rank, targets (Hugging Face module names) and the mask file."

    @field_validator("sparse_lora", mode="after")
    @classmethod
    def _targets_exist(cls, value: SparseLoRAConfig) -> SparseLoRAConfig:
        return _check_targets(value, "mistral")

    @property
    def family(self) -> str:
        return "mistral"
