"""The architecture keys of a run config: HF `config.json` <-> the ModelZoo `model:` section.

One key map serves three uses:
- `hf_to_cs_model_config`: the `model:` section of a converted checkpoint (`convert hf-to-cs`);
- `cs_to_hf_config`: the `config.json` of an export (`convert cs-to-hf`);
- `check_architecture`: does a run config describe this HF model? The reference trainer asks it
  before reading any weight, so both backends of a grid point train the same network.

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
from dataclasses import dataclass, field
from typing import Any

from modelzoo_ext.errors import UserError
from modelzoo_ext.families import get_family

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
    if family in ("mistral", "mixtral"):
        model["attention_sliding_window_length"] = hf_config.get("sliding_window")
    implementation = get_family(family).moe_implementation
    if implementation:
        model["moe"] = _moe_to_cs(hf_config, implementation)
    return model


def cs_to_hf_config(model: dict[str, Any], family: str) -> dict[str, Any]:
    """The ModelZoo `model:` section -> a HF config dict (for `config.json` of an export)."""
    heads = int(model["num_heads"])
    kv_heads = heads
    if model.get("attention_module") == "multiquery_attention":
        kv_heads = int(model["extra_attention_params"]["num_kv_groups"])
    inner = int(model.get("attention_inner_dim") or model["hidden_size"])
    gated = {v: k for k, v in GATED_ACTIVATIONS.items()}
    if model.get("nonlinearity") not in gated:
        raise UserError(f"nonlinearity {model.get('nonlinearity')!r} is not a gated activation HF supports")
    rope_scaling = None
    if float(model.get("pos_scaling_factor", 1.0)) != 1.0:
        kind = model.get("pos_scaling_type", "linear")
        rope_scaling = {
            "rope_type" if kind == "llama3" else "type": kind,
            "factor": model["pos_scaling_factor"],
        }
        rope_scaling.update(model.get("pos_scaling_extra_args") or {})
    config = {
        "architectures": [get_family(family).hf_architecture],
        "model_type": get_family(family).hf_model_type,
        "vocab_size": model["vocab_size"],
        "hidden_size": model["hidden_size"],
        "intermediate_size": model["filter_size"],
        "num_hidden_layers": model["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": inner // heads,
        "hidden_act": gated[model["nonlinearity"]],
        "max_position_embeddings": model["max_position_embeddings"],
        "initializer_range": model.get("initializer_range", 0.02),
        "rms_norm_eps": model.get("layer_norm_epsilon", 1e-5),
        "rope_theta": model.get("rope_theta", 10000.0),
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": bool(model.get("share_embedding_weights", False)),
        "attention_bias": bool(model.get("use_projection_bias_in_attention", False)),
    }
    if family in ("mistral", "mixtral"):
        config["sliding_window"] = model.get("attention_sliding_window_length")
    else:
        config["mlp_bias"] = bool(model.get("use_ffn_bias", False))
    if get_family(family).moe_implementation:
        moe = model.get("moe") or {}
        config["num_local_experts"] = int(moe["num_experts"])
        config["num_experts_per_tok"] = int(moe["top_k"])
        config["router_aux_loss_coef"] = float(moe.get("load_balancing_loss_coef", 0.0))
        config["router_jitter_noise"] = 0.0
        config["output_router_logits"] = False
    return config


# ---------------------------------------------------------------------------------------------
# Does a run config describe this HF model?
#
# Every key of ModelZoo 2.10's Llama/Mistral model config is in exactly one class below, and a
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

# ModelZoo 2.10's defaults (its GPT-2 backbone's, which Llama/Mistral inherit) for the keys of the
# HF map: what a CS-3 run trains with when the run config leaves a key out. Tested against
# ModelZoo's config class where it is installed (tests/test_run_config.py).
MODELZOO_DEFAULTS: dict[str, Any] = {
    "vocab_size": 50257,
    "max_position_embeddings": 1024,
    "hidden_size": 768,
    "filter_size": 3072,
    "num_hidden_layers": 12,
    "num_heads": 12,
    "nonlinearity": "gelu",
    "layer_norm_epsilon": 1e-5,
    "rope_theta": 10000,
    "pos_scaling_factor": 1.0,
    "pos_scaling_type": "linear",
    "pos_scaling_extra_args": None,
    "share_embedding_weights": True,
    "rotary_dim": None,
    "use_projection_bias_in_attention": True,
    "use_ffn_bias": True,
    "position_embedding_type": "learned",
    "embedding_dropout_rate": None,  # ModelZoo: None = dropout_rate
    "embedding_layer_norm": False,
    "attention_type": "scaled_dot_product",
    "use_ffn_bias_in_attention": True,
    "attention_dropout_rate": 0.1,
    "dropout_rate": 0.1,
    "use_bias_in_output": False,
    "norm_type": "layernorm",
    "attention_module": "aiayn_attention",
    "extra_attention_params": {},
    "attention_inner_dim": None,
    "attention_sliding_window_length": None,
}
# ModelZoo 2.10's `MoEConfig` defaults (`layers/FeedForwardNetwork.py`), for `moe.<key>` left out.
MOE_DEFAULTS: dict[str, Any] = {
    "num_experts": 0,
    "top_k": 1,
    "load_balancing_loss_coef": 0.0,
    "moe_implementation": "experimental",
    **MIXTRAL_MOE_FIXED,
}

# ModelZoo keys without a config.json counterpart that change the forward pass or the training
# step away from what transformers' Llama/Mistral compute, at ModelZoo's default values (where the
# two agree). Compared like the keys above.
MODELZOO_ONLY_DEFAULTS: dict[str, Any] = {
    "num_extra_input_vocab_tokens": 0,
    "position_embedding_offset": 0,
    "constant_pos_embedding": None,
    "rel_distance_mode": "default",
    "sliding_window_every_other_decoder_layer": False,
    "attention_sink_tokens": None,
    "attention_vertical_column_spacing": None,
    "attention_vertical_column_width": None,
    "attention_chunk_size": None,
    "attention_qk_norm_layer": None,
    "attention_logit_softcapping": None,
    "fixed_sparse_attention": None,
    "cross_attention_layers": [],
    "extra_ffn_params": {},
    "use_sink_token": False,
    "scale_qk_dot_by_layer_idx": False,
    "norm_first_sandwich": False,
    "embeddings_scale": 1.0,
    "scale_qk_dot_by_d": None,  # None and False: 1/sqrt(head size), as transformers
    "attention_logits_alpha": 1.0,
    "output_logits_scale": None,
    "final_logit_softcapping": None,
    "mup_base_hidden_size": None,
    "mup_base_filter_size": None,
    "lr_adjustment_groups": None,  # scales the learning rate of parameter groups
}

# ModelZoo-only sections whose default is "off" (their default objects: memory tokens disabled,
# no experts). A run config that sets one describes another network, unless the HF map of the
# model's own family produces the key (an MoE family's `moe`).
MODELZOO_ONLY_ABSENT: dict[str, str] = {
    "memory_tokens": "memory tokens (transformers' Llama/Mistral have none)",
    "moe": "mixture of experts (transformers' Llama/Mistral have dense MLPs)",
}

# ModelZoo accepts these names too (pydantic aliases); the check reads them under the YAML name.
MODELZOO_ALIASES = {
    "embd_pdrop": "embedding_dropout_rate",
    "memory_tokens_config": "memory_tokens",
    "moe_params": "moe",
}

# Keys of the tables above that ModelZoo's config classes have only from a release on (the tables
# describe 2.10, the newest supported release; older releases lack these fields, and the values
# listed are what they compute without them). Tests hold the tables to the installed release's
# classes minus the keys newer than it (tests/test_run_config.py; checked on 2.6, 2.8 and 2.10).
MODELZOO_KEYS_SINCE: dict[str, str] = {
    "use_sink_token": "2.10",
    "sliding_window_every_other_decoder_layer_pattern": "2.10",
    "moe.router_use_bias": "2.10",
    "moe.probability_before_ffn": "2.7",
}


def keys_newer_than(release: str) -> set[str]:
    """The table keys ModelZoo `release` (e.g. "2.6.0") does not have yet."""
    installed = tuple(int(x) for x in release.split(".")[:2])
    return {
        k for k, since in MODELZOO_KEYS_SINCE.items() if tuple(int(x) for x in since.split(".")) > installed
    }


_INITIALISES = "initialises weights that the checkpoint then overwrites; LoRA factors use their own seeded rule (sparse_lora.init_seed)"
_GENERATION = "a generation (inference) setting: training never reads it"

# Keys that do not change what the network computes, and why.
NOT_COMPARED: dict[str, str] = {
    "name": "the registry name of the model, not part of its architecture",
    "max_position_embeddings": "bounds the sequence length only: rotary positions take their frequencies "
    "from rope_theta and the rope-scaling keys (compared), so e.g. Llama-3.1's YAML value 8192 and its "
    "config.json value 131072 train the same network on sequences shorter than both (compared under "
    "longrope scaling, whose frequencies and attention factor depend on it)",
    "initializer_range": _INITIALISES,
    "embedding_initializer": _INITIALISES,
    "initializer": _INITIALISES,
    "output_layer_initializer": _INITIALISES,
    "ffn_initializer": _INITIALISES,
    "ffn_output_layer_initializer": _INITIALISES,
    "attention_softmax_fp32": "the precision of the CS attention softmax, not what it computes "
    "(the reference trainer's precision follows trainer.init.precision)",
    "dtype": "the CS embedding dtype: precision, not what is computed",
    "boundary_casting": "CS casting at layer boundaries: precision, not what is computed",
    "attention_kernel": "which CS kernel computes the attention, not what it computes",
    "use_experimental_flex_api": "how the CS attention is built, not what it computes",
    "fold_rope_consts": "whether the CS compiler folds the rotary sin/cos tables into constants: the same values",
    "attention_qk_norm_eps": "used only with attention_qk_norm_layer (compared)",
    "sliding_window_every_other_decoder_layer_pattern": "used only with "
    "sliding_window_every_other_decoder_layer (compared)",
    "num_relative_attention_buckets": "used only by relative position embeddings (position_embedding_type, compared)",
    "alibi_trainable_slopes": "used only by ALiBi position embeddings (position_embedding_type, compared)",
    "rel_distance_extra_args": "used only with a rel_distance_mode other than default (compared)",
    "scale_output_logits_by_d": "used only with muP (mup_base_hidden_size, compared)",
    "output_logits_alpha": "used only with muP (mup_base_hidden_size, compared)",
    "compute_eval_metrics": "whether ModelZoo computes validation metrics (perplexity, accuracy): bookkeeping",
    "start_token": _GENERATION,
    "loop_dim": _GENERATION,
    "stop_sequences": _GENERATION,
    "max_tokens": _GENERATION,
    "temperature": _GENERATION,
    "top_k": _GENERATION,
    "top_p": _GENERATION,
    # The `moe:` block of an MoE family, compared key by key as `moe.<key>`.
    "moe.moe_implementation": "how ModelZoo lays out the experts (every implementation computes the same "
    "function); sparse_lora_mixtral requires and sets `optimized`",
    "moe.gate_initializer": _INITIALISES,
    "moe.sinkhorn_n_iters": "used only by sinkhorn routing (router_selection_nonlinearity, compared)",
}


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


def _normalised(key: str, value: Any, section: dict[str, Any]) -> Any:
    """Values that mean the same thing written one way (None inner dim = hidden size, ...)."""
    if key == "attention_inner_dim" and value is None:
        return section.get("hidden_size")
    if key == "rotary_dim" and value is None and section.get("position_embedding_type") == "rotary":
        # ModelZoo's `post_init`: a quarter of hidden_size // num_heads (transformers: the whole head).
        heads, hidden = section.get("num_heads"), section.get("hidden_size")
        return int(hidden // heads * 0.25) if heads and hidden else None
    if key in ("embedding_dropout_rate", "attention_dropout_rate") and value is None:
        return section.get("dropout_rate")  # ModelZoo's `post_init`
    if key == "pos_scaling_type" and isinstance(value, str):
        return value.lower()  # ModelZoo accepts "YaRN"
    if key == "scale_qk_dot_by_d":
        return bool(value)
    if key == "extra_attention_params":
        return dict(value or {})
    return value


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return a == b


def _flat_moe(section: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """An MoE section with `moe: {k: v}` as `moe.k` keys (so a mismatch names the key), over
    `defaults` for the keys it leaves out."""
    flat = {k: v for k, v in section.items() if k != "moe"}
    flat.update({f"moe.{k}": v for k, v in {**defaults, **(section.get("moe") or {})}.items()})
    return flat


def check_architecture(
    model_section: dict[str, Any], hf_config: dict[str, Any], family: str
) -> ArchitectureCheck:
    """Compare every key that changes the computation; a key the run config leaves out counts with
    ModelZoo's default (what a CS-3 run would use). Raises nothing: see `ArchitectureCheck.ok`."""
    converted = hf_to_cs_model_config(hf_config, family)
    moe = "moe" in converted
    section = {MODELZOO_ALIASES.get(k, k): v for k, v in model_section.items()}
    # An MoE family's `moe:` block is compared key by key (`moe.<key>`): HF side what transformers'
    # Mixtral computes, run config side ModelZoo's defaults for the keys it leaves out.
    stated = _flat_moe(section, {}) if moe else section
    expected = _flat_moe(converted, MIXTRAL_MOE_FIXED) if moe else converted
    yaml_side = {**MODELZOO_DEFAULTS, **(_flat_moe(section, MOE_DEFAULTS) if moe else section)}
    check = ArchitectureCheck()
    no_scaling = (
        float(expected.get("pos_scaling_factor", 1.0)) == 1.0 == float(yaml_side["pos_scaling_factor"])
    )
    longrope = "longrope" in {
        _normalised("pos_scaling_type", expected.get("pos_scaling_type"), expected),
        _normalised("pos_scaling_type", yaml_side["pos_scaling_type"], yaml_side),
    }
    for key in sorted(set(expected) | (set(MODELZOO_DEFAULTS) & set(stated))):
        if key in NOT_COMPARED and not (key == "max_position_embeddings" and longrope):
            check.not_compared[key] = NOT_COMPARED[key]
            continue
        if no_scaling and key in ("pos_scaling_type", "pos_scaling_extra_args"):
            check.not_compared[key] = "no rope scaling on either side (pos_scaling_factor 1.0)"
            continue
        want = _normalised(key, expected.get(key, MODELZOO_DEFAULTS.get(key)), {**yaml_side, **expected})
        have = _normalised(key, yaml_side.get(key), yaml_side)
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
            f"attention_dropout_rate {yaml_side.get('attention_dropout_rate')!r}: set it to 0.0 in config.json"
        )
    for key in sorted(set(stated) - set(expected) - set(MODELZOO_DEFAULTS)):
        _check_extra_key(check, key, stated[key], yaml_side, family)
    return check


def _check_extra_key(check: ArchitectureCheck, key: str, value: Any, yaml_side: dict, family: str) -> None:
    """A run-config key outside the HF map: at ModelZoo's default, absent, not compared, or unknown."""
    if key in MODELZOO_ONLY_DEFAULTS:
        check.compared_with_default.append(key)
        default = MODELZOO_ONLY_DEFAULTS[key]
        if not _equal(_normalised(key, value, yaml_side), _normalised(key, default, yaml_side)):
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
    return check
