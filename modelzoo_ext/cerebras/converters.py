"""Entries for ModelZoo's checkpoint-converter registry: one per `sparse_lora_<family>` model.

After `register_converters()`, `cszoo checkpoint convert --model sparse_lora_llama ...` converts
between `hf` and `cs-2.6` ... `cs-X.Y`, X.Y the installed cerebras-pytorch release
(`our_cs_formats()`; the stock llama/mistral lists stop one release earlier, at cs-2.9 in ModelZoo
2.10 and cs-2.5 in 2.6, so `cs-auto` fails there on a checkpoint of the running release;
`newest_stock_cs_format()` is the newest they know). Every tensor goes through the one rule
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

ModelZoo 2.6-2.9's own converter registry (`checkpoint_converters/registry.py`) imports modules
of a `checkpoint_converters.internal` package that their public tree does not ship (`qwen2`; 2.9
also `qwen3`, `qwen3_moe`, `moe_implementation`), so importing it fails and `cszoo checkpoint
convert` fails for every model there. `stand_in_missing_internal_converters()`, run just before
that registry executes, puts stand-in modules for exactly the missing ones into `sys.modules`
(only when the real package cannot be found); `drop_stand_in_entries()`, run just after, removes
the registry entries that hold stand-ins (`qwen2`, ...), so those models are reported as unknown
instead of failing later, and every other model converts with ModelZoo's own code.
`converter_registry_note()` says which were dropped (`sparse-lora modelzoo status`, and a warning
on stderr when the registry loads). No ModelZoo file is touched.

ModelZoo is imported only inside the functions below; the ModelZoo model names themselves are
registered by `modelzoo_ext.cerebras.registration` (which calls these functions around the import
of ModelZoo's converter registry).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import re
import sys
import types
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
from modelzoo_ext.versions import stack_versions

# The releases this package supports; our entries accept those up to the installed one.
SUPPORTED_CS_FORMATS = ("cs-2.6", "cs-2.7", "cs-2.8", "cs-2.9", "cs-2.10")
REJECTED_BY_2_10 = ("norm_first", "use_ff_layer1_dropout")
CONVERTERS_PACKAGE = "cerebras.modelzoo.tools.checkpoint_converters"
INTERNAL_PACKAGE = f"{CONVERTERS_PACKAGE}.internal"
_log = logging.getLogger(__name__)


def _format_key(fmt: str) -> tuple[int, ...]:
    return tuple(int(x) for x in fmt.removeprefix("cs-").split("."))


def our_cs_formats() -> tuple[str, ...]:
    """`cs-2.6` ... up to the installed cerebras-pytorch's release (all five where it is not installed)."""
    client = stack_versions()["cerebras-pytorch"]
    if client is None:
        return SUPPORTED_CS_FORMATS
    installed = _format_key("cs-" + ".".join(client.split(".")[:2]))
    return tuple(f for f in SUPPORTED_CS_FORMATS if _format_key(f) <= installed) or SUPPORTED_CS_FORMATS[:1]


def newest_stock_cs_format(family: str) -> str:
    """The newest `cs-X.Y` ModelZoo's own HF <-> CS converter of `family` accepts (imports ModelZoo).

    `cs-2.5` in ModelZoo 2.6-2.8, `cs-2.9` in 2.9 and 2.10: read from its class, not assumed.
    """
    module, name = FAMILIES[family].modelzoo_checkpoint_converter.rsplit(".", 1)
    converter = getattr(importlib.import_module(module), name)
    cs_side = [f for side in converter.formats() for f in side.formats if re.fullmatch(r"cs-\d+\.\d+", f)]
    return max(cs_side, key=_format_key)


# ----------------------------------------------------------------------------- ModelZoo 2.6-2.9
_stand_ins: list[str] = []  # the missing `internal` modules stood in for
_dropped: list[str] = []  # the registry entries removed because they hold stand-ins


class _StandInModule(types.ModuleType):
    """A module of the missing `internal` package: any converter name it is asked for is a stand-in class."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        stand_in = type(name, (), {"modelzoo_sparse_lora_stand_in": True, "__module__": self.__name__})
        setattr(self, name, stand_in)
        return stand_in


def _internal_modules_imported_by_registry() -> list[str]:
    """The `checkpoint_converters.internal.*` modules ModelZoo's converter registry imports."""
    spec = importlib.util.find_spec(f"{CONVERTERS_PACKAGE}.registry")
    source = spec.loader.get_source(spec.name) if spec and spec.loader else ""
    pattern = rf"^from {re.escape(INTERNAL_PACKAGE)}\.(\w+) import"
    return sorted(set(re.findall(pattern, source or "", flags=re.MULTILINE)))


def stand_in_missing_internal_converters() -> None:
    """Before ModelZoo's converter registry executes: stand-ins for the `internal` modules it imports
    that the installed ModelZoo lacks (ModelZoo 2.6-2.9's public trees). Nothing where they exist."""
    missing = _internal_modules_imported_by_registry()
    if not missing or importlib.util.find_spec(INTERNAL_PACKAGE) is not None:
        return
    package = _StandInModule(INTERNAL_PACKAGE)
    package.__path__ = []
    sys.modules[INTERNAL_PACKAGE] = package
    for name in missing:
        module = _StandInModule(f"{INTERNAL_PACKAGE}.{name}")
        sys.modules[module.__name__] = module
        setattr(package, name, module)
        _stand_ins.append(name)


def drop_stand_in_entries() -> list[str]:
    """After ModelZoo's converter registry executed: remove the entries holding stand-ins; returns their names."""
    from cerebras.modelzoo.tools.checkpoint_converters import registry

    dropped = [
        name
        for name, entries in registry.converters.items()
        if any(getattr(c, "modelzoo_sparse_lora_stand_in", False) for c in entries)
    ]
    for name in dropped:
        del registry.converters[name]
    _dropped.extend(dropped)
    if dropped:
        _log.warning(converter_registry_note())
    return dropped


def converter_registry_note() -> str:
    """One line on ModelZoo's converter registry in this process: as shipped, or which entries were
    dropped because their modules are missing (imports the registry, which runs the steps above)."""
    importlib.import_module(f"{CONVERTERS_PACKAGE}.registry")
    if not _stand_ins:
        return "ModelZoo's converter registry as shipped"
    return (
        f"this ModelZoo's public tree lacks {INTERNAL_PACKAGE} ({', '.join(_stand_ins)}), which its converter "
        "registry imports: modelzoo-sparse-lora stood in for them so that the other converters work; "
        f"conversion of {', '.join(_dropped) or 'the models that need them'} is unavailable here "
        "(`sparse-lora convert` covers llama, mistral and mixtral without the registry)"
    )


@cache
def converter_classes() -> dict[str, type]:
    """Registry name -> checkpoint converter class (built on first use; imports ModelZoo)."""
    from cerebras.modelzoo.tools.checkpoint_converters.base_converter import (
        BaseCheckpointConverter_HF_CS,
        ConversionRule,
        FormatVersions,
    )

    def formats():
        return (FormatVersions("hf"), FormatVersions(*our_cs_formats()))

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
