"""The rule table: names both ways (weights, LoRA tensors, masks), LoRA targets, the RoPE row permutation."""

from __future__ import annotations

import pytest
import torch

from modelzoo_ext.errors import UserError
from modelzoo_ext.name_map import (
    RopeLayout,
    canonical_cs_names,
    cs_to_hf_name,
    hf_module_to_cs_module,
    hf_to_cs_name,
    map_names,
    permute_rows_cs_to_hf,
    permute_rows_hf_to_cs,
    rope_kind,
    to_cs,
    to_hf,
)
from modelzoo_ext.run_config import cs_to_hf_config, hf_to_cs_model_config

LAYER = "model.layers.3.self_attn.q_proj"
CS_LAYER = "model.transformer_decoder.layers.3.self_attn.proj_q_dense_layer"

NAME_CASES = [
    ("model.embed_tokens.weight", "model.embedding_layer.word_embeddings.weight"),
    (
        "model.layers.0.self_attn.k_proj.weight",
        "model.transformer_decoder.layers.0.self_attn.proj_k_dense_layer.weight",
    ),
    (
        "model.layers.1.self_attn.v_proj.bias",
        "model.transformer_decoder.layers.1.self_attn.proj_v_dense_layer.bias",
    ),
    (
        "model.layers.12.self_attn.o_proj.weight",
        "model.transformer_decoder.layers.12.self_attn.proj_output_dense_layer.weight",
    ),
    ("model.layers.0.input_layernorm.weight", "model.transformer_decoder.layers.0.norm1.weight"),
    ("model.layers.0.post_attention_layernorm.weight", "model.transformer_decoder.layers.0.norm3.weight"),
    (
        "model.layers.0.mlp.gate_proj.weight",
        "model.transformer_decoder.layers.0.ffn.ffn.0.linear_layer_for_glu.weight",
    ),
    ("model.layers.0.mlp.up_proj.weight", "model.transformer_decoder.layers.0.ffn.ffn.0.linear_layer.weight"),
    (
        "model.layers.0.mlp.down_proj.weight",
        "model.transformer_decoder.layers.0.ffn.ffn.1.linear_layer.weight",
    ),
    ("model.norm.weight", "model.transformer_decoder.norm.weight"),
    ("lm_head.weight", "model.lm_head.weight"),
    (f"{LAYER}.lora_A.weight", f"{CS_LAYER}.lora_A.weight"),
    (f"{LAYER}.lora_B.weight", f"{CS_LAYER}.lora_B.weight"),
    (f"{LAYER}.weight_mask", f"{CS_LAYER}.weight_mask"),
]


@pytest.mark.parametrize("family", ["llama", "mistral"])
@pytest.mark.parametrize(("hf", "cs"), NAME_CASES)
def test_names_map_both_ways(hf, cs, family):
    assert hf_to_cs_name(hf, family) == cs
    assert cs_to_hf_name(cs, family) == hf


def test_unknown_names_are_listed_not_dropped():
    with pytest.raises(UserError) as err:
        map_names(
            ["model.norm.weight", "model.extra.weight", "model.layers.0.attn.c_attn.weight"],
            "llama",
            to_cs=True,
            where="x",
        )
    assert "model.extra.weight" in str(err.value) and "c_attn" in str(err.value)
    with pytest.raises(UserError, match="known suffix"):
        hf_to_cs_name("model.layers.0.self_attn.q_proj.scale", "llama")
    with pytest.raises(UserError, match="unknown model family"):
        hf_to_cs_name("model.norm.weight", "gpt2")


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("q_proj", "proj_q_dense_layer"),
        ("k_proj", "proj_k_dense_layer"),
        ("v_proj", "proj_v_dense_layer"),
        ("o_proj", "proj_output_dense_layer"),
        ("self_attn.q_proj", "self_attn.proj_q_dense_layer"),
        ("gate_proj", "ffn.ffn.0.linear_layer_for_glu"),
        ("up_proj", "ffn.ffn.0.linear_layer"),
        ("down_proj", "ffn.ffn.1.linear_layer"),
        ("mlp.down_proj", "ffn.ffn.1.linear_layer"),
    ],
)
def test_lora_target_modules(target, expected):
    assert hf_module_to_cs_module(target, "llama") == expected
    # The CS target is a '.'-suffix of exactly the converted module names.
    cs_modules = [
        hf_to_cs_name(f"model.layers.0.{m}.weight", "llama")[: -len(".weight")]
        for m in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    ]
    assert sum(m.endswith("." + expected) for m in cs_modules) == 1


def test_lora_target_that_names_nothing():
    with pytest.raises(UserError, match="names 0"):
        hf_module_to_cs_module("c_attn", "llama")


def test_permutation_interleaves_halves_per_head():
    # One head of 4 rows, rows = [x0, x1, y0, y1] (rotate-half) -> CS interleaved [x0, y0, x1, y1].
    t = torch.tensor([[10.0], [11.0], [20.0], [21.0]])
    assert permute_rows_hf_to_cs(t, 1, 4).flatten().tolist() == [10.0, 20.0, 11.0, 21.0]
    # Two heads permute independently; a partial rotary dim leaves the rest in place.
    t2 = torch.arange(12.0)
    assert permute_rows_hf_to_cs(t2, 2, 6, rotary_dim=4).tolist() == [0, 2, 1, 3, 4, 5, 6, 8, 7, 9, 10, 11]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.bool])
def test_permutation_inverse_is_exact(dtype):
    t = (torch.randn(2 * 3 * 8, 5) * 10).to(dtype)
    back = permute_rows_cs_to_hf(permute_rows_hf_to_cs(t, 6, 8), 6, 8)
    assert torch.equal(back, t)


def test_permutation_rejects_wrong_row_count():
    with pytest.raises(UserError, match="q.weight"):
        permute_rows_hf_to_cs(torch.zeros(10, 4), 4, 4, name="q.weight")


def test_which_tensors_take_the_permutation():
    layout = RopeLayout(num_heads=4, num_kv_heads=2, head_dim=8, rotary_dim=8)
    for suffix in ("weight", "bias", "weight_mask", "lora_B.weight"):
        assert rope_kind(f"model.layers.0.self_attn.q_proj.{suffix}", "llama") == "q"
        assert rope_kind(f"model.layers.0.self_attn.k_proj.{suffix}", "llama") == "k"
    for name in (
        "model.layers.0.self_attn.q_proj.lora_A.weight",
        "model.layers.0.self_attn.v_proj.weight",
        "model.layers.0.self_attn.o_proj.lora_B.weight",
        "model.layers.0.mlp.up_proj.weight",
    ):
        assert rope_kind(name, "llama") is None
        rows = torch.arange(16.0 if "k_proj" in name else 32.0)[:, None]
        assert torch.equal(to_cs(name, rows, "llama", layout)[1], rows)  # not permuted
    # k uses the key/value heads (grouped-query attention, 2 x 8 rows), q the query heads (4 x 8).
    for proj, heads in (("k_proj", 2), ("q_proj", 4)):
        rows = torch.arange(heads * 8.0)[:, None]
        permuted = to_cs(f"model.layers.0.self_attn.{proj}.weight", rows, "llama", layout)[1]
        assert torch.equal(permuted, permute_rows_hf_to_cs(rows, heads, 8)) and not torch.equal(
            permuted, rows
        )
    with pytest.raises(UserError, match="rows should be 2 heads x 8"):
        to_cs("model.layers.0.self_attn.k_proj.weight", torch.zeros(32, 1), "llama", layout)


def test_weight_mask_and_lora_b_take_the_same_rows():
    layout = RopeLayout(num_heads=4, num_kv_heads=2, head_dim=8, rotary_dim=8)
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(16, 64, generator=gen) > 0.5
    weight = torch.where(mask, torch.randn(16, 64, generator=gen), torch.zeros(()))
    base = "model.layers.1.self_attn.k_proj"
    _, w_cs = to_cs(f"{base}.weight", weight, "llama", layout)
    _, m_cs = to_cs(f"{base}.weight_mask", mask, "llama", layout)
    assert torch.equal(m_cs, w_cs != 0)  # convert(mask) == (convert(weight) != 0)
    b = torch.randn(16, 4, generator=gen)
    a = torch.randn(4, 64, generator=gen)
    _, b_cs = to_cs(f"{base}.lora_B.weight", b, "llama", layout)
    _, a_cs = to_cs(f"{base}.lora_A.weight", a, "llama", layout)
    assert torch.equal(a_cs, a)
    assert torch.allclose(b_cs @ a_cs, to_cs(f"{base}.weight", b @ a, "llama", layout)[1])
    assert torch.equal(to_hf(hf_to_cs_name(f"{base}.lora_B.weight", "llama"), b_cs, "llama", layout)[1], b)


def test_canonical_cs_names_adds_the_model_prefix_only_when_absent():
    stock = ["embedding_layer.word_embeddings.weight", "lm_head.weight"]
    assert canonical_cs_names(stock) == {n: "model." + n for n in stock}
    trainer = ["model.lm_head.weight"]
    assert canonical_cs_names(trainer) == {"model.lm_head.weight": "model.lm_head.weight"}


def test_layouts_agree_between_hf_and_cs_configs(tiny_llama_dir):
    import json

    hf = json.loads((tiny_llama_dir / "config.json").read_text())
    cs = hf_to_cs_model_config(hf, "llama")
    assert RopeLayout.from_hf_config(hf) == RopeLayout.from_cs_config(cs) == RopeLayout(4, 2, 16, 16)
    assert "norm_first" not in cs and "use_ff_layer1_dropout" not in cs
    back = cs_to_hf_config(cs, "llama")
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "rms_norm_eps",
        "tie_word_embeddings",
    ):
        assert back[key] == hf[key], key
    # transformers 5 saves rope_theta inside `rope_parameters`
    assert back["rope_theta"] == hf.get("rope_theta", hf.get("rope_parameters", {}).get("rope_theta"))


@pytest.mark.modelzoo
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_equal_to_the_stock_converter(family, tiny_llama_dir, tiny_mistral_dir):
    """Our names, permutations and model config equal the installed ModelZoo's own llama/mistral
    converters (at the newest `cs-X.Y` they know)."""
    import json

    from cerebras.modelzoo.tools.convert_checkpoint import convert_checkpoint

    from modelzoo_ext.cerebras.converters import newest_stock_cs_format
    from modelzoo_ext.hf_checkpoint import HFCheckpoint

    model_dir = tiny_llama_dir if family == "llama" else tiny_mistral_dir
    checkpoint = HFCheckpoint(model_dir)
    hf_config = json.loads((model_dir / "config.json").read_text())
    state = {k: checkpoint.get(k) for k in checkpoint.keys()}  # noqa: SIM118 (not a dict)
    stock, stock_config = convert_checkpoint(
        family, "hf", newest_stock_cs_format(family), dict(state), dict(hf_config)
    )
    stock_state = {canonical_cs_names(stock["model"])[k]: v for k, v in stock["model"].items()}
    layout = RopeLayout.from_hf_config(hf_config)
    ours = dict(to_cs(k, v, family, layout) for k, v in state.items())
    assert set(stock_state) - set(ours) == {"model.ln_f.weight"}  # the legacy duplicate, written by hf-to-cs
    for name, tensor in ours.items():
        assert torch.equal(tensor, stock_state[name]), name
    expected = {
        k: v for k, v in stock_config["model"].items() if k not in ("norm_first", "use_ff_layer1_dropout")
    }
    assert hf_to_cs_model_config(hf_config, family) == expected


@pytest.mark.parametrize("generation", ["transformers4", "transformers5"])
def test_llama31_rope_settings_survive_either_config_generation(tiny_llama_dir, generation):
    """Llama-3.1's rope (theta 500000, llama3 scaling) must reach the CS config whichever
    transformers wrote config.json: 4.x keys `rope_theta`/`rope_scaling`, 5.x `rope_parameters`."""
    import json

    hf = json.loads((tiny_llama_dir / "config.json").read_text())
    for key in ("rope_theta", "rope_scaling", "rope_parameters"):
        hf.pop(key, None)
    scaling = {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    if generation == "transformers4":
        hf.update(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", **scaling})
    else:
        hf["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, **scaling}
    cs = hf_to_cs_model_config(hf, "llama")
    assert cs["rope_theta"] == 500000.0
    assert cs["pos_scaling_type"] == "llama3" and cs["pos_scaling_factor"] == 8.0
    assert cs["pos_scaling_extra_args"]["original_max_position_embeddings"] == 8192
