"""ModelZoo's model config fields, as the run config's `model:` section spells them, and how this
package treats each: the tables, without logic.

- `MODELZOO_ALIASES`: the fields ModelZoo accepts under two names (pydantic alias + field name);
- `MODELZOO_DEFAULTS`: defaults of the keys of the HF <-> CS map (`run_config.architecture`);
- `MODELZOO_ONLY_DEFAULTS`: defaults of the keys without a config.json counterpart that change
  the computation (the architecture check requires them there);
- `MODELZOO_ONLY_ABSENT`: sections whose default is "off" (set: another network);
- `NOT_COMPARED`: keys that do not change what the network computes, each with its reason;
- `MOE_DEFAULTS`: every field of the `moe:` block (`MoEConfig`) with its default.

These are ModelZoo 2.10's (`GPT2LMHeadModelConfig`, which the Llama, Mistral and Mixtral configs
inherit, and `MoEConfig`). tests/test_run_config.py and tests/test_model_section.py hold them to
the installed classes: every default equal, every field in exactly one table. A release that adds,
drops or changes a field changes one entry here. Readers: `run_config.model_section` (aliases and
defaults) and `run_config.architecture` (the check).
"""

from __future__ import annotations

from typing import Any

# Field name -> the YAML name (pydantic alias) of each model-section field ModelZoo accepts under
# two names; the same in ModelZoo 2.6 ... 2.10. The record keys them by the YAML name.
MODELZOO_ALIASES: dict[str, str] = {
    "embd_pdrop": "embedding_dropout_rate",
    "memory_tokens_config": "memory_tokens",
    "moe_params": "moe",
}

# ModelZoo 2.10's defaults for the keys of the HF <-> CS map (what a CS-3 run trains with when the
# run config leaves a key out).
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
    "rotary_dim": None,  # post_init: a quarter of the head size under rotary embeddings
    "use_projection_bias_in_attention": True,
    "use_ffn_bias": True,
    "position_embedding_type": "learned",
    "embedding_dropout_rate": None,  # post_init: dropout_rate
    "embedding_layer_norm": False,
    "attention_type": "scaled_dot_product",
    "use_ffn_bias_in_attention": True,
    "attention_dropout_rate": 0.1,
    "dropout_rate": 0.1,
    "use_bias_in_output": False,
    "norm_type": "layernorm",
    "attention_module": "aiayn_attention",
    "extra_attention_params": {},
    "attention_inner_dim": None,  # the hidden size
    "attention_sliding_window_length": None,
}

# ModelZoo 2.10's defaults for keys without a config.json counterpart that change the forward
# pass or the training step (the architecture check requires them at these values).
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

# ModelZoo 2.10's `MoEConfig` defaults (`layers/FeedForwardNetwork.py`), every field, for
# `moe.<key>` left out.
MOE_DEFAULTS: dict[str, Any] = {
    "num_experts": 0,
    "top_k": 1,
    "load_balancing_loss_coef": 0.0,
    "moe_implementation": "experimental",
    "router_use_bias": False,
    "router_fp32": True,
    "routing_algorithm": "learned",
    "router_selection_nonlinearity": "softmax",
    "expert_weighting_nonlinearity": "softmax",
    "expert_weighting_normalization": True,
    "null_expert_bias": 0.0,
    "num_shared_experts": None,
    "probability_before_ffn": False,
    "sinkhorn_n_iters": 1,
    "gate_initializer": None,
}

# ModelZoo-only sections whose default is "off" (their default objects: memory tokens disabled,
# no experts). A run config that sets one describes another network, unless the HF map of the
# model's own family produces the key (an MoE family's `moe`).
MODELZOO_ONLY_ABSENT: dict[str, str] = {
    "memory_tokens": "memory tokens (transformers' Llama/Mistral have none)",
    "moe": "mixture of experts (transformers' Llama/Mistral have dense MLPs)",
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
