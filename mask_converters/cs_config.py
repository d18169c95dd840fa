"""HF `config.json` <-> the `model:` section of a ModelZoo trainer YAML (Llama/Mistral).

The same key mapping as ModelZoo 2.10's stock `llama`/`mistral` config converters (tested
against them where ModelZoo is installed), minus `norm_first` and `use_ff_layer1_dropout`,
which the stock converter writes but 2.10's `GPT2LMHeadModelConfig` rejects. Written here so
users without ModelZoo can convert; no `cerebras` import.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from modelzoo_ext.errors import UserError

HF_MODEL_TYPES = {"llama": "llama", "mistral": "mistral"}
HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
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


def hf_to_cs_model_config(hf_config: dict[str, Any], family: str) -> dict[str, Any]:
    """HF config dict -> the ModelZoo `model:` section (name = the stock family name)."""
    if hf_config.get("model_type") != HF_MODEL_TYPES.get(family):
        raise UserError(
            f"config.json has model_type {hf_config.get('model_type')!r}, expected {HF_MODEL_TYPES.get(family)!r}",
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
    if family == "mistral":
        model["attention_sliding_window_length"] = hf_config.get("sliding_window")
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
        "architectures": [HF_ARCHITECTURES[family]],
        "model_type": HF_MODEL_TYPES[family],
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
    if family == "mistral":
        config["sliding_window"] = model.get("attention_sliding_window_length")
    else:
        config["mlp_bias"] = bool(model.get("use_ffn_bias", False))
    return config


def find_model_section(config: dict[str, Any], where: str) -> dict[str, Any]:
    """The `model:` section of a trainer YAML (`trainer.init.model`, a list of trainers, or `model`)."""
    trainer = config.get("trainer")
    if isinstance(trainer, list) and trainer:
        trainer = trainer[0].get("trainer", trainer[0])
    if isinstance(trainer, dict) and isinstance(trainer.get("init", {}).get("model"), dict):
        return trainer["init"]["model"]
    if isinstance(config.get("model"), dict):
        return config["model"]
    raise UserError(
        "no model section (trainer.init.model or model) in the config",
        where=where,
        fix="pass the trainer YAML of the run (or the model_config.yaml written by `convert hf-to-cs`)",
    )


def find_key(config: Any, key: str) -> list[Any]:
    """Every value stored under `key` anywhere in a nested YAML structure (depth first)."""
    found = []
    if isinstance(config, dict):
        for k, v in config.items():
            if k == key:
                found.append(v)
            found.extend(find_key(v, key))
    elif isinstance(config, list):
        for item in config:
            found.extend(find_key(item, key))
    return found


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML file (UserError when absent or not a mapping)."""
    path = Path(path)
    if not path.is_file():
        raise UserError("config file not found", where=str(path), fix="pass the run's trainer YAML")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise UserError("config is not a YAML mapping", where=str(path))
    return data


def trainer_yaml_model_section(model: dict[str, Any]) -> dict[str, Any]:
    """`{"trainer": {"init": {"model": ...}}}`: the section to paste into a trainer YAML."""
    return {"trainer": {"init": {"model": copy.deepcopy(model)}}}
