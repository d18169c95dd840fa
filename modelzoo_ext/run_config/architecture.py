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

# ModelZoo 2.10's defaults (its GPT-2 backbone's, which Llama/Mistral inherit) for the keys a run
# config may leave out: what a CS-3 run then trains with. Tested against ModelZoo's config class
# where it is installed (tests/test_run_config.py).
MODELZOO_DEFAULTS: dict[str, Any] = {
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

# Keys of the converted section that do not change what the network computes, and why.
NOT_COMPARED: dict[str, str] = {
    "name": "the registry name of the model, not part of its architecture",
    "max_position_embeddings": "bounds the sequence length only: rotary positions take their frequencies "
    "from rope_theta and the rope-scaling keys (compared), so e.g. Llama-3.1's YAML value 8192 and its "
    "config.json value 131072 train the same network on sequences shorter than both",
    "initializer_range": "initialises weights that the checkpoint then overwrites; LoRA factors use their "
    "own seeded rule (sparse_lora.init_seed)",
    "moe.moe_implementation": "how ModelZoo lays out the experts (every implementation computes the same "
    "function); sparse_lora_mixtral requires and sets `optimized`",
}


@dataclass
class ArchitectureCheck:
    """The comparison of a run config's `model:` section with an HF `config.json`."""

    compared: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    not_compared: dict[str, str] = field(default_factory=dict)
    not_architecture: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def as_record(self) -> dict[str, Any]:
        """JSON-able summary for run records."""
        return {
            "compared": self.compared,
            "not_compared": self.not_compared,
            "keys_without_an_hf_counterpart": self.not_architecture,
        }


def _normalised(key: str, value: Any, section: dict[str, Any]) -> Any:
    """Values that mean the same thing written one way (None inner dim = hidden size, ...)."""
    if key == "attention_inner_dim" and value is None:
        return section.get("hidden_size")
    if key == "rotary_dim" and value is None:  # ModelZoo: the whole head
        heads = section.get("num_heads")
        inner = section.get("attention_inner_dim") or section.get("hidden_size")
        return inner // heads if heads and inner else None
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


def _flat_moe(section: dict[str, Any], defaults: dict[str, Any] | None) -> dict[str, Any]:
    """`moe: {k: v}` as `moe.k` keys (so a mismatch names the key), over `defaults` for the keys
    the section leaves out; sections without `moe` stay as they are when `defaults` is None."""
    flat = {k: v for k, v in section.items() if k != "moe"}
    if "moe" not in section and defaults is None:
        return flat
    moe = {**(defaults or {}), **(section.get("moe") or {})}
    flat.update({f"moe.{k}": v for k, v in moe.items() if k in MOE_DEFAULTS})
    return flat


def check_architecture(
    model_section: dict[str, Any], hf_config: dict[str, Any], family: str
) -> ArchitectureCheck:
    """Compare every key that changes the computation; a key the run config leaves out counts with
    ModelZoo's default (what a CS-3 run would use). Raises nothing: see `ArchitectureCheck.ok`."""
    converted = hf_to_cs_model_config(hf_config, family)
    moe = "moe" in converted
    # HF side: what transformers' Mixtral computes; run config side: ModelZoo's defaults.
    expected = _flat_moe(converted, MIXTRAL_MOE_FIXED if moe else None)
    yaml_side = {**MODELZOO_DEFAULTS, **_flat_moe(model_section, MOE_DEFAULTS if moe else None)}
    check = ArchitectureCheck(not_compared={k: NOT_COMPARED[k] for k in NOT_COMPARED if k in expected})
    no_scaling = (
        float(expected.get("pos_scaling_factor", 1.0)) == 1.0 == float(yaml_side["pos_scaling_factor"])
    )
    for key in sorted(set(expected) | (set(MODELZOO_DEFAULTS) & set(model_section))):
        if key in NOT_COMPARED:
            continue
        if no_scaling and key in ("pos_scaling_type", "pos_scaling_extra_args"):
            check.not_compared[key] = "no rope scaling on either side (pos_scaling_factor 1.0)"
            continue
        want = _normalised(key, expected.get(key, MODELZOO_DEFAULTS.get(key)), {**yaml_side, **expected})
        have = _normalised(key, yaml_side.get(key), yaml_side)
        check.compared.append(key)
        if not _equal(want, have):
            stated = "" if key in _flat_moe(model_section, None) else " (not set: ModelZoo's default)"
            check.mismatches.append(f"{key}: run config {have!r}{stated}, HF model {want!r}")
    known = set(expected) | set(MODELZOO_DEFAULTS) | {"moe"}
    check.not_architecture = sorted(k for k in model_section if k not in known)
    return check
