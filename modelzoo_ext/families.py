"""The model families this package knows: their names, their HF <-> CS rule tables and their traits.

One `ModelFamily` entry per family answers every question the package asks about a family:
- its names: a ModelZoo model name in a run YAML (`llama`, `sparse_lora_llama`), a Hugging Face
  `config.json` (`model_type`), the `--family` option of the converters, and the ModelZoo classes,
  registry entries and converter entries this package builds for it;
- its rule table: the module paths of its tensors in HF and in CS naming (`ModuleRule`), which
  `modelzoo_ext.name_map` applies to every tensor that crosses between the two formats;
- its traits, where the code differs between families: sliding-window attention (HF
  `sliding_window`, ModelZoo `attention_sliding_window_length`), `mlp_bias` in the HF config,
  mixture of experts (`moe_implementation`: routed experts, fused on the ModelZoo side).
Adding a family is one entry in `FAMILIES`; nothing else in the package tests a family by name.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from modelzoo_ext.errors import UserError

SPARSE_LORA_PREFIX = "sparse_lora_"
CS_PREFIX = "model."  # the ModelZoo wrapper's attribute holding the GPT2LMHeadModel


@dataclass(frozen=True)
class ModuleRule:
    """One module path in HF naming and in CS naming; `{layer}` stands for a layer index.

    `rope` is "q" or "k" when the module's output rows are rotary query/key channels.
    `fused`: the HF path has an `{expert}` index and CS stacks the experts' tensors on dim 1.
    `lora_target`: whether a LoRA target name may select the module (never the MoE router).
    """

    hf: str
    cs: str
    rope: str | None = None
    fused: bool = False
    lora_target: bool = True


def _in_decoder_layers(rules: Iterable[ModuleRule]) -> tuple[ModuleRule, ...]:
    return tuple(
        ModuleRule(
            f"model.layers.{{layer}}.{r.hf}",
            f"{CS_PREFIX}transformer_decoder.layers.{{layer}}.{r.cs}",
            r.rope,
            r.fused,
            r.lora_target,
        )
        for r in rules
    )


# Inside one decoder layer; checked against ModelZoo 2.10's `llama.py` converter and the
# `state_dict()` of a ModelZoo `LlamaModel` (tests/test_convert_rules.py).
LLAMA_LAYER_RULES = (
    ModuleRule("self_attn.q_proj", "self_attn.proj_q_dense_layer", rope="q"),
    ModuleRule("self_attn.k_proj", "self_attn.proj_k_dense_layer", rope="k"),
    ModuleRule("self_attn.v_proj", "self_attn.proj_v_dense_layer"),
    ModuleRule("self_attn.o_proj", "self_attn.proj_output_dense_layer"),
    ModuleRule("input_layernorm", "norm1"),
    ModuleRule("post_attention_layernorm", "norm3"),
    ModuleRule("mlp.gate_proj", "ffn.ffn.0.linear_layer_for_glu"),
    ModuleRule("mlp.up_proj", "ffn.ffn.0.linear_layer"),
    ModuleRule("mlp.down_proj", "ffn.ffn.1.linear_layer"),
)
LLAMA_RULES = (
    ModuleRule("model.embed_tokens", f"{CS_PREFIX}embedding_layer.word_embeddings"),
    *_in_decoder_layers(LLAMA_LAYER_RULES),
    ModuleRule("model.norm", f"{CS_PREFIX}transformer_decoder.norm"),
    ModuleRule("lm_head", f"{CS_PREFIX}lm_head"),
)
# ModelZoo registers the final norm twice, also under its legacy name `ln_f`.
LLAMA_CS_ALIASES = ((f"{CS_PREFIX}ln_f", f"{CS_PREFIX}transformer_decoder.norm"),)

# Mixtral: Llama's attention and norms, a router and fused experts (ModelZoo 2.10's `mixtral.py`
# converter, `moe_implementation: optimized`; checked tensor for tensor in tests/test_mixtral_*.py).
# ModelZoo's swiglu is `linear_layer(x) * silu(linear_layer_for_glu(x))`: w3 is `linear_layer`.
MIXTRAL_LAYER_RULES = (
    *LLAMA_LAYER_RULES[:6],
    ModuleRule("block_sparse_moe.gate", "ffn.gate", lora_target=False),
    ModuleRule(
        "block_sparse_moe.experts.{expert}.w1", "ffn.experts.fused_ffns.0.linear_layer_for_glu", fused=True
    ),
    ModuleRule("block_sparse_moe.experts.{expert}.w3", "ffn.experts.fused_ffns.0.linear_layer", fused=True),
    ModuleRule("block_sparse_moe.experts.{expert}.w2", "ffn.experts.fused_ffns.1.linear_layer", fused=True),
)
MIXTRAL_RULES = (LLAMA_RULES[0], *_in_decoder_layers(MIXTRAL_LAYER_RULES), *LLAMA_RULES[-2:])

_CONVERTERS = "cerebras.modelzoo.tools.checkpoint_converters"


@dataclass(frozen=True)
class ModelFamily:
    """One family: its names on both sides, its HF <-> CS rule table and its traits.

    Names: `modelzoo_module` holds ModelZoo's stock model class `modelzoo_class` and its config
    class `modelzoo_config_class`; `modelzoo_config_converter` is the dotted path of ModelZoo's
    own HF <-> CS config converter and `modelzoo_checkpoint_converter` that of its checkpoint
    converter (whose formats say the newest `cs-X.Y` the installed ModelZoo knows); the sparse-LoRA variant registered with ModelZoo is named
    `sparse_lora_<name>`.

    Tensors: `rules` map module paths (`modelzoo_ext.name_map` applies them); `cs_aliases` pairs a
    CS module that ModelZoo registers twice (`ln_f`, the legacy name of the final norm) with the
    module it duplicates: HF -> CS writes both (ModelZoo's strict loading wants both keys), CS ->
    HF checks they are equal and keeps one.

    Traits: `sliding_window` (the attention may be limited to a window: HF `sliding_window`,
    ModelZoo `attention_sliding_window_length`); `hf_mlp_bias` (the HF config has `mlp_bias`);
    `moe_implementation`, set for mixture-of-experts families: the ModelZoo
    `moe.moe_implementation` the variant requires (`optimized`: experts fused into `[out, E, in]`
    tensors, the layout ModelZoo's own checkpoint converter writes).
    """

    name: str
    hf_model_type: str
    hf_architecture: str
    modelzoo_model: str
    modelzoo_module: str
    modelzoo_class: str
    modelzoo_config_class: str
    modelzoo_config_converter: str
    modelzoo_checkpoint_converter: str
    rules: tuple[ModuleRule, ...]
    cs_alias_pairs: tuple[tuple[str, str], ...] = LLAMA_CS_ALIASES
    sliding_window: bool = False
    hf_mlp_bias: bool = False
    moe_implementation: str | None = None

    @property
    def sparse_lora_model(self) -> str:
        """The ModelZoo registry name of this family's sparse-LoRA variant."""
        return SPARSE_LORA_PREFIX + self.name

    @property
    def class_stem(self) -> str:
        """`Llama`, `Mistral`, `Mixtral`: the stem of the generated class names (`SparseLoRALlamaModel`)."""
        return self.name.title()

    @property
    def has_experts(self) -> bool:
        """A mixture-of-experts family: routed experts (per expert in HF 4.x, fused in ModelZoo and HF 5)."""
        return self.moe_implementation is not None

    @property
    def cs_aliases(self) -> dict[str, str]:
        """CS module -> the CS module it duplicates."""
        return dict(self.cs_alias_pairs)


FAMILIES: dict[str, ModelFamily] = {
    "llama": ModelFamily(
        name="llama",
        hf_model_type="llama",
        hf_architecture="LlamaForCausalLM",
        modelzoo_model="llama",
        modelzoo_module="cerebras.modelzoo.models.nlp.llama.model",
        modelzoo_class="LlamaModel",
        modelzoo_config_class="LlamaModelConfig",
        modelzoo_config_converter=f"{_CONVERTERS}.llama.ConfigConverter_LLaMa_HF_CS21",
        modelzoo_checkpoint_converter=f"{_CONVERTERS}.llama.Converter_LlamaForCausalLM_HF_CS21",
        rules=LLAMA_RULES,
        hf_mlp_bias=True,
    ),
    "mistral": ModelFamily(  # Llama's tensor layout (ModelZoo's mistral converter subclasses llama's)
        name="mistral",
        hf_model_type="mistral",
        hf_architecture="MistralForCausalLM",
        modelzoo_model="mistral",
        modelzoo_module="cerebras.modelzoo.models.nlp.mistral.model",
        modelzoo_class="MistralModel",
        modelzoo_config_class="MistralModelConfig",
        modelzoo_config_converter=f"{_CONVERTERS}.mistral.ConfigConverter_Mistral_HF_CS21",
        modelzoo_checkpoint_converter=f"{_CONVERTERS}.mistral.Converter_MistralForCausalLM_HF_CS21",
        rules=LLAMA_RULES,
        sliding_window=True,
    ),
    "mixtral": ModelFamily(
        name="mixtral",
        hf_model_type="mixtral",
        hf_architecture="MixtralForCausalLM",
        modelzoo_model="mixtral",
        modelzoo_module="cerebras.modelzoo.models.nlp.mixtral.model",
        modelzoo_class="MixtralModel",
        modelzoo_config_class="MixtralModelConfig",
        modelzoo_config_converter=f"{_CONVERTERS}.mixtral.ConfigConverter_Mixtral_HF_CS23",
        modelzoo_checkpoint_converter=f"{_CONVERTERS}.mixtral.Converter_MixtralForCausalLM_HF_CS23",
        rules=MIXTRAL_RULES,
        sliding_window=True,
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
