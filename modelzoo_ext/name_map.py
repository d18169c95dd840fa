"""The one Hugging Face <-> Cerebras name map: a declarative rule table per model family.

Every tensor that crosses between the two formats goes through this module: base weights,
masks and LoRA tensors alike, whether the converters write a checkpoint, the ModelZoo model
reads an HF-named mask file, or ModelZoo's own `cszoo checkpoint convert` runs our converter
entries. There is exactly one copy of the naming logic in the project, in the pure-torch core.

Names are full parameter names:
- HF: as in `LlamaForCausalLM.state_dict()`, e.g. `model.layers.0.self_attn.q_proj.weight`;
- CS: as in the ModelZoo model's `state_dict()` (what a CS `.mdl` holds under its top-level
  `"model"` key), e.g. `model.transformer_decoder.layers.0.self_attn.proj_q_dense_layer.weight`.

A name is `<module path>.<tensor suffix>`. The rule tables map module paths; the suffix is
carried over unchanged: `weight`, `bias`, the LoRA tensors `lora_A.weight` / `lora_B.weight`
(PEFT's names, used by `modelzoo_ext.sparse_lora`) and cstorch's mask buffers `weight_mask`
(cstorch registers the mask of parameter `p` on the owning module as `p_mask`).

RoPE: HF rotates halves of each head (rotate-half), CS rotates interleaved pairs, so the rows of
q and k projections are permuted per head between the two formats (exactly what ModelZoo's stock
`llama` converter does). Every tensor whose rows index q/k output channels takes the same
permutation: the weight, its bias, its mask and its LoRA `lora_B`. `lora_A` (rows index the rank)
and all v/o/MLP tensors do not.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch

from modelzoo_ext.errors import UserError
from modelzoo_ext.families import get_family

# Tensor suffixes after the module path, longest first so `lora_B.weight` wins over `weight`.
LORA_A_SUFFIX = "lora_A.weight"
LORA_B_SUFFIX = "lora_B.weight"
MASK_SUFFIX = "_mask"
TENSOR_SUFFIXES = (
    LORA_A_SUFFIX,
    LORA_B_SUFFIX,
    "weight" + MASK_SUFFIX,
    "bias" + MASK_SUFFIX,
    "weight",
    "bias",
)
# Suffixes whose dim 0 indexes the module's output channels (and so takes the q/k permutation).
ROW_INDEXED_SUFFIXES = frozenset({"weight", "bias", "weight_mask", "bias_mask", LORA_B_SUFFIX})

CS_PREFIX = "model."  # the ModelZoo wrapper's attribute holding the GPT2LMHeadModel

# HF buffers that old checkpoints store but both sides recompute from the config (skipped, as
# the stock converter does).
HF_RECOMPUTED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


@dataclass(frozen=True)
class ModuleRule:
    """One module path in HF naming and in CS naming; `{layer}` stands for a layer index.

    `rope` is "q" or "k" when the module's output rows are rotary query/key channels.
    """

    hf: str
    cs: str
    rope: str | None = None


@dataclass(frozen=True)
class Family:
    """A model family: its module rules, and CS modules that duplicate another CS module.

    `cs_aliases` maps a CS module that ModelZoo registers twice (e.g. `ln_f`, the legacy name of
    the final norm) to the module it duplicates: HF -> CS writes both (ModelZoo's strict loading
    wants both keys), CS -> HF checks they are equal and keeps one.
    """

    name: str
    rules: tuple[ModuleRule, ...]
    cs_aliases: dict[str, str]


def _in_decoder_layers(rules: Iterable[ModuleRule]) -> tuple[ModuleRule, ...]:
    return tuple(
        ModuleRule(
            f"model.layers.{{layer}}.{r.hf}",
            f"{CS_PREFIX}transformer_decoder.layers.{{layer}}.{r.cs}",
            r.rope,
        )
        for r in rules
    )


# Inside one decoder layer; checked against ModelZoo 2.10's `llama.py` converter and the
# `state_dict()` of a ModelZoo `LlamaModel` (tests/test_convert_rules.py).
LLAMA_LAYER_RULES = (
    ModuleRule("self_attn.q_proj", "self_attn.proj_q_dense_layer", rope="q"),
    ModuleRule("self_attn.k_proj", "self_attn.proj_k_dense_layer", rope="k"),
    ModuleRule("self_attn.v_proj", "self_attn.proj_v_dense_layer"),
    ModuleRule("self_attn.o_proj", "self_attn.proj_output_dense_layer"),
    ModuleRule("input_layernorm", "norm1"),
    ModuleRule("post_attention_layernorm", "norm3"),
    ModuleRule("mlp.gate_proj", "ffn.ffn.0.linear_layer_for_glu"),
    ModuleRule("mlp.up_proj", "ffn.ffn.0.linear_layer"),
    ModuleRule("mlp.down_proj", "ffn.ffn.1.linear_layer"),
)

LLAMA_RULES = (
    ModuleRule("model.embed_tokens", f"{CS_PREFIX}embedding_layer.word_embeddings"),
    *_in_decoder_layers(LLAMA_LAYER_RULES),
    ModuleRule("model.norm", f"{CS_PREFIX}transformer_decoder.norm"),
    ModuleRule("lm_head", f"{CS_PREFIX}lm_head"),
)
LLAMA_CS_ALIASES = {f"{CS_PREFIX}ln_f": f"{CS_PREFIX}transformer_decoder.norm"}

# Mistral's layout is Llama's (ModelZoo's mistral converter subclasses the llama one).
RULE_TABLES: dict[str, Family] = {
    "llama": Family("llama", LLAMA_RULES, LLAMA_CS_ALIASES),
    "mistral": Family("mistral", LLAMA_RULES, LLAMA_CS_ALIASES),
}


def family_rules(family: str) -> Family:
    """The rule table of `family` (UserError listing the known families otherwise)."""
    get_family(family)
    if family not in RULE_TABLES:
        raise UserError(
            f"model family {family!r} has no HF <-> CS rule table", fix=f"use one of {sorted(RULE_TABLES)}"
        )
    return RULE_TABLES[family]


# ---------------------------------------------------------------------------------------------
# Names


def _pattern(template: str) -> re.Pattern:
    """`model.layers.{layer}.x` -> regex with a named group per `{placeholder}` (digits)."""
    parts = re.split(r"\{(\w+)\}", template)
    regex = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>\\d+)" for i, p in enumerate(parts))
    return re.compile(regex + r"\Z")


@cache
def _compiled(family: str, to_cs: bool) -> tuple[tuple[re.Pattern, str, ModuleRule], ...]:
    rules = family_rules(family).rules
    return tuple((_pattern(r.hf if to_cs else r.cs), r.cs if to_cs else r.hf, r) for r in rules)


def split_name(name: str) -> tuple[str, str]:
    """`a.b.q_proj.lora_B.weight` -> (`a.b.q_proj`, `lora_B.weight`); UserError if no known suffix."""
    for suffix in TENSOR_SUFFIXES:
        if name.endswith("." + suffix):
            return name[: -len(suffix) - 1], suffix
    raise UserError(
        f"tensor name {name!r} does not end with a known suffix {TENSOR_SUFFIXES}",
        fix="pass full parameter names as in the model's state_dict()",
    )


def _match(module: str, family: str, to_cs: bool) -> tuple[str, ModuleRule] | None:
    for pattern, target, rule in _compiled(family, to_cs):
        found = pattern.match(module)
        if found:
            return target.format(**found.groupdict()), rule
    return None


def _convert_name(name: str, family: str, to_cs: bool) -> tuple[str, ModuleRule]:
    module, suffix = split_name(name)
    found = _match(module, family, to_cs)
    if found is None:
        side = "Hugging Face" if to_cs else "Cerebras"
        raise UserError(
            f"no {family} rule maps the {side} tensor {name!r}",
            where="modelzoo_ext/name_map.py",
            fix=f"check the --family and that the name is a full {side} parameter name",
        )
    target, rule = found
    return f"{target}.{suffix}", rule


def hf_to_cs_name(name: str, family: str) -> str:
    """HF parameter name (weight, bias, LoRA tensor or `_mask`) -> the CS parameter name."""
    return _convert_name(name, family, to_cs=True)[0]


def cs_to_hf_name(name: str, family: str) -> str:
    """CS parameter name (with the `model.` prefix) -> the HF parameter name."""
    return _convert_name(name, family, to_cs=False)[0]


def map_names(names: Iterable[str], family: str, *, to_cs: bool, where: str) -> dict[str, str]:
    """Map many names at once; one UserError lists every name no rule maps (none dropped)."""
    mapped: dict[str, str] = {}
    unknown: list[str] = []
    for name in names:
        try:
            mapped[name] = _convert_name(name, family, to_cs)[0]
        except UserError:
            unknown.append(name)
    if unknown:
        side = "Hugging Face" if to_cs else "Cerebras"
        raise UserError(
            f"{len(unknown)} {side} tensor(s) match no {family} rule: {sorted(unknown)[:20]}"
            + (" ..." if len(unknown) > 20 else ""),
            where=where,
            fix="check --family; unknown tensors are never dropped silently",
        )
    return mapped


def hf_module_to_cs_module(target: str, family: str) -> str:
    """A LoRA target module name in HF naming -> the CS module name, suffix for suffix.

    `q_proj` -> `proj_q_dense_layer`, `self_attn.q_proj` -> `self_attn.proj_q_dense_layer`,
    `up_proj` -> `ffn.ffn.0.linear_layer`, `gate_proj` -> `ffn.ffn.0.linear_layer_for_glu`,
    `down_proj` -> `ffn.ffn.1.linear_layer`. The result is a '.'-suffix of the CS qualified names
    of exactly the modules the HF name is a '.'-suffix of.
    """
    rules = [r for r in family_rules(family).rules if "{layer}" in r.hf]
    layer_prefix_hf, layer_prefix_cs = (
        "model.layers.{layer}.",
        f"{CS_PREFIX}transformer_decoder.layers.{{layer}}.",
    )
    matches = []
    for rule in rules:
        hf_rel, cs_rel = rule.hf[len(layer_prefix_hf) :], rule.cs[len(layer_prefix_cs) :]
        if hf_rel == target or hf_rel.endswith("." + target):
            dropped = hf_rel[: len(hf_rel) - len(target)]  # e.g. "self_attn." or "mlp."
            matches.append(cs_rel[len(dropped) :] if cs_rel.startswith(dropped) else cs_rel)
    if len(matches) != 1:
        known = sorted(r.hf[len(layer_prefix_hf) :] for r in rules)
        raise UserError(
            f"LoRA target {target!r} names {len(matches)} {family} decoder modules (need exactly one)",
            fix=f"use a module name such as q_proj, or one of {known}",
        )
    return matches[0]


def cs_aliases(family: str) -> dict[str, str]:
    """CS module -> the CS module it duplicates (see `Family.cs_aliases`)."""
    return dict(family_rules(family).cs_aliases)


def canonical_cs_names(names: Iterable[str]) -> dict[str, str]:
    """Checkpoint key -> CS name with the `model.` prefix.

    Checkpoints saved by the ModelZoo Trainer hold `model.`-prefixed keys; ModelZoo's stock
    converters write them without it (and the Trainer accepts both, as here).
    """
    names = list(names)
    if names and all(n.startswith(CS_PREFIX) for n in names):
        return {n: n for n in names}
    return {n: CS_PREFIX + n for n in names}


# ---------------------------------------------------------------------------------------------
# RoPE row permutation


@dataclass(frozen=True)
class RopeLayout:
    """Where the rotary channels are: heads (q), key/value heads (k), head size, rotary size."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> RopeLayout:
        """From a HF Llama/Mistral `config.json` dict."""
        heads = int(config["num_attention_heads"])
        head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
        rotary = int(head_dim * float(config.get("partial_rotary_factor", 1.0)))
        return cls(heads, int(config.get("num_key_value_heads") or heads), head_dim, rotary)

    @classmethod
    def from_cs_config(cls, model: dict[str, Any]) -> RopeLayout:
        """From the `model:` section of a ModelZoo trainer YAML (GPT-2 backbone keys)."""
        heads = int(model["num_heads"])
        inner = int(model.get("attention_inner_dim") or model["hidden_size"])
        kv_heads = heads
        if model.get("attention_module") == "multiquery_attention":
            kv_heads = int(model["extra_attention_params"]["num_kv_groups"])
        head_dim = inner // heads
        return cls(heads, kv_heads, head_dim, int(model.get("rotary_dim") or head_dim))

    def heads_for(self, rope: str) -> int:
        """Number of heads whose rows a q ("q") or k ("k") tensor holds."""
        return self.num_heads if rope == "q" else self.num_kv_heads


@cache
def _hf_to_cs_order(num_heads: int, head_dim: int, rotary_dim: int) -> torch.Tensor:
    """Row order: CS row j of each head is HF row order[j] (pairs interleaved: x0,y0,x1,y1,...)."""
    if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
        raise UserError(f"rotary_dim {rotary_dim} must be even and in (0, head_dim={head_dim}]")
    half = rotary_dim // 2
    within = torch.arange(rotary_dim).reshape(2, half).t().reshape(-1)  # [0, h, 1, h+1, ...]
    within = torch.cat([within, torch.arange(rotary_dim, head_dim)])
    return (torch.arange(num_heads)[:, None] * head_dim + within[None, :]).reshape(-1)


def _check_rows(t: torch.Tensor, num_heads: int, head_dim: int, name: str) -> None:
    if t.dim() == 0 or t.shape[0] != num_heads * head_dim:
        raise UserError(
            f"tensor {name!r} has shape {tuple(t.shape)}; its rows should be "
            f"{num_heads} heads x {head_dim} = {num_heads * head_dim}",
            fix="check the model config (heads, key/value heads, head size) matches the checkpoint",
        )


def permute_rows_hf_to_cs(
    t: torch.Tensor, num_heads: int, head_dim: int, rotary_dim: int | None = None, *, name: str = "tensor"
) -> torch.Tensor:
    """Rows [num_heads * head_dim, ...] from rotate-half (HF) to interleaved (CS) order, per head."""
    _check_rows(t, num_heads, head_dim, name)
    return t.index_select(0, _hf_to_cs_order(num_heads, head_dim, rotary_dim or head_dim))


def permute_rows_cs_to_hf(
    t: torch.Tensor, num_heads: int, head_dim: int, rotary_dim: int | None = None, *, name: str = "tensor"
) -> torch.Tensor:
    """Inverse of `permute_rows_hf_to_cs`."""
    _check_rows(t, num_heads, head_dim, name)
    inverse = torch.argsort(_hf_to_cs_order(num_heads, head_dim, rotary_dim or head_dim))
    return t.index_select(0, inverse)


def rope_kind(hf_name: str, family: str) -> str | None:
    """ "q" or "k" when the HF tensor's rows take the RoPE permutation, else None."""
    module, suffix = split_name(hf_name)
    found = _match(module, family, to_cs=True)
    if found is None or suffix not in ROW_INDEXED_SUFFIXES:
        return None
    return found[1].rope


def rope_permutation(hf_name: str, layout: RopeLayout, family: str = "llama") -> torch.Tensor | None:
    """Row index `perm` with `cs_tensor = hf_tensor[perm]`, or None when no permutation applies."""
    rope = rope_kind(hf_name, family)
    if rope is None:
        return None
    return _hf_to_cs_order(layout.heads_for(rope), layout.head_dim, layout.rotary_dim)


def to_cs(hf_name: str, t: torch.Tensor, family: str, layout: RopeLayout) -> tuple[str, torch.Tensor]:
    """One HF tensor -> (CS name, CS tensor): renamed, and row-permuted when it is q/k-indexed."""
    cs_name, rule = _convert_name(hf_name, family, to_cs=True)
    if rule.rope and split_name(hf_name)[1] in ROW_INDEXED_SUFFIXES:
        heads = layout.heads_for(rule.rope)
        t = permute_rows_hf_to_cs(t, heads, layout.head_dim, layout.rotary_dim, name=hf_name)
    return cs_name, t


def to_hf(cs_name: str, t: torch.Tensor, family: str, layout: RopeLayout) -> tuple[str, torch.Tensor]:
    """One CS tensor -> (HF name, HF tensor): the inverse of `to_cs`."""
    hf_name, rule = _convert_name(cs_name, family, to_cs=False)
    if rule.rope and split_name(cs_name)[1] in ROW_INDEXED_SUFFIXES:
        heads = layout.heads_for(rule.rope)
        t = permute_rows_cs_to_hf(t, heads, layout.head_dim, layout.rotary_dim, name=cs_name)
    return hf_name, t
