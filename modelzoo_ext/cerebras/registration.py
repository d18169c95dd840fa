"""What this package registers with ModelZoo, one function per ModelZoo module it needs.

`modelzoo_ext.cerebras.autoregister` calls each function right after the ModelZoo module it
touches was imported; call `register_all()` to do everything now (it imports ModelZoo).
Every function is idempotent.
"""

from __future__ import annotations

import importlib
import sys

from modelzoo_ext.families import FAMILIES

MODEL_MODULE = "modelzoo_ext.cerebras.model"


def model_paths() -> dict[str, str]:
    """Registry name -> model class path, one per family (`sparse_lora_llama` -> `...SparseLoRALlamaModel`).

    ModelZoo rejects a duplicate class path, so each variant has its own class (generated in
    `modelzoo_ext.cerebras.model` from the same family table).
    """
    return {f.sparse_lora_model: f"{MODEL_MODULE}.SparseLoRA{f.class_stem}Model" for f in FAMILIES.values()}


# Every processor a YAML may name must be listed here, or ModelZoo's validation rejects it.
DATA_PROCESSOR_PATHS = (
    "cerebras.modelzoo.data.nlp.gpt.GptHDF5MapDataProcessor.GptHDF5MapDataProcessor",
    "cerebras.modelzoo.data.nlp.gpt.GptHDF5DataProcessor.GptHDF5DataProcessor",
)

# Modules defining Callback / SparsityAlgorithm subclasses: validation collects subclasses by
# lower-cased class name, so they must be imported before a YAML is validated.
TRAINER_CLASS_MODULES = ("modelzoo_ext.cerebras.callbacks",)


def register_models() -> None:
    """Add the `sparse_lora_<family>` models to ModelZoo's model registry (once)."""
    module = sys.modules.get("cerebras.modelzoo.registry.registry")
    if module is None:
        module = importlib.import_module("cerebras.modelzoo.registry.registry")
    registry = module.registry
    known = {entry.name for entry in registry.registry.models}
    for name, path in model_paths().items():
        if name not in known:
            registry.register_model(name=name, path=path, data_processor_paths=DATA_PROCESSOR_PATHS)


def import_trainer_classes() -> None:
    """Import our Callback and SparsityAlgorithm subclasses so ModelZoo's validation sees them."""
    for module_name in TRAINER_CLASS_MODULES:
        importlib.import_module(module_name)


def prepare_converter_registry() -> None:
    """Before ModelZoo's converter registry executes: stand-ins for the modules it imports but the
    installed release lacks (ModelZoo 2.6-2.9; `modelzoo_ext.cerebras.converters`)."""
    from modelzoo_ext.cerebras import converters

    converters.stand_in_missing_internal_converters()


def register_converters() -> None:
    """Drop the registry entries that hold stand-ins, then add the checkpoint-converter entries for
    our model names (`modelzoo_ext.cerebras.converters`)."""
    from modelzoo_ext.cerebras import converters

    converters.drop_stand_in_entries()
    converters.register_converters()


def register_all() -> None:
    """Register everything now (imports ModelZoo and cerebras-pytorch)."""
    register_models()
    import_trainer_classes()
    register_converters()


def registered_model_names() -> list[str]:
    """The names of ours that ModelZoo's registry currently knows (imports the registry)."""
    from cerebras.modelzoo.registry import registry

    return sorted(set(registry.get_model_names()) & set(model_paths()))
