"""The one Hugging Face <-> Cerebras name map: each family's declarative rule table, applied.

Every tensor that crosses between the two formats goes through this module: base weights,
masks and LoRA tensors alike, whether the converters write a checkpoint, the ModelZoo model
reads an HF-named mask file, or ModelZoo's own `cszoo checkpoint convert` runs our converter
entries. The rule tables themselves (`ModuleRule`s) belong to the families
(`modelzoo_ext.families.ModelFamily.rules`); this module is the one copy of the logic that
applies them, in the pure-torch core.

Names are full parameter names:
- HF: as in `LlamaForCausalLM.state_dict()`, e.g. `model.layers.0.self_attn.q_proj.weight`;
- CS: as in the ModelZoo model's `state_dict()` (what a CS `.mdl` holds under its top-level
  `"model"` key), e.g. `model.transformer_decoder.layers.0.self_attn.proj_q_dense_layer.weight`.

A name is `<module path>.<tensor suffix>`. The rule tables map module paths; the suffix is
carried over unchanged: `weight`, `bias`, the LoRA tensors `lora_A.weight` / `lora_B.weight`
(PEFT's names, used by `modelzoo_ext.sparse_lora`) and cstorch's mask buffers `weight_mask`
(cstorch registers the mask of parameter `p` on the owning module as `p_mask`).

Mixture of experts (Mixtral): HF stores one tensor per expert
(`model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight` [I, H]); ModelZoo's `optimized` MoE
stores the experts of one projection fused, stacked on dim 1
(`...ffn.experts.fused_ffns.0.linear_layer_for_glu.expert_weights` [I, E, H], `fused[:, e] = w1_e`,
exactly ModelZoo's own `mixtral` converter). A fused rule maps E HF tensors to one CS tensor; the
same stacking carries the weight, its mask (`expert_weights_mask`) and both LoRA factors
(`lora_A.weight` [r, E, in], `lora_B.weight` [out, E, r]). `hf_to_cs_name` maps an expert's name
to the fused name, `cs_to_hf_names` a fused name to the E expert names, `to_cs_stacked` /
`to_hf_parts` move the tensors. transformers 5 stores the experts fused too, in its own layout
(`mlp.experts.gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]); `hf_fused_parts` names the
per-expert slices of those, so every reader sees one HF naming (4.57's, per expert).
`hf_to_cs_state` maps a whole HF state at once (experts grouped, recomputed buffers skipped,
CS duplicates such as `ln_f` added), for both converters (`convert hf-to-cs`, ModelZoo's registry).

RoPE: HF rotates halves of each head (rotate-half), CS rotates interleaved pairs, so the rows of
q and k projections are permuted per head between the two formats (exactly what ModelZoo's stock
`llama` converter does). Every tensor whose rows index q/k output channels takes the same
permutation: the weight, its bias, its mask and its LoRA `lora_B`. `lora_A` (rows index the rank)
and all v/o/MLP tensors do not. The heads, key/value heads, head size, rotary size and experts
(`RopeLayout`) come from the run's `model:` section as ModelZoo reads it
(`modelzoo_ext.run_config.model_section`), or from a `config.json` through the section it
converts to: one derivation for both formats.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

from modelzoo_ext.errors import UserError
from modelzoo_ext.families import CS_PREFIX, ModuleRule, get_family, resolve_family
from modelzoo_ext.run_config.architecture import hf_to_cs_model_config
from modelzoo_ext.run_config.model_section import NormalisedModelSection, normalise_model_section

if TYPE_CHECKING:  # torch is imported where tensors are permuted: reading names and shapes needs none
    import torch

# Tensor suffixes after the module path, longest first so `lora_B.weight` wins over `weight`.
LORA_A_SUFFIX = "lora_A.weight"
LORA_B_SUFFIX = "lora_B.weight"
MASK_SUFFIX = "_mask"
# A fused expert module's parameter is `expert_weights` (ModelZoo's `TopKExpertsSparseLinear`).
FUSED_SUFFIXES = {"weight": "expert_weights", "weight" + MASK_SUFFIX: "expert_weights" + MASK_SUFFIX}
TENSOR_SUFFIXES = (
    LORA_A_SUFFIX,
    LORA_B_SUFFIX,
    "expert_weights" + MASK_SUFFIX,
    "expert_weights",
    "weight" + MASK_SUFFIX,
    "bias" + MASK_SUFFIX,
    "weight",
    "bias",
)
# Suffixes whose dim 0 indexes the module's output channels (and so takes the q/k permutation).
ROW_INDEXED_SUFFIXES = frozenset({"weight", "bias", "weight_mask", "bias_mask", LORA_B_SUFFIX})

# HF buffers that old checkpoints store but both sides recompute from the config (skipped, as
# the stock converter does).
HF_RECOMPUTED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def family_rules(family: str) -> tuple[ModuleRule, ...]:
    """The rule table of `family` (UserError listing the known families otherwise)."""
    return get_family(family).rules


# ---------------------------------------------------------------------------------------------
# Names


def _pattern(template: str) -> re.Pattern:
    """`model.layers.{layer}.x` -> regex with a named group per `{placeholder}` (digits)."""
    parts = re.split(r"\{(\w+)\}", template)
    regex = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>\\d+)" for i, p in enumerate(parts))
    return re.compile(regex + r"\Z")


@cache
def _compiled(family: str, to_cs: bool) -> tuple[tuple[re.Pattern, str, ModuleRule], ...]:
    rules = family_rules(family)
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


def _match(module: str, family: str, to_cs: bool) -> tuple[dict[str, str], ModuleRule] | None:
    for pattern, _target, rule in _compiled(family, to_cs):
        found = pattern.match(module)
        if found:
            return found.groupdict(), rule
    return None


def _unknown(name: str, family: str, to_cs: bool) -> UserError:
    side = "Hugging Face" if to_cs else "Cerebras"
    return UserError(
        f"no {family} rule maps the {side} tensor {name!r}",
        where="modelzoo_ext/name_map.py",
        fix=f"check the --family and that the name is a full {side} parameter name",
    )


def _cs_suffix(suffix: str, rule: ModuleRule) -> str:
    return FUSED_SUFFIXES.get(suffix, suffix) if rule.fused else suffix


def _hf_suffix(suffix: str, rule: ModuleRule) -> str | None:
    """The HF suffix of a CS suffix, or None when the suffix does not belong to the module kind."""
    if not rule.fused:
        return None if suffix in FUSED_SUFFIXES.values() else suffix
    back = {v: k for k, v in FUSED_SUFFIXES.items()}
    if suffix in back:
        return back[suffix]
    return suffix if suffix in (LORA_A_SUFFIX, LORA_B_SUFFIX) else None


def _to_cs_name(name: str, family: str) -> tuple[str, ModuleRule, int | None]:
    """HF name -> (CS name, rule, expert index or None)."""
    module, suffix = split_name(name)
    found = _match(module, family, to_cs=True)
    if found is None or (suffix in FUSED_SUFFIXES.values()):
        raise _unknown(name, family, True)
    groups, rule = found
    expert = int(groups["expert"]) if rule.fused else None
    return f"{rule.cs.format(**groups)}.{_cs_suffix(suffix, rule)}", rule, expert


def _to_hf_names(name: str, family: str, num_experts: int | None) -> tuple[list[str], ModuleRule]:
    """CS name -> ([HF name] or the E expert names of a fused tensor, rule)."""
    module, suffix = split_name(name)
    found = _match(module, family, to_cs=False)
    hf_suffix = None if found is None else _hf_suffix(suffix, found[1])
    if found is None or hf_suffix is None:
        raise _unknown(name, family, False)
    groups, rule = found
    if not rule.fused:
        return [f"{rule.hf.format(**groups)}.{hf_suffix}"], rule
    if not num_experts:
        raise UserError(
            f"{name!r} stacks the tensors of every expert; mapping it needs the number of experts",
            fix="pass a layout with num_experts (RopeLayout.from_cs_config of a config with `moe:`)",
        )
    return [f"{rule.hf.format(**groups, expert=e)}.{hf_suffix}" for e in range(num_experts)], rule


def hf_to_cs_name(name: str, family: str) -> str:
    """HF parameter name (weight, bias, LoRA tensor or `_mask`) -> the CS parameter name.

    An expert's tensor maps to the fused tensor holding it (many to one; see `expert_index`).
    """
    return _to_cs_name(name, family)[0]


def expert_index(hf_name: str, family: str) -> int | None:
    """The expert an HF tensor belongs to (its index on dim 1 of the fused CS tensor), else None."""
    return _to_cs_name(hf_name, family)[2]


def is_fused(cs_name: str, family: str) -> bool:
    """Whether a CS tensor stacks the tensors of every expert on dim 1."""
    module, _ = split_name(cs_name)
    found = _match(module, family, to_cs=False)
    if found is None:
        raise _unknown(cs_name, family, False)
    return found[1].fused


def cs_to_hf_names(name: str, family: str, num_experts: int | None = None) -> list[str]:
    """CS parameter name -> its HF name, or the E names (expert order) of a fused expert tensor."""
    return _to_hf_names(name, family, num_experts)[0]


def cs_to_hf_name(name: str, family: str) -> str:
    """CS parameter name (with the `model.` prefix) -> the HF parameter name (not for fused tensors)."""
    names, rule = _to_hf_names(name, family, 1)
    if rule.fused:
        raise UserError(
            f"{name!r} is a fused expert tensor (one per expert on the HF side)", fix="use cs_to_hf_names"
        )
    return names[0]


def map_names(names: Iterable[str], family: str, *, to_cs: bool, where: str) -> dict[str, str]:
    """Map many names at once; one UserError lists every name no rule maps (none dropped).

    HF -> CS: name -> CS name (experts -> their fused tensor). CS -> HF: name -> HF name, for a
    fused tensor the name of its expert 0 (use `cs_to_hf_names` for all of them).
    """
    mapped: dict[str, str] = {}
    unknown: list[str] = []
    for name in names:
        try:
            mapped[name] = _to_cs_name(name, family)[0] if to_cs else _to_hf_names(name, family, 1)[0][0]
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


def group_by_cs(
    hf_names: Iterable[str], family: str, num_experts: int | None, *, where: str
) -> dict[str, list[str]]:
    """CS name -> the HF names it is made of (one, or every expert in order), for HF names in any order.

    A fused tensor needs all `num_experts` experts (0..E-1): a partial set is a UserError, since
    a stacked tensor cannot leave experts out.
    """
    groups: dict[str, dict[int, str]] = {}
    for hf_name in hf_names:
        cs_name, _, expert = _to_cs_name(hf_name, family)
        groups.setdefault(cs_name, {})[0 if expert is None else expert] = hf_name
    out: dict[str, list[str]] = {}
    for cs_name, parts in groups.items():
        expected = [0]
        if is_fused(cs_name, family):
            expected = list(range(num_experts or max(parts) + 1))
        if sorted(parts) != expected:
            raise UserError(
                f"{cs_name} stacks {len(expected)} experts but the HF tensors give experts {sorted(parts)}",
                where=where,
                fix="every expert of a fused projection needs its tensor (and its mask, when masked)",
            )
        out[cs_name] = [parts[e] for e in expected]
    return out


def hf_module_to_cs_module(target: str, family: str) -> str:
    """A LoRA target module name in HF naming -> the CS module name, suffix for suffix.

    `q_proj` -> `proj_q_dense_layer`, `self_attn.q_proj` -> `self_attn.proj_q_dense_layer`,
    `up_proj` -> `ffn.ffn.0.linear_layer`, `gate_proj` -> `ffn.ffn.0.linear_layer_for_glu`,
    `down_proj` -> `ffn.ffn.1.linear_layer`, Mixtral `w1` -> `ffn.experts.fused_ffns.0.linear_layer_for_glu`
    (the fused module of all experts). The result is a '.'-suffix of the CS qualified names
    of exactly the modules the HF name is a '.'-suffix of. The MoE router is never a target.
    """
    rules = [r for r in family_rules(family) if "{layer}" in r.hf and r.lora_target]
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
    """CS module -> the CS module it duplicates (see `ModelFamily.cs_alias_pairs`)."""
    return get_family(family).cs_aliases


def cs_duplicate_of(cs_name: str, family: str) -> str | None:
    """The CS tensor a CS duplicate repeats (`model.ln_f.weight` -> `model.transformer_decoder.norm.weight`,
    see `ModelFamily.cs_alias_pairs`), or None for a tensor that is no duplicate."""
    module, suffix = split_name(cs_name)
    original = cs_aliases(family).get(module)
    return None if original is None else f"{original}.{suffix}"


def cs_duplicates(cs_name: str, family: str) -> list[str]:
    """The CS duplicates ModelZoo also stores of a CS tensor (`model.ln_f.weight` of the final norm's)."""
    module, suffix = split_name(cs_name)
    return [f"{alias}.{suffix}" for alias, original in cs_aliases(family).items() if original == module]


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
    """The tensor layout the map needs besides names: where the rotary channels are (heads (q),
    key/value heads (k), head size, rotary size), and how many experts a fused tensor stacks
    (`num_experts`, 0 for dense models)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int
    num_experts: int = 0

    @classmethod
    def from_model_section(cls, model: NormalisedModelSection) -> RopeLayout:
        """From the normalised `model:` section of a run (`run_config.normalise_model_section`)."""
        if model.rotary_dim is None:
            raise UserError(
                f"position_embedding_type is {model.values['position_embedding_type']!r}: the families "
                "this package maps use rotary position embeddings",
                fix="set position_embedding_type: rotary in the model section",
            )
        return cls(model.num_heads, model.num_kv_heads, model.head_dim, model.rotary_dim, model.num_experts)

    @classmethod
    def from_cs_config(cls, model: dict[str, Any]) -> RopeLayout:
        """From the `model:` section of a ModelZoo trainer YAML, or the `model_dump()` of a ModelZoo
        model config: either spelling of a key, ModelZoo's defaults for keys left out."""
        return cls.from_model_section(normalise_model_section(model))

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], family: str | None = None) -> RopeLayout:
        """From a HF `config.json` dict, through the ModelZoo section it converts to (the family
        from `model_type` unless given)."""
        found = resolve_family(family, hf_config=config, where="config.json").name
        return cls.from_cs_config(hf_to_cs_model_config(config, found))

    def heads_for(self, rope: str) -> int:
        """Number of heads whose rows a q ("q") or k ("k") tensor holds."""
        return self.num_heads if rope == "q" else self.num_kv_heads


@cache
def _hf_to_cs_order(num_heads: int, head_dim: int, rotary_dim: int) -> torch.Tensor:
    """Row order: CS row j of each head is HF row order[j] (pairs interleaved: x0,y0,x1,y1,...)."""
    import torch

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
    import torch

    inverse = torch.argsort(_hf_to_cs_order(num_heads, head_dim, rotary_dim or head_dim))
    return t.index_select(0, inverse)


def rope_kind(hf_name: str, family: str) -> str | None:
    """ "q" or "k" when the HF tensor's rows take the RoPE permutation, else None."""
    module, suffix = split_name(hf_name)
    found = _match(module, family, to_cs=True)
    if found is None or suffix not in ROW_INDEXED_SUFFIXES:
        return None
    return found[1].rope


def _rows_to_cs(hf_name: str, t: torch.Tensor, rule: ModuleRule, layout: RopeLayout) -> torch.Tensor:
    if rule.rope and split_name(hf_name)[1] in ROW_INDEXED_SUFFIXES:
        heads = layout.heads_for(rule.rope)
        return permute_rows_hf_to_cs(t, heads, layout.head_dim, layout.rotary_dim, name=hf_name)
    return t


def to_cs(hf_name: str, t: torch.Tensor, family: str, layout: RopeLayout) -> tuple[str, torch.Tensor]:
    """One HF tensor -> (CS name, CS tensor): renamed, and row-permuted when it is q/k-indexed.

    Not for experts' tensors: a fused CS tensor is made from all experts (`to_cs_stacked`).
    """
    cs_name, rule, expert = _to_cs_name(hf_name, family)
    if expert is not None:
        raise UserError(f"{hf_name!r} is one expert of the fused {cs_name!r}", fix="use to_cs_stacked")
    return cs_name, _rows_to_cs(hf_name, t, rule, layout)


def to_cs_stacked(
    cs_name: str, parts: list[tuple[str, torch.Tensor]], family: str, layout: RopeLayout
) -> torch.Tensor:
    """The CS tensor `cs_name` from its HF parts (`group_by_cs`): one tensor, or every expert's
    [a, b] stacked on dim 1 into [a, E, b] (ModelZoo's fused layout)."""
    if not is_fused(cs_name, family):
        ((hf_name, t),) = parts
        return to_cs(hf_name, t, family, layout)[1]
    for e, (hf_name, _) in enumerate(parts):
        if _to_cs_name(hf_name, family)[0] != cs_name or expert_index(hf_name, family) != e:
            raise UserError(f"{hf_name!r} is not expert {e} of {cs_name!r}", where="to_cs_stacked")
    import torch

    return torch.stack([t for _, t in parts], dim=1)


def to_hf(cs_name: str, t: torch.Tensor, family: str, layout: RopeLayout) -> tuple[str, torch.Tensor]:
    """One CS tensor -> (HF name, HF tensor): the inverse of `to_cs` (not for fused tensors)."""
    hf_name = cs_to_hf_name(cs_name, family)
    rule = _match(split_name(cs_name)[0], family, to_cs=False)[1]
    if rule.rope and split_name(cs_name)[1] in ROW_INDEXED_SUFFIXES:
        heads = layout.heads_for(rule.rope)
        t = permute_rows_cs_to_hf(t, heads, layout.head_dim, layout.rotary_dim, name=cs_name)
    return hf_name, t


def to_hf_parts(
    cs_name: str, t: torch.Tensor, family: str, layout: RopeLayout
) -> list[tuple[str, torch.Tensor]]:
    """One CS tensor -> [(HF name, HF tensor)]: `to_hf`, or for a fused [a, E, b] tensor the E
    expert tensors `t[:, e]` (contiguous copies) under their HF names, in expert order."""
    if not is_fused(cs_name, family):
        return [to_hf(cs_name, t, family, layout)]
    names = cs_to_hf_names(cs_name, family, t.shape[1] if t.dim() == 3 else None)
    if t.dim() != 3 or (layout.num_experts and t.shape[1] != layout.num_experts):
        raise UserError(
            f"fused expert tensor {cs_name!r} has shape {tuple(t.shape)}; expected [a, {layout.num_experts}, b]",
            fix="check the model config's moe.num_experts matches the checkpoint",
        )
    return [(name, t[:, e].contiguous()) for e, name in enumerate(names)]


# ---------------------------------------------------------------------------------------------
# transformers 5's fused Mixtral experts, read as the per-expert names above

HF_FUSED_EXPERTS = re.compile(
    r"(?P<layer>model\.layers\.\d+)\.mlp\.experts\.(?P<kind>gate_up_proj|down_proj)"
)
HF_V5_ROUTER = re.compile(r"(?P<layer>model\.layers\.\d+)\.mlp\.gate\.weight")

# One per-expert tensor inside a transformers-5 tensor: (stored name, index into it).
FusedPart = tuple[str, tuple]


def hf_fused_parts(stored: str, shape: tuple[int, ...]) -> dict[str, FusedPart] | None:
    """Per-expert (transformers 4.57) names of a transformers-5 Mixtral tensor, each with its slice.

    `mlp.experts.gate_up_proj` [E, 2I, H]: w1_e = [e, :I], w3_e = [e, I:] (transformers 5 computes
    `gate, up = (x @ gate_up_proj[e].T).chunk(2)`, `act(gate) * up`); `mlp.experts.down_proj`
    [E, H, I]: w2_e = [e]; `mlp.gate.weight` (the router) = `block_sparse_moe.gate.weight`.
    None for any other tensor.
    """
    router = HF_V5_ROUTER.fullmatch(stored)
    if router:
        return {f"{router['layer']}.block_sparse_moe.gate.weight": (stored, ())}
    found = HF_FUSED_EXPERTS.fullmatch(stored)
    if found is None:
        return None
    if len(shape) != 3:
        raise UserError(f"{stored} has shape {shape}; transformers 5 stores it as [experts, out, in]")
    prefix = f"{found['layer']}.block_sparse_moe.experts"
    experts, rows = shape[0], shape[1]
    if found["kind"] == "down_proj":
        return {f"{prefix}.{e}.w2.weight": (stored, (e,)) for e in range(experts)}
    half = rows // 2
    parts = {}
    for e in range(experts):
        parts[f"{prefix}.{e}.w1.weight"] = (stored, (e, slice(0, half)))
        parts[f"{prefix}.{e}.w3.weight"] = (stored, (e, slice(half, rows)))
    return parts


# ---------------------------------------------------------------------------------------------
# A whole HF state as CS tensors (both converters: `convert hf-to-cs` and the ModelZoo registry)


@dataclass(frozen=True)
class CSSource:
    """How one CS tensor of a converted HF state is made: as the CS tensor `made_as` (itself, or the
    original a CS duplicate repeats) from the HF tensors `hf_names` (one, or every expert in order)."""

    made_as: str
    hf_names: tuple[str, ...]


def hf_to_cs_state(
    hf_names: Iterable[str], family: str, num_experts: int | None, *, where: str
) -> dict[str, CSSource]:
    """CS name -> how it is made, for every tensor of an HF state: recomputed buffers skipped, every
    name no rule maps in one UserError, each fused tensor from all its experts, then the CS
    duplicates ModelZoo's strict loading expects (`ln_f`) with their originals' sources."""
    names = [name for name in hf_names if not HF_RECOMPUTED.fullmatch(name)]
    map_names(names, family, to_cs=True, where=where)
    groups = group_by_cs(names, family, num_experts, where=where)
    state = {cs_name: CSSource(cs_name, tuple(parts)) for cs_name, parts in groups.items()}
    for cs_name in list(state):
        for duplicate in cs_duplicates(cs_name, family):
            state[duplicate] = state[cs_name]
    return state


def make_cs_tensor(
    source: CSSource, read: Callable[[str], torch.Tensor], family: str, layout: RopeLayout
) -> torch.Tensor:
    """The CS tensor `source` describes, from HF tensors read by name (renamed, q/k rows permuted,
    experts stacked: `to_cs_stacked`)."""
    return to_cs_stacked(source.made_as, [(name, read(name)) for name in source.hf_names], family, layout)
