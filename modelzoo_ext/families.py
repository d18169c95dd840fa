"""The model families this package knows, and every name each one goes by.

One table answers "which family is this?" for every place that asks: a ModelZoo model name in a
run YAML (`llama`, `sparse_lora_llama`), a Hugging Face `config.json` (`model_type`), the
`--family` option of the converters, the ModelZoo registry entries and converter entries this
package adds. The HF <-> CS tensor names of each family are in `modelzoo_ext.name_map`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from modelzoo_ext.errors import UserError

SPARSE_LORA_PREFIX = "sparse_lora_"


@dataclass(frozen=True)
class ModelFamily:
    """One family: its names on the Hugging Face side and on the ModelZoo side.

    `modelzoo_module` holds ModelZoo's stock model class `modelzoo_class` and its config class
    `modelzoo_config_class`; the sparse-LoRA variant registered with ModelZoo is named
    `sparse_lora_<name>`. `moe_implementation` is set for mixture-of-experts families: the
    ModelZoo `moe.moe_implementation` the variant requires (`optimized`: experts fused into
    `[out, E, in]` tensors, the layout ModelZoo's own checkpoint converter writes).
    """

    name: str
    hf_model_type: str
    hf_architecture: str
    modelzoo_model: str
    modelzoo_module: str
    modelzoo_class: str
    modelzoo_config_class: str
    moe_implementation: str | None = None

    @property
    def sparse_lora_model(self) -> str:
        """The ModelZoo registry name of this family's sparse-LoRA variant."""
        return SPARSE_LORA_PREFIX + self.name

    @property
    def class_stem(self) -> str:
        """`Llama`, `Mistral`, `Mixtral`: the stem of the generated class names (`SparseLoRALlamaModel`)."""
        return self.name.title()


FAMILIES: dict[str, ModelFamily] = {
    "llama": ModelFamily(
        name="llama",
        hf_model_type="llama",
        hf_architecture="LlamaForCausalLM",
        modelzoo_model="llama",
        modelzoo_module="cerebras.modelzoo.models.nlp.llama.model",
        modelzoo_class="LlamaModel",
        modelzoo_config_class="LlamaModelConfig",
    ),
    "mistral": ModelFamily(
        name="mistral",
        hf_model_type="mistral",
        hf_architecture="MistralForCausalLM",
        modelzoo_model="mistral",
        modelzoo_module="cerebras.modelzoo.models.nlp.mistral.model",
        modelzoo_class="MistralModel",
        modelzoo_config_class="MistralModelConfig",
    ),
    "mixtral": ModelFamily(
        name="mixtral",
        hf_model_type="mixtral",
        hf_architecture="MixtralForCausalLM",
        modelzoo_model="mixtral",
        modelzoo_module="cerebras.modelzoo.models.nlp.mixtral.model",
        modelzoo_class="MixtralModel",
        modelzoo_config_class="MixtralModelConfig",
        moe_implementation="optimized",
    ),
}
FAMILY_NAMES = tuple(FAMILIES)


def get_family(name: str, *, where: str | None = None) -> ModelFamily:
    """The family called `name` (`llama`, `mistral`, `mixtral`); UserError listing the known ones otherwise."""
    if name not in FAMILIES:
        raise UserError(
            f"unknown model family {name!r}", where=where, fix=f"use one of {', '.join(FAMILY_NAMES)}"
        )
    return FAMILIES[name]


def family_of_model_name(model_name: str | None) -> ModelFamily | None:
    """The family of a ModelZoo model name (`llama`, `sparse_lora_llama`) or class (`LlamaModel`)."""
    for family in FAMILIES.values():
        if model_name in (
            family.name,
            family.modelzoo_model,
            family.sparse_lora_model,
            family.modelzoo_class,
        ):
            return family
    return None


def family_of_hf_config(hf_config: dict[str, Any]) -> ModelFamily | None:
    """The family of a Hugging Face `config.json` (by its `model_type`)."""
    model_type = hf_config.get("model_type")
    return next((f for f in FAMILIES.values() if f.hf_model_type == model_type), None)


def resolve_family(
    family: str | None, *, model_name: str | None = None, hf_config: dict | None = None, where: str
) -> ModelFamily:
    """`family` when given; else the family the model name or the HF config names; else a UserError."""
    if family:
        return get_family(family, where=where)
    found = family_of_model_name(model_name) if model_name else None
    if found is None and hf_config is not None:
        found = family_of_hf_config(hf_config)
    if found is None:
        told = (
            f"model name {model_name!r}"
            if model_name
            else f"model_type {(hf_config or {}).get('model_type')!r}"
        )
        raise UserError(f"cannot tell the model family from {told}", where=where, fix="pass --family")
    return found
