"""Entries for ModelZoo's checkpoint-converter registry: one per `sparse_lora_<family>` model.

After `register_converters()`, `cszoo checkpoint convert --model sparse_lora_llama ...` converts
between `hf` and `cs-2.6` ... `cs-2.10` (the stock llama/mistral lists stop at cs-2.9 in
ModelZoo 2.10, so `cs-auto` fails on a 2.10 checkpoint). Every tensor goes through the one rule
table (`modelzoo_ext.name_map`): base weights, LoRA `lora_A`/`lora_B` and `<param>_mask` buffers
are renamed (and q/k rows permuted) instead of being rejected ("Unable to match all keys") or
dropped by `--drop-unmatched-keys`; keys no rule maps fail the conversion, all named in one error.
The whole state's names are mapped once before any tensor is converted (`pre_model_convert`), by
what `sparse-lora convert` uses too: HF -> CS `name_map.hf_to_cs_state` (experts grouped, the
`ln_f` duplicate written beside the final norm), CS -> HF `canonical_cs_names` (a checkpoint's
keys carry the `model.` prefix all or none) and `cs_duplicate_of` (the duplicate is dropped).

This is a name-and-layout conversion: a CS -> HF result keeps `lora_*` and `*_mask` tensors
under HF names. For a model transformers loads (LoRA folded in, masks checked) or a PEFT
adapter, use `sparse-lora convert cs-to-hf`.

The config converters are ModelZoo's own (`ModelFamily.modelzoo_config_converter`: `llama`/`mistral`,
hf <-> cs-2.1+; `mixtral`, hf <-> cs-2.3+) with the format list extended and the two keys 2.10's config rejects (`norm_first`,
`use_ff_layer1_dropout`) removed from CS configs; an MoE family's CS config (Mixtral) also gets
`moe.moe_implementation: optimized` (the fused experts the checkpoint holds; ModelZoo's own
converter leaves it out, and its default `experimental` cannot load the converted checkpoint).
Mixtral's experts are stacked into / unstacked from the fused tensors by the name map (all E
experts are read when expert 0's key is converted, as ModelZoo's `mixtral` converter does).

ModelZoo is imported only inside `converter_classes()` / `register_converters()`; the ModelZoo
model names themselves are registered by `modelzoo_ext.cerebras.registration` (which calls
`register_converters` when ModelZoo's converter registry is imported).
"""

from __future__ import annotations

import importlib
from functools import cache

from modelzoo_ext.families import FAMILIES, ModelFamily
from modelzoo_ext.name_map import (
    CSSource,
    RopeLayout,
    canonical_cs_names,
    cs_duplicate_of,
    hf_to_cs_state,
    make_cs_tensor,
    to_hf_parts,
)

CS_FORMATS = ("cs-2.6", "cs-2.7", "cs-2.8", "cs-2.9", "cs-2.10")
REJECTED_BY_2_10 = ("norm_first", "use_ff_layer1_dropout")


@cache
def converter_classes() -> dict[str, type]:
    """Registry name -> checkpoint converter class (built on first use; imports ModelZoo)."""
    from cerebras.modelzoo.tools.checkpoint_converters.base_converter import (
        BaseCheckpointConverter_HF_CS,
        ConversionRule,
        FormatVersions,
    )

    def formats():
        return (FormatVersions("hf"), FormatVersions(*CS_FORMATS))

    def strip_rejected(config_converter, family: ModelFamily):
        moe_implementation = family.moe_implementation

        class Config(config_converter):
            def __init__(self):
                super().__init__()
                for key in REJECTED_BY_2_10:  # the stock converter adds them as CS defaults
                    self.post_convert_defaults[1].pop(key, None)

            @staticmethod
            def formats():
                return formats()

            def post_config_convert(self, model, original_config, old_config, new_config, indices, drop):
                new_config = super().post_config_convert(
                    model, original_config, old_config, new_config, indices, drop
                )
                if indices.direction == 0:  # to CS: ModelZoo wraps the section as {"model": {...}}
                    section = new_config.get("model", new_config)
                    for key in REJECTED_BY_2_10:
                        section.pop(key, None)
                    if moe_implementation and "moe" in section:
                        section["moe"] = {**section["moe"], "moe_implementation": moe_implementation}
                return new_config

        return Config

    configs = {  # ModelZoo's own config converter of each family
        family.name: strip_rejected(_import_object(family.modelzoo_config_converter), family)
        for family in FAMILIES.values()
    }

    def checkpoint_converter(family: str):
        class Converter(BaseCheckpointConverter_HF_CS):
            """Every key through `modelzoo_ext.name_map` (weights, LoRA tensors, masks)."""

            def __init__(self):
                super().__init__()
                self.rules = [ConversionRule([r".*"], action=self.convert_by_rule_table)]
                self._made_from: dict[str, list[str]] = {}  # HF: first key -> the CS names it starts
                self._hf_state: dict[str, CSSource] = {}
                self._cs_names: dict[str, str] = {}  # CS: checkpoint key -> canonical CS name

            def pre_model_convert(self, old_state_dict, new_state_dict, configs, converter_indices, drop):
                """Map the whole state's names once, as `convert hf-to-cs` / `cs-to-hf` do."""
                super().pre_model_convert(old_state_dict, new_state_dict, configs, converter_indices, drop)
                if converter_indices.direction == 0:
                    layout = RopeLayout.from_cs_config(configs[1]["model"])
                    where = "the HF checkpoint"
                    self._hf_state = hf_to_cs_state(
                        old_state_dict.keys(), family, layout.num_experts, where=where
                    )
                    self._made_from = {}
                    for cs_name, source in self._hf_state.items():
                        self._made_from.setdefault(source.hf_names[0], []).append(cs_name)
                else:
                    self._cs_names = canonical_cs_names(old_state_dict.keys())

            def convert_by_rule_table(
                self, old_key, new_key, old_state_dict, new_state_dict, from_index, action_fn_args
            ):
                layout = RopeLayout.from_cs_config(action_fn_args["configs"][1]["model"])
                if from_index == 0:  # recomputed keys and experts after the first start nothing
                    made = {}
                    for cs_name in self._made_from.get(old_key, []):
                        source = self._hf_state[cs_name]
                        if source.made_as not in made:  # a duplicate (ln_f) shares its original's tensor
                            made[source.made_as] = make_cs_tensor(
                                source, old_state_dict.__getitem__, family, layout
                            )
                        new_state_dict[cs_name] = made[source.made_as]
                    return
                cs_name = self._cs_names[old_key]
                if cs_duplicate_of(cs_name, family) is not None:
                    return  # the duplicate of a tensor converted under its own name
                for name, tensor in to_hf_parts(cs_name, old_state_dict[old_key], family, layout):
                    new_state_dict[name] = tensor

            @staticmethod
            def formats():
                return formats()

            @staticmethod
            def get_config_converter_class():
                return configs[family]

            @classmethod
            def converter_note(cls) -> str:
                return (
                    f"HF {family} <-> CS sparse_lora_{family}: base weights, LoRA tensors and masks "
                    "through the modelzoo-sparse-lora rule table"
                )

        Converter.__name__ = Converter.__qualname__ = f"Converter_SparseLoRA_{family.title()}_HF_CS"
        return Converter

    return {f.sparse_lora_model: checkpoint_converter(f.name) for f in FAMILIES.values()}


def _import_object(dotted: str):
    """`package.module.Name` -> the object (ModelZoo's classes are imported on first use)."""
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def register_converters() -> None:
    """Add our converters to ModelZoo's registry (idempotent; imports ModelZoo)."""
    from cerebras.modelzoo.tools.checkpoint_converters import registry

    for name, converter in converter_classes().items():
        entries = registry.converters.setdefault(name, [])
        if converter not in entries:
            entries.append(converter)
