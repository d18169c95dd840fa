"""The architecture keys of a run config: HF `config.json` <-> the ModelZoo `model:` section.

One key map serves three uses:
- `hf_to_cs_model_config`: the `model:` section of a converted checkpoint (`convert hf-to-cs`);
- `cs_to_hf_config`: the `config.json` of an export (`convert cs-to-hf`), from the section as
  ModelZoo reads it (`run_config.model_section`: either spelling of a key, ModelZoo's defaults);
  a section the family's HF model cannot compute (partial rotary, MLP biases where the HF model
  has none, no experts for an MoE family) is refused;
- `check_architecture`: does a run config describe this HF model? The reference trainer asks it
  before reading any weight, so both backends of a grid point train the same network.

Where the families differ, the family's traits decide (`ModelFamily.sliding_window`,
`hf_mlp_bias`, `has_experts`), never its name.

The map is ModelZoo 2.10's stock `llama`/`mistral`/`mixtral` config converters' (tested against
them where ModelZoo is installed), minus `norm_first` and `use_ff_layer1_dropout`, which the stock
converter writes but 2.10's `GPT2LMHeadModelConfig` rejects. Mixtral adds the `moe:` block
(`num_local_experts` -> `num_experts`, `num_experts_per_tok` -> `top_k`, `router_aux_loss_coef` ->
`load_balancing_loss_coef`, plus `moe_implementation: optimized`, the fused experts of
`sparse_lora_mixtral`); the architecture check compares every `moe` key that changes what the
network or its training loss computes. Written here so users without ModelZoo can convert; no
`cerebras` import.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from modelzoo_ext.errors import UserError
from modelzoo_ext.families import ModelFamily, get_family
from modelzoo_ext.run_config.model_section import (
    NormalisedModelSection,
    as_normalised,
    canonical_value,
    normalise_model_section,
)
from modelzoo_ext.run_config.modelzoo_fields import (
    MODELZOO_DEFAULTS,
    MODELZOO_ONLY_ABSENT,
    MODELZOO_ONLY_DEFAULTS,
    NOT_COMPARED,
)

GATED_ACTIVATIONS = {"silu": "swiglu", "relu": "reglu", "gelu": "geglu"}
ROPE_SCALING_TYPES = ("linear", "yarn", "llama3", "longrope")

# Fixed by the architecture on the CS side (what the stock converter asserts/writes).
_CS_FIXED = {
    "position_embedding_type": "rotary",
    "embedding_dropout_rate": 0.0,
    "embedding_layer_norm": False,
    "attention_type": "scaled_dot_product",
    "use_ffn_bias_in_attention": False,
    "attention_dropout_rate": 0.0,
    "dropout_rate": 0.0,
    "use_bias_in_output": False,
    "norm_type": "rmsnorm",
}


def _rope_scaling_to_cs(rope_scaling: dict | None) -> dict[str, Any]:
    if rope_scaling is None:
        return {"pos_scaling_factor": 1.0}
    kind = str(rope_scaling.get("type") or rope_scaling.get("rope_type")).lower()
    if kind not in ROPE_SCALING_TYPES:
        raise UserError(
            f"rope_scaling type {kind!r} has no ModelZoo equivalent",
            where="config.json",
            fix=f"use a model with rope_scaling of type {ROPE_SCALING_TYPES} or none",
        )
    out: dict[str, Any] = {"pos_scaling_factor": rope_scaling["factor"], "pos_scaling_type": kind}
    if kind == "yarn":
        out["pos_scaling_extra_args"] = {
            "original_max_position_embeddings": rope_scaling["original_max_position_embeddings"]
        }
    elif kind in ("llama3", "longrope"):
        out["pos_scaling_extra_args"] = {
            k: v for k, v in rope_scaling.items() if k not in ("type", "rope_type", "factor")
        }
    return out


def hf_rope(hf_config: dict[str, Any]) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling or None) from a config.json of either transformers generation.

    transformers 4.x writes `rope_theta` and `rope_scaling`; 5.x writes one `rope_parameters`
    dict (`rope_type` "default" meaning no scaling). Reading only the 4.x keys would silently
    give a 5.x-saved Llama-3.1 (theta 500000) the default theta of 10000.
    """
    params = hf_config.get("rope_parameters")
    if isinstance(params, dict):
        theta = params.get("rope_theta", hf_config.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        return float(theta), None if scaling.get("rope_type", "default") == "default" else scaling
    return float(hf_config.get("rope_theta", 10000.0)), hf_config.get("rope_scaling")


# What HF Mixtral computes, in ModelZoo's `moe:` keys: learned softmax routing over all experts,
# top-k renormalised, no router bias, no shared or null experts (transformers'
# MixtralSparseMoeBlock; ModelZoo's SparseMoEBlock with these values computes the same, in fp32).
MIXTRAL_MOE_FIXED = {
    "router_use_bias": False,
    "router_fp32": True,
    "routing_algorithm": "learned",
    "router_selection_nonlinearity": "softmax",
    "expert_weighting_nonlinearity": "softmax",
    "expert_weighting_normalization": True,
    "null_expert_bias": 0.0,
    "num_shared_experts": None,
    "probability_before_ffn": False,
}


def _moe_to_cs(hf_config: dict[str, Any], implementation: str) -> dict[str, Any]:
    """The `moe:` block of a HF Mixtral config (ModelZoo's `ConfigConverter_Mixtral_HF_CS23`)."""
    jitter = float(hf_config.get("router_jitter_noise") or 0.0)
    if jitter:
        raise UserError(
            f"router_jitter_noise {jitter} has no ModelZoo equivalent (ModelZoo's router has no jitter)",
            where="config.json",
            fix="set router_jitter_noise to 0.0 (Mixtral-8x7B's value)",
        )
    return {
        "num_experts": int(hf_config["num_local_experts"]),
        "top_k": int(hf_config["num_experts_per_tok"]),
        "load_balancing_loss_coef": float(hf_config.get("router_aux_loss_coef", 0.0)),
        "moe_implementation": implementation,
    }


def hf_to_cs_model_config(hf_config: dict[str, Any], family: str) -> dict[str, Any]:
    """HF config dict -> the ModelZoo `model:` section (name = the stock family name)."""
    expected_type = get_family(family).hf_model_type
    if hf_config.get("model_type") != expected_type:
        raise UserError(
            f"config.json has model_type {hf_config.get('model_type')!r}, expected {expected_type!r} ({family})",
            fix="pass the --family matching the checkpoint",
        )
    act = hf_config.get("hidden_act", "silu")
    if act not in GATED_ACTIVATIONS:
        raise UserError(f"hidden_act {act!r} has no gated ModelZoo equivalent", where="config.json")
    heads = int(hf_config["num_attention_heads"])
    kv_heads = int(hf_config.get("num_key_value_heads") or heads)
    hidden = int(hf_config["hidden_size"])
    head_dim = int(hf_config.get("head_dim") or hidden // heads)
    rope_theta, rope_scaling = hf_rope(hf_config)
    model: dict[str, Any] = {
        "name": family,
        "vocab_size": hf_config["vocab_size"],
        "max_position_embeddings": hf_config["max_position_embeddings"],
        "hidden_size": hidden,
        "filter_size": hf_config["intermediate_size"],
        "num_hidden_layers": hf_config["num_hidden_layers"],
        "num_heads": heads,
        "nonlinearity": GATED_ACTIVATIONS[act],
        "initializer_range": hf_config.get("initializer_range", 0.02),
        "layer_norm_epsilon": hf_config.get("rms_norm_eps", 1e-6),
        "rope_theta": rope_theta,
        **_rope_scaling_to_cs(rope_scaling),
        "share_embedding_weights": bool(hf_config.get("tie_word_embeddings", False)),
        "rotary_dim": int(head_dim * float(hf_config.get("partial_rotary_factor", 1.0))),
        "use_projection_bias_in_attention": bool(hf_config.get("attention_bias", False)),
        "use_ffn_bias": bool(hf_config.get("mlp_bias", False)),
        **_CS_FIXED,
    }
    if kv_heads == heads:
        model["attention_module"] = "aiayn_attention"
    else:
        model["attention_module"] = "multiquery_attention"
        model["extra_attention_params"] = {"num_kv_groups": kv_heads}
    if head_dim * heads != hidden:
        model["attention_inner_dim"] = head_dim * heads
    spec = get_family(family)
    if spec.sliding_window:
        model["attention_sliding_window_length"] = hf_config.get("sliding_window")
    if spec.has_experts:
        model["moe"] = _moe_to_cs(hf_config, spec.moe_implementation)
    return model


def _rope_scaling_to_hf(values: dict[str, Any]) -> dict[str, Any] | None:
    if float(values["pos_scaling_factor"]) == 1.0:
        return None
    kind = values["pos_scaling_type"]
    rope_scaling = {"rope_type" if kind == "llama3" else "type": kind, "factor": values["pos_scaling_factor"]}
    rope_scaling.update(values["pos_scaling_extra_args"] or {})
    return rope_scaling


def _require_hf_expressible(model: NormalisedModelSection, spec: ModelFamily) -> None:
    """Refuse what the HF model of `spec` cannot compute (its export would compute something else)."""
    if model.rotary_dim != model.head_dim:
        raise UserError(
            f"rotary_dim {model.rotary_dim} (position_embedding_type {model.values['position_embedding_type']!r}) "
            f"is not the head size {model.head_dim}: transformers' {spec.name} rotates whole heads",
            fix="export a model trained with position_embedding_type: rotary and rotary_dim = head size",
        )
    if spec.has_experts and model.num_experts < 2:
        raise UserError(
            f"moe.num_experts is {model.num_experts}: a {spec.name} export needs the experts of the run",
            fix="pass the run config the checkpoint was trained with (its `moe:` block)",
        )
    if model.values["use_ffn_bias"] and not spec.hf_mlp_bias:
        raise UserError(
            f"use_ffn_bias is true, but transformers' {spec.name} has no MLP biases",
            fix="export a model trained with use_ffn_bias: false",
        )


def cs_to_hf_config(model: Mapping[str, Any] | NormalisedModelSection, family: str) -> dict[str, Any]:
    """The ModelZoo `model:` section (raw or normalised) -> a HF config dict (`config.json` of an
    export). Keys the section leaves out count with ModelZoo's defaults, as in the CS run."""
    spec, model = get_family(family), as_normalised(model)
    values = model.values
    gated = {v: k for k, v in GATED_ACTIVATIONS.items()}
    if values["nonlinearity"] not in gated:
        raise UserError(f"nonlinearity {values['nonlinearity']!r} is not a gated activation HF supports")
    _require_hf_expressible(model, spec)
    config = {
        "architectures": [spec.hf_architecture],
        "model_type": spec.hf_model_type,
        "vocab_size": values["vocab_size"],
        "hidden_size": values["hidden_size"],
        "intermediate_size": values["filter_size"],
        "num_hidden_layers": values["num_hidden_layers"],
        "num_attention_heads": model.num_heads,
        "num_key_value_heads": model.num_kv_heads,
        "head_dim": model.head_dim,
        "hidden_act": gated[values["nonlinearity"]],
        "max_position_embeddings": values["max_position_embeddings"],
        "initializer_range": values.get("initializer_range", 0.02),
        "rms_norm_eps": values["layer_norm_epsilon"],
        "rope_theta": values["rope_theta"],
        "rope_scaling": _rope_scaling_to_hf(values),
        "tie_word_embeddings": bool(values["share_embedding_weights"]),
        "attention_bias": bool(values["use_projection_bias_in_attention"]),
    }
    if spec.sliding_window:
        config["sliding_window"] = values["attention_sliding_window_length"]
    if spec.hf_mlp_bias:
        config["mlp_bias"] = bool(values["use_ffn_bias"])
    if spec.has_experts:
        config["num_local_experts"] = model.num_experts
        config["num_experts_per_tok"] = model.top_k
        config["router_aux_loss_coef"] = model.load_balancing_loss_coef
        config["router_jitter_noise"] = 0.0
        config["output_router_logits"] = False
    return config


# ---------------------------------------------------------------------------------------------
# Does a run config describe this HF model?
#
# Both sides are read as `NormalisedModelSection`s (`run_config.model_section`: each key under its
# YAML name, ModelZoo's defaults for keys left out). Every key of ModelZoo 2.10's Llama/Mistral
# model config is in exactly one of these classes (tables in `run_config.modelzoo_fields`), and a
# test walks ModelZoo's config class to keep it so (tests/test_run_config.py):
# - a key of the HF map above (`hf_to_cs_model_config`): compared with the converted config.json;
#   a key the run config leaves out counts with ModelZoo's default (`MODELZOO_DEFAULTS`);
# - a ModelZoo-only key that changes the computation (`MODELZOO_ONLY_DEFAULTS`,
#   `MODELZOO_ONLY_ABSENT`): Llama and Mistral in transformers compute what ModelZoo computes at
#   its default, so the run config must leave the key there;
# - a key that does not change what the network computes (`NOT_COMPARED`, each with its reason);
# - the run config's own keys (`name`, `sparse_lora`, `loss_scaling`, `loss_weight`), read by
#   `modelzoo_ext.run_config.params`.
# A key in none of them is refused, as ModelZoo refuses it (its config classes forbid extra keys).


@dataclass
class ArchitectureCheck:
    """The comparison of a run config's `model:` section with an HF `config.json`."""

    compared: list[str] = field(default_factory=list)
    compared_with_default: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    not_compared: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def as_record(self) -> dict[str, Any]:
        """JSON-able summary for run records."""
        return {
            "compared": self.compared,
            "compared_with_modelzoo_default": self.compared_with_default,
            "not_compared": self.not_compared,
        }


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return a == b


def _flat_moe(section: dict[str, Any], moe: dict[str, Any] | None) -> dict[str, Any]:
    """`section` with its `moe: {k: v}` block as `moe.k` keys (so a mismatch names the key)."""
    flat = {k: v for k, v in section.items() if k != "moe"}
    flat.update({f"moe.{k}": v for k, v in (moe or {}).items()})
    return flat


def _compared_sides(
    run: NormalisedModelSection, hf: NormalisedModelSection, converted: dict[str, Any], experts: bool
) -> tuple[dict, dict, dict]:
    """(keys the run config sets, its values with ModelZoo's defaults, the HF model's values for
    the keys of the HF map).

    An MoE family's `moe:` block is compared key by key (`moe.<key>`): the HF side is what
    transformers' Mixtral computes, the run config side has ModelZoo's defaults for keys left out.
    """
    if not experts:
        return run.stated, run.values, {k: hf.values[k] for k in converted}
    hf_moe = {**MIXTRAL_MOE_FIXED, **converted["moe"]}
    expected = _flat_moe({k: hf.values[k] for k in converted}, hf_moe)
    return _flat_moe(run.stated, run.stated.get("moe")), _flat_moe(run.values, run.moe), expected


def check_architecture(
    model_section: Mapping[str, Any] | NormalisedModelSection, hf_config: dict[str, Any], family: str
) -> ArchitectureCheck:
    """Compare every key that changes the computation; a key the run config leaves out counts with
    ModelZoo's default (what a CS-3 run would use), a key is read under either of its names.

    `model_section`: the run config's `model:` keys, raw or normalised (`normalise_model_section`;
    a raw one with a key set under both names is a UserError). Otherwise raises nothing: see
    `ArchitectureCheck.ok`.
    """
    converted = hf_to_cs_model_config(hf_config, family)
    run = as_normalised(model_section)
    hf = normalise_model_section(converted, where="config.json")
    stated, have_values, expected = _compared_sides(run, hf, converted, get_family(family).has_experts)
    check = ArchitectureCheck()
    no_scaling = float(expected["pos_scaling_factor"]) == 1.0 == float(have_values["pos_scaling_factor"])
    longrope = "longrope" in {expected.get("pos_scaling_type"), have_values["pos_scaling_type"]}
    for key in sorted(set(expected) | (set(MODELZOO_DEFAULTS) & set(stated))):
        if key in NOT_COMPARED and not (key == "max_position_embeddings" and longrope):
            check.not_compared[key] = NOT_COMPARED[key]
            continue
        if no_scaling and key in ("pos_scaling_type", "pos_scaling_extra_args"):
            check.not_compared[key] = "no rope scaling on either side (pos_scaling_factor 1.0)"
            continue
        want = expected[key] if key in expected else hf.values[key]
        have = have_values[key]
        check.compared.append(key)
        if not _equal(want, have):
            where = "" if key in stated else " (not set: ModelZoo's default)"
            check.mismatches.append(f"{key}: run config {have!r}{where}, HF model {want!r}")
    attention_dropout = float(hf_config.get("attention_dropout", 0.0) or 0.0)
    if (
        attention_dropout != 0.0
    ):  # the HF model would drop attention weights while training; ModelZoo's does not
        check.mismatches.append(
            f"attention_dropout: HF model {attention_dropout!r} (config.json), run config "
            f"attention_dropout_rate {have_values['attention_dropout_rate']!r}: set it to 0.0 in config.json"
        )
    for key in sorted(set(stated) - set(expected) - set(MODELZOO_DEFAULTS)):
        _check_extra_key(check, key, stated[key], have_values, family)
    return check


def _check_extra_key(check: ArchitectureCheck, key: str, value: Any, values: dict, family: str) -> None:
    """A run-config key outside the HF map: at ModelZoo's default, absent, not compared, or unknown."""
    if key in MODELZOO_ONLY_DEFAULTS:
        check.compared_with_default.append(key)
        default = MODELZOO_ONLY_DEFAULTS[key]
        if not _equal(values[key], canonical_value(key, default, values)):
            check.mismatches.append(
                f"{key}: run config {value!r}; transformers' {family} has no such setting and computes "
                f"what ModelZoo computes at its default {default!r}"
            )
    elif key in MODELZOO_ONLY_ABSENT:
        check.mismatches.append(f"{key}: set in the run config, but {MODELZOO_ONLY_ABSENT[key]}: remove it")
    elif key in NOT_COMPARED:
        check.not_compared[key] = NOT_COMPARED[key]
    else:
        check.mismatches.append(
            f"{key}: not a key of ModelZoo 2.10's {family} model config (ModelZoo refuses it too)"
        )
