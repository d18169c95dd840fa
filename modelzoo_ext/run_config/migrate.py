"""A user's ModelZoo run config -> a sparse-LoRA one (`sparse-lora migrate-config`), and the refusal
of ModelZoo's own `Lora` callback next to a sparse-LoRA model.

ModelZoo's `Lora` callback (`trainer.init.callbacks: - Lora: {lora_params: {r, alpha, dropout,
target_modules, ...}}`; ModelZoo matches callback names lower-cased, so `lora` and `LoRA` are the
same callback, and a legacy `model.lora_params` becomes it) replaces every `nn.Linear` /
`nn.Embedding` whose class-name ancestry holds all of `target_modules` by its own dense LoRA layer.
Next to a sparse-LoRA model it wraps the variant's inner weights and the LM head: a second,
unmasked adapter. Both backends refuse it with `lora_callback_refusal()`.

`migrate_run_config` keeps everything of the input except:
- `model.name` `llama` / `mistral` / `mixtral` -> the family's variant (`sparse_lora_llama`, ...);
- the `Lora` callback -> the `sparse_lora` block: r, alpha, dropout, and `target_modules` spelled
  out as the Hugging Face projections ModelZoo's callback would have wrapped (`Linear`: every
  decoder projection that is an `nn.Linear`, found with ModelZoo's own matching rule on the class
  names of the family's model, `MODELZOO_CLASS_PATHS`, tested against the installed ModelZoo).
  What it would also have wrapped and sparse LoRA does not adapt (LM head, embeddings, a MoE
  router) is reported. Without a `Lora` callback the block gets the defaults (r 16, alpha 32,
  the family's projections);
- `sparse_lora.mode` / `mask_path` from the command line; callbacks `SparseLoRAMasks` and
  `SparseLoRALossLog` added; `checkpoint.disable_strict_checkpoint_loading: true` (the base has no
  LoRA or mask tensors); Mixtral's `moe.moe_implementation: optimized` (the variant's layout).
Each change is listed in `Migration.changes`. A `sparsity:` section is refused (masks come from
`mask_path`). No `cerebras` import: the tables are plain data.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from modelzoo_ext.errors import UserError
from modelzoo_ext.families import FAMILIES
from modelzoo_ext.run_config.modes import yaml_mode
from modelzoo_ext.run_config.sparse_lora_block import DEFAULT_TARGET_MODULES

LORA_CALLBACK = "lora"  # ModelZoo's `Lora`, matched lower-cased as ModelZoo's validation does
LORA_KEYS = {"r", "alpha", "dropout", "target_modules", "fan_in_fan_out", "merge_weights"}  # LoraConfig
OUR_CALLBACKS = ("SparseLoRAMasks", "SparseLoRALossLog")

_DECODER_LAYER = ("TransformerDecoder", "ModuleList", "TransformerDecoderLayer")
_DENSE_FFN = (*_DECODER_LAYER, "FeedForwardNetwork", "ModuleList", "SingleFeedForwardLayer", "Linear")
_ATTENTION_CLASSES = {"multiquery_attention": "MultiQueryAttention", "aiayn_attention": "MultiheadAttention"}


def lora_callback_refusal(where: str) -> UserError:
    """The one message both backends give for ModelZoo's `Lora` callback in a sparse-LoRA run."""
    return UserError(
        "ModelZoo's own `Lora` callback would add a second, dense and unmasked LoRA next to sparse_lora's "
        "(it wraps the sparse-LoRA layers' inner weights and the LM head), so a sparse_to_sparse run would "
        "no longer keep the mask",
        where=where,
        fix="remove the callback and put its settings in the model's `sparse_lora` block: lora_params.r -> "
        "sparse_lora.r, alpha -> alpha, dropout -> dropout, target_modules (ModelZoo class names such as "
        "Linear) -> Hugging Face projection names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
        "down_proj); `sparse-lora migrate-config IN.yaml --out OUT.yaml --mask-path MASKS` does it",
    )


def is_lora_callback(entry: Any) -> bool:
    """Whether a `trainer.init.callbacks` entry is ModelZoo's `Lora` callback (any spelling)."""
    name = next(iter(entry)) if isinstance(entry, dict) and len(entry) == 1 else entry
    return isinstance(name, str) and name.lower() == LORA_CALLBACK


def modelzoo_class_paths(family: str, attention_module: str) -> dict[str, tuple[str, ...]]:
    """HF name of each `nn.Linear` / `nn.Embedding` of ModelZoo's `family` model -> its class-name
    ancestry (what ModelZoo's `Lora` matches `target_modules` against), e.g. q_proj ->
    (LlamaModel, GPT2LMHeadModel, TransformerDecoder, ModuleList, TransformerDecoderLayer,
    MultiQueryAttention, Linear). Mixtral's experts are fused parameters, not `nn.Linear`: absent."""
    spec = FAMILIES[family]
    root = (spec.modelzoo_class, "GPT2LMHeadModel")
    if attention_module not in _ATTENTION_CLASSES:
        raise UserError(
            f"attention_module {attention_module!r} is not one sparse LoRA supports",
            where="trainer.init.model.attention_module",
            fix=f"use one of {sorted(_ATTENTION_CLASSES)}",
        )
    attention = (*root, *_DECODER_LAYER, _ATTENTION_CLASSES[attention_module], "Linear")
    paths = {name: attention for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
    if spec.moe_implementation:
        paths["gate"] = (*root, *_DECODER_LAYER, "SparseMoEBlock", "Linear")  # the router
    else:
        paths.update({name: (*root, *_DENSE_FFN) for name in ("gate_proj", "up_proj", "down_proj")})
    paths["lm_head"] = (*root, "Linear")
    paths["embed_tokens"] = (*root, "EmbeddingLayer", "Embedding")
    return paths


def wrapped_by_modelzoo_lora(
    target_modules: list[str] | None, family: str, attention_module: str
) -> list[str]:
    """HF names of the modules ModelZoo's `Lora` wraps: all of `target_modules` in the class-name
    ancestry (None: every Linear and Embedding), ModelZoo's `get_lora_config_for_module` rule."""
    return [
        name
        for name, ancestry in modelzoo_class_paths(family, attention_module).items()
        if target_modules is None or all(t in ancestry for t in target_modules)
    ]


def all_projections(family: str) -> list[str]:
    """Every decoder projection sparse LoRA can adapt in `family` (HF names; Mixtral: its experts)."""
    attention = ["q_proj", "k_proj", "v_proj", "o_proj"]
    return attention + (
        ["w1", "w2", "w3"] if FAMILIES[family].moe_implementation else DEFAULT_TARGET_MODULES[4:]
    )


@dataclass
class Migration:
    """The migrated run config and what changed, one line each."""

    params: dict[str, Any]
    changes: list[str] = field(default_factory=list)


def _family_of(name: Any, where: str) -> str:
    for family in FAMILIES.values():
        if name == family.modelzoo_model:
            return family.name
        if name == family.sparse_lora_model:
            raise UserError(f"model.name is already {name!r}: nothing to migrate", where=where)
    stock = ", ".join(f.modelzoo_model for f in FAMILIES.values())
    raise UserError(f"model.name {name!r} has no sparse-LoRA variant", where=where, fix=f"one of: {stock}")


def _lora_settings(entry: dict[str, Any], where: str) -> dict[str, Any]:
    """The one LoraConfig of a `Lora` callback entry, its keys checked."""
    settings = next(iter(entry.values())) or {}
    groups = settings.get("lora_params") if isinstance(settings, dict) else None
    if isinstance(groups, list):
        if len(groups) != 1:
            raise UserError(
                f"the Lora callback has {len(groups)} lora_params groups; sparse_lora has one r/alpha/dropout",
                where=where,
                fix="keep one group (or migrate by hand, one run per group)",
            )
        groups = groups[0]
    if not isinstance(groups, dict):
        raise UserError("the Lora callback has no lora_params mapping", where=where)
    unknown = set(groups) - LORA_KEYS
    if unknown:
        raise UserError(f"unknown lora_params keys {sorted(unknown)}", where=where)
    if groups.get("fan_in_fan_out"):
        raise UserError("lora_params.fan_in_fan_out: true has no sparse-LoRA equivalent", where=where)
    return groups


def migrate_run_config(
    params: dict[str, Any], *, mode: str = "s2s", mask_path: str | None = None, where: str = "config"
) -> Migration:
    """`params` (a ModelZoo trainer YAML, LoRA or not) as a sparse-LoRA run config; see the module docstring.

    mode: `s2s`, `s2d` (both need `mask_path`) or `lora` (the dense baseline, no masks).
    """
    out = copy.deepcopy(params)
    trainer = out.get("trainer")
    if not isinstance(trainer, dict) or not isinstance(trainer.get("init", {}).get("model"), dict):
        raise UserError("expected one trainer (trainer.init.model)", where=where)
    init, changes = trainer["init"], []
    model = init["model"]
    family = _family_of(model.get("name"), f"{where}: trainer.init.model.name")
    if init.get("sparsity") is not None:
        raise UserError(
            "a `sparsity:` section cannot be migrated: sparse LoRA takes its masks from sparse_lora.mask_path",
            where=f"{where}: trainer.init.sparsity",
            fix="remove it and pass the mask file with --mask-path",
        )
    yaml_name, dense_baseline = yaml_mode(mode)
    if dense_baseline == (mask_path is not None):
        raise UserError(
            "--mask-path is needed for s2s/s2d and must be left out for lora", where="--mask-path"
        )
    callbacks = list(init.get("callbacks") or [])
    loras = [entry for entry in callbacks if is_lora_callback(entry)]
    if len(loras) > 1:
        raise UserError("more than one Lora callback", where=f"{where}: trainer.init.callbacks")
    attention = model.get("attention_module", "aiayn_attention")
    block: dict[str, Any] = {"mode": yaml_name}
    if loras:
        settings = _lora_settings(loras[0], f"{where}: trainer.init.callbacks.Lora")
        wrapped = wrapped_by_modelzoo_lora(settings.get("target_modules"), family, attention)
        targets = [n for n in DEFAULT_TARGET_MODULES if n in wrapped]
        if not targets:
            raise UserError(
                f"Lora target_modules {settings.get('target_modules')} match no decoder projection of {family}",
                where=f"{where}: trainer.init.callbacks.Lora",
            )
        block.update(
            r=int(settings.get("r", 0)) or 16,
            alpha=float(settings.get("alpha", 1)),
            dropout=float(settings.get("dropout", 0.0)),
            target_modules=targets,
        )
        callbacks.remove(loras[0])
        changes.append(
            f"callbacks: Lora (lora_params {settings}) -> sparse_lora r={block['r']} alpha={block['alpha']} "
            f"dropout={block['dropout']} target_modules={targets}"
        )
        if not settings.get("r"):
            changes.append("  lora_params.r was 0 or unset (ModelZoo: no LoRA): sparse_lora.r = 16")
        skipped = [n for n in wrapped if n not in targets]
        if skipped:
            changes.append(
                f"  ModelZoo's Lora also wrapped {skipped}: sparse LoRA adapts decoder projections only; "
                "those stay frozen"
            )
        if FAMILIES[family].has_experts:
            changes.append(
                "  the experts (Mixtral: w1, w2, w3) are fused parameters that ModelZoo's Lora does not wrap; "
                "add them to sparse_lora.target_modules to adapt them too"
            )
        if settings.get("merge_weights"):
            changes.append(
                "  lora_params.merge_weights dropped: `sparse-lora convert cs-to-hf --as merged` merges, "
                "keeping the mask"
            )
    else:
        block["target_modules"] = all_projections(family)
        changes.append(
            f"no Lora callback: sparse_lora gets the defaults r=16 alpha=32.0 dropout=0.0 "
            f"target_modules={block['target_modules']}"
        )
    block.update({"dense_baseline": True} if dense_baseline else {"mask_path": mask_path})
    model["name"] = FAMILIES[family].sparse_lora_model
    model["sparse_lora"] = block
    changes.insert(0, f"model.name: {FAMILIES[family].modelzoo_model} -> {model['name']}")
    changes.append(
        f"model.sparse_lora: mode {yaml_name}, "
        + (f"mask_path {mask_path}" if mask_path else "dense_baseline")
    )
    _set_moe_implementation(model, family, changes)
    for name in OUR_CALLBACKS:
        if not any(isinstance(c, dict) and name in c for c in callbacks):
            callbacks.append({name: {}})
            changes.append(f"callbacks: + {name}")
    init["callbacks"] = callbacks
    _note_data_processors(out, changes)
    checkpoint = init.setdefault("checkpoint", {})
    if checkpoint.get("disable_strict_checkpoint_loading") is not True:
        checkpoint["disable_strict_checkpoint_loading"] = True
        changes.append(
            "checkpoint.disable_strict_checkpoint_loading: true (the base has no LoRA or mask tensors)"
        )
    return Migration(out, changes)


def _note_data_processors(params: dict[str, Any], changes: list[str]) -> None:
    """Kept as they are, but said: the reference trainer reads fine-tuning data only."""
    fit = params["trainer"].get("fit") or {}
    loaders = [fit.get("train_dataloader")] + (
        fit.get("val_dataloader")
        if isinstance(fit.get("val_dataloader"), list)
        else [fit.get("val_dataloader")]
    )
    others = sorted(
        {d.get("data_processor") for d in loaders if isinstance(d, dict)} - {"GptHDF5MapDataProcessor"}
    )
    if others:
        changes.append(
            f"  kept data_processor {others}: `sparse-lora train` reads GptHDF5MapDataProcessor only (fine-tuning "
            "data from `cszoo data_preprocess` or `sparse-lora data prepare`)"
        )


def _set_moe_implementation(model: dict[str, Any], family: str, changes: list[str]) -> None:
    implementation = FAMILIES[family].moe_implementation
    if not implementation:
        return
    key = "moe_params" if "moe_params" in model else "moe"
    moe = model.setdefault(key, {})
    if moe.get("moe_implementation") != implementation:
        changes.append(
            f"model.{key}.moe_implementation: {moe.get('moe_implementation', 'unset (experimental)')} -> "
            f"{implementation} (the fused experts of {FAMILIES[family].sparse_lora_model})"
        )
        moe["moe_implementation"] = implementation
