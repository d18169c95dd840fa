"""Tiny random models of every family saved with transformers: fixtures, `make tiny-assets`, demos.

Two layers, hidden 64, grouped-query attention (4 query heads, 2 key/value heads) so the
k-projection's RoPE permutation is exercised, and the real Mistral v1 SentencePiece tokenizer
(32,000 tokens, from `mistral-common`) so data preparation and lm-eval run on real text.
The family's traits decide the rest: a sliding-window family gets no window (`sliding_window:
null`); an MoE family (Mixtral) 4 experts, top-2, intermediate 96 (w1/w3 [96, 64] and w2 [64, 96]
differ in shape, so a transposed expert cannot pass), router aux coefficient 0.02 (Mixtral-8x7B's),
and router weights drawn wider than transformers' init so the top-2 choice is not a near-tie.
`save_random_model` saves a random model of any config the same way (the preflight's twins).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from modelzoo_ext.families import get_family
from modelzoo_ext.offline_assets import asset_path

ROUTER_STD = (
    0.5  # the tiny Mixtral's router weights: clear top-2 choices (transformers' 0.02 is near uniform)
)


def tiny_config(family: str = "llama", vocab_size: int = 32000):
    """The transformers config of the family's tiny model: 2 layers, hidden 64, 4 heads, 2 kv heads."""
    from transformers import AutoConfig

    spec = get_family(family)
    config = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="float32",
    )
    if spec.sliding_window:
        config["sliding_window"] = None
    if spec.has_experts:
        config.update(
            intermediate_size=96,
            num_local_experts=4,
            num_experts_per_tok=2,
            router_aux_loss_coef=0.02,
            router_jitter_noise=0.0,
        )
    return AutoConfig.for_model(spec.hf_model_type, **config)


def save_tokenizer(out_dir: str | Path) -> Path:
    """Save the Mistral v1 SentencePiece tokenizer (with BOS, pad = unk) into `out_dir`.

    The fast tokenizer is built through `AutoTokenizer` from `tokenizer.model` plus a minimal
    `tokenizer_config.json`: that path works on transformers 4.x and 5.x alike (5.x turned the
    direct `LlamaTokenizerFast(vocab_file=...)` constructor into one that drops all text).
    """
    from transformers import AutoTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(asset_path("mistral_tokenizer_v1"), out_dir / "tokenizer.model")
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": True,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps({**config, **special}))
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    tokenizer.pad_token = tokenizer.unk_token
    tokenizer.save_pretrained(out_dir)
    return out_dir


def save_random_model(
    out_dir: str | Path, config, *, seed: int = 0, max_shard_size: str | None = None
) -> Path:
    """A random model of a transformers `config`, `save_pretrained` as safetensors (no tokenizer).

    Seeded; an MoE router's weights are drawn wider than transformers' init (`ROUTER_STD`), so
    its top-k choice is not a near-tie that float rounding could flip between two backends.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("block_sparse_moe.gate.weight", "mlp.gate.weight")):  # transformers 4 / 5
                param.normal_(0.0, ROUTER_STD)
    kwargs = {"safe_serialization": True}
    if max_shard_size:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(out_dir, **kwargs)
    return Path(out_dir)


def save_tiny_model(
    out_dir: str | Path,
    family: str = "llama",
    *,
    seed: int = 0,
    tokenizer_from: str | Path | None = None,
    max_shard_size: str | None = None,
) -> Path:
    """Build a tiny random model and `save_pretrained` it (safetensors) with a tokenizer.

    `tokenizer_from`: a directory with saved tokenizer files to copy (building the tokenizer
    takes seconds; fixtures build it once). `max_shard_size` (e.g. "200KB") writes a sharded
    checkpoint with an index, as 7B checkpoints are.
    """
    out_dir = Path(out_dir)
    save_random_model(out_dir, tiny_config(family), seed=seed, max_shard_size=max_shard_size)
    if tokenizer_from is None:
        save_tokenizer(out_dir)
    else:
        for item in Path(tokenizer_from).iterdir():
            if item.is_file() and ("token" in item.name or item.name == "special_tokens_map.json"):
                shutil.copy(item, out_dir / item.name)
    return out_dir
