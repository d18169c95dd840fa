"""Model configs of the ModelZoo variants: each family's stock config plus a `sparse_lora` block.

    model:
      name: sparse_lora_llama          # sparse_lora_<family> for every family of modelzoo_ext.families
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
maps them to ModelZoo's modules through `modelzoo_ext.name_map`.

Mixture-of-experts families (`ModelFamily.moe_implementation`, Mixtral): `moe.moe_implementation`
defaults to the family's (`optimized`, the fused `[out, E, in]` experts that ModelZoo's own
checkpoint converter writes and our name map stacks into) and any other value is refused:
ModelZoo's default (`experimental`) names its experts per expert and cannot load those
checkpoints.

One config class per family, generated from the family table (ModelZoo needs a distinct class
per registered name): `SparseLoRALlamaModelConfig`, `SparseLoRAMistralModelConfig`, ...
Importing this module imports ModelZoo.
"""

# No `from __future__ import annotations`: the generated classes' annotations must be objects
# (pydantic evaluates them when the class is created, where `family` is a local).
import importlib
from typing import Literal

from pydantic import field_validator, model_validator

from modelzoo_ext.families import FAMILIES, ModelFamily
from modelzoo_ext.name_map import hf_module_to_cs_module
from modelzoo_ext.run_config.modelzoo_fields import MODELZOO_ALIASES
from modelzoo_ext.run_config.sparse_lora_block import SparseLoRAConfig

# The names ModelZoo accepts the `moe` block under (its alias and its field name).
MOE_SPELLINGS = ("moe", *(name for name, alias in MODELZOO_ALIASES.items() if alias == "moe"))


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
            "module names: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj (Mixtral: w1, w2, w3; "
            "never the router `gate`)"
        )
    return sparse_lora


def _with_moe_implementation(data, spec: ModelFamily):
    """`moe.moe_implementation` defaults to the family's and must equal it (raises ValueError).

    Runs on the raw YAML (`moe:` a dict) and again when pydantic revalidates the built config
    (`moe_params` then holds the MoEConfig object, which is only checked).
    """
    key = next((k for k in MOE_SPELLINGS if isinstance(data, dict) and k in data), None)
    if spec.moe_implementation is None or key is None:
        return data
    moe = data[key]
    if moe is not None and not isinstance(moe, dict):
        chosen = getattr(moe, "moe_implementation", spec.moe_implementation)
    else:
        moe = dict(moe or {})
        chosen = moe.setdefault("moe_implementation", spec.moe_implementation)
        data = {**data, key: moe}
    if chosen != spec.moe_implementation:
        raise ValueError(
            f"{spec.sparse_lora_model} needs moe.moe_implementation: {spec.moe_implementation} (experts fused "
            f"into [out, E, in], the layout of `sparse-lora convert hf-to-cs` and ModelZoo's converter); got {chosen!r}"
        )
    return data


def stock_config_class(family: ModelFamily) -> type:
    """ModelZoo's own config class of `family` (e.g. `LlamaModelConfig`)."""
    return getattr(importlib.import_module(family.modelzoo_module), family.modelzoo_config_class)


def _config_class(spec: ModelFamily) -> type:
    # `spec`, not `family`: the class body defines a `family` property, which would hide the
    # enclosing variable from the annotations above it.
    class Config(stock_config_class(spec)):
        name: Literal[spec.sparse_lora_model]
        sparse_lora: SparseLoRAConfig
        "Sparse LoRA: mode, rank, targets (Hugging Face module names) and the mask file."

        @model_validator(mode="before")
        @classmethod
        def _moe_implementation(cls, data):
            return _with_moe_implementation(data, spec)

        @field_validator("sparse_lora", mode="after")
        @classmethod
        def _targets_exist(cls, value: SparseLoRAConfig) -> SparseLoRAConfig:
            return _check_targets(value, spec.name)

        @property
        def family(self) -> str:
            """The model family (`llama`, `mistral`, ...)."""
            return spec.name

    Config.__name__ = Config.__qualname__ = f"SparseLoRA{spec.class_stem}ModelConfig"
    Config.__module__ = __name__
    Config.__doc__ = f"ModelZoo's {spec.modelzoo_config_class} plus the `sparse_lora` block."
    return Config


CONFIG_CLASSES: dict[str, type] = {name: _config_class(family) for name, family in FAMILIES.items()}
globals().update({cls.__name__: cls for cls in CONFIG_CLASSES.values()})  # importable by name (pickle)
