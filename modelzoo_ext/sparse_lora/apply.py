"""Put sparse LoRA into a model, take it out again (merge), and move the LoRA factors around.

Lifecycle of a model:

    summary = apply_sparse_lora_(model, config, masks)   # nn.Linear -> SparseLoRALinear, rest frozen
    ... train (only lora_A / lora_B get gradients) ...
    sd = lora_state_dict(model)                          # {"<module>.lora_A.weight": ..., ...}
    report = merge_sparse_lora_(model)                   # SparseLoRALinear -> plain nn.Linear

Targeting: an entry of `target_modules` selects every `nn.Linear` whose qualified name equals it
or ends with "." + entry ("q_proj", "ffn.ffn.0.linear_layer"), or, written "re:<regex>", whose
qualified name the regex fullmatches. It also selects fused expert modules (ModelZoo's
`TopKExpertsSparseLinear`: a 3-D `expert_weights` [out, E, in]), which become
`SparseLoRAExperts` (`experts.py`). Masks are keyed by the weight's parameter name in the
model's own naming ("model.layers.0.self_attn.q_proj.weight", "...linear_layer.expert_weights").

Applying twice raises (the model already holds SparseLoRALinear layers): merge first, or build
a fresh model.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from modelzoo_ext.errors import UserError
from modelzoo_ext.run_config.sparse_lora_block import SparseLoRAConfig
from modelzoo_ext.sparse_lora.experts import SparseLoRAExperts, SparseMatmul
from modelzoo_ext.sparse_lora.layer import SparseLoRALinear

LORA_PARAM_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


@dataclass
class LayerInfo:
    """One replaced layer: qualified module name, weight shape [out, in], mask density."""

    name: str
    shape: tuple[int, int]
    density: float


@dataclass
class SparseLoRASummary:
    """What `apply_sparse_lora_` did: parameter counts and one entry per replaced layer."""

    mode: str
    trainable_params: int
    total_params: int
    layers: list[LayerInfo] = field(default_factory=list)

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / max(1, self.total_params)

    def __str__(self) -> str:
        lines = [
            f"sparse LoRA ({self.mode}) on {len(self.layers)} layers: trainable "
            f"{self.trainable_params:,} / {self.total_params:,} params ({100 * self.trainable_fraction:.3f}%)"
        ]
        lines += [
            f"  {info.name:<60} {info.shape[0]}x{info.shape[1]}  density {info.density:.4f}"
            for info in self.layers
        ]
        return "\n".join(lines)


@dataclass
class MergeReport:
    """What `merge_sparse_lora_` did. `discarded_fraction[name]` = ||update off the mask|| / ||update||
    for s2d layers re-masked by `preserve_sparsity_on_merge` (0 elsewhere); `total_discarded_fraction`
    is the same ratio over all layers together."""

    mode: str
    merged: list[str]
    discarded_fraction: dict[str, float]
    total_discarded_fraction: float

    def __str__(self) -> str:
        return (
            f"merged {len(self.merged)} {self.mode} layers; re-masking discarded "
            f"{100 * self.total_discarded_fraction:.2f}% of the update's norm"
        )


def _matches(name: str, entry: str) -> bool:
    if entry.startswith("re:"):
        return re.fullmatch(entry[3:], name) is not None
    return name == entry or name.endswith("." + entry)


def is_fused_experts(module: nn.Module) -> bool:
    """A fused expert module: a 3-D `expert_weights` Parameter [out, E, in] (ModelZoo's layout)."""
    weights = getattr(module, "expert_weights", None)
    return isinstance(weights, nn.Parameter) and weights.dim() == 3


def _base_weight(module: nn.Module) -> torch.Tensor:
    return module.expert_weights if is_fused_experts(module) else module.weight


def _weight_key(name: str, module: nn.Module) -> str:
    """The parameter name a module's mask is keyed by: `<name>.weight` or `<name>.expert_weights`."""
    return f"{name}.expert_weights" if is_fused_experts(module) else f"{name}.weight"


def find_target_linears(model: nn.Module, target_modules: list[str]) -> dict[str, nn.Module]:
    """Qualified name -> module (nn.Linear, or fused experts) for every module a `target_modules`
    entry selects.

    Raises UserError naming the entries that select nothing.
    """
    linears = {
        name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) or is_fused_experts(m)
    }
    found: dict[str, nn.Linear] = {}
    unmatched = []
    for entry in target_modules:
        hits = [name for name in linears if _matches(name, entry)]
        if not hits:
            unmatched.append(entry)
        found.update((name, linears[name]) for name in hits)
    # A subclass may compute something else than x W^T + b: refuse rather than replace it.
    subclasses = sorted(
        f"{name} ({type(m).__name__})"
        for name, m in found.items()
        if isinstance(m, nn.Linear) and type(m) is not nn.Linear
    )
    if subclasses:
        raise UserError(
            f"targeted modules are nn.Linear subclasses, which sparse LoRA cannot replace: {subclasses}",
            fix="narrow target_modules (e.g. 're:<regex>') to plain nn.Linear modules",
        )
    if unmatched:
        raise UserError(
            f"target_modules entries match no nn.Linear: {unmatched}",
            where=f"{type(model).__name__} ({len(linears)} nn.Linear modules, e.g. {sorted(linears)[:3]})",
            fix="use module names (or '.'-suffixes) of this model, or 're:<regex>' on qualified names",
        )
    return dict(sorted(found.items()))


def layer_generator(init_seed: int, canonical: str) -> torch.Generator:
    """A CPU generator seeded from sha256(f"{init_seed}:{canonical}"): the same on every backend."""
    digest = hashlib.sha256(f"{init_seed}:{canonical}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def check_masks_match(
    targets: dict[str, nn.Module], masks: Mapping[str, torch.Tensor], config: SparseLoRAConfig
) -> None:
    """The masks fit the targeted layers (`find_target_linears`): one mask per target and none
    other, bool, of the weight's shape; UserError listing every offence otherwise.

    Only names, shapes and dtypes are read: `meta` tensors do (the preflight checks a 7B model's
    mask file against a `meta`-device copy of the model).
    """
    problems = []
    if config.dense_baseline and masks:
        problems.append(f"dense_baseline is set but {len(masks)} masks were given")
    weight_names = {_weight_key(name, m): name for name, m in targets.items()}
    orphans = sorted(set(masks) - set(weight_names))
    if orphans:
        problems.append(f"masks with no targeted nn.Linear: {orphans}")
    if not config.dense_baseline:
        missing = sorted(k for k in weight_names if k not in masks)
        if missing:
            problems.append(f"targeted layers without a mask: {missing}")
    shapes = {k: _base_weight(targets[name]).shape for k, name in weight_names.items()}
    wrong = [
        f"{k}: mask {m.dtype} {tuple(m.shape)} vs weight {tuple(shapes[k])}"
        for k, m in sorted(masks.items())
        if k in weight_names and (m.dtype != torch.bool or m.shape != shapes[k])
    ]
    if wrong:
        problems.append(f"mask shape/dtype mismatches: {wrong}")
    if problems:
        raise UserError(
            "; ".join(problems),
            where="apply_sparse_lora_",
            fix="mask keys must be the model's weight names (`<module>.weight`) of exactly the targeted "
            "layers, bool, of the weight's shape (check target_modules and the mask file's naming)",
        )


def apply_sparse_lora_(
    model: nn.Module,
    config: SparseLoRAConfig,
    masks: Mapping[str, torch.Tensor],
    *,
    target_modules: list[str] | None = None,
    canonical_name: Callable[[str], str | list[str]] | None = None,
    sparse_matmul: SparseMatmul | None = None,
    **layer_kwargs,
) -> SparseLoRASummary:
    """Replace the targeted nn.Linear modules of `model` in place by SparseLoRALinear (and fused
    expert modules by SparseLoRAExperts).

    Args:
        model: any nn.Module; every parameter that is not a LoRA factor ends up frozen.
        config: the run's sparse_lora block.
        masks: weight parameter name (model naming) -> bool [out, in] (fused experts: the stacked
            [out, E, in] under `<module>.expert_weights`); empty for `dense_baseline`.
        target_modules: overrides `config.target_modules` (e.g. ModelZoo module names).
        canonical_name: module name -> the name that seeds its LoRA A (default: itself); the
            ModelZoo backend maps to HF names so both backends start from the same A. For a
            fused expert module it returns the E per-expert names (each expert's A is seeded
            from its own HF name, as the per-expert HF layers are).
        sparse_matmul: the top-k expert matmul of fused expert layers (`experts.py`).
        layer_kwargs: passed to SparseLoRALinear (`mask_base_in_forward`, `sampled_product`);
            `mask_base_in_forward` (True/False) also to SparseLoRAExperts.

    Raises UserError (listing every offending name) on unmatched targets, masks without a
    layer, layers without a mask, shape or dtype mismatches, and when applied a second time.
    """
    already = list(sparse_lora_modules(model))
    if already:
        raise UserError(
            f"the model already holds {len(already)} SparseLoRALinear layers (e.g. {already[0]})",
            fix="apply_sparse_lora_ once per model: merge_sparse_lora_ first, or build a fresh model",
        )
    targets = find_target_linears(model, target_modules or config.target_modules)
    check_masks_match(targets, masks, config)
    canonical_name = canonical_name or (lambda name: name)
    for param in model.parameters():
        param.requires_grad_(False)
    layers = []
    for name, linear in targets.items():
        mask = None if config.dense_baseline else masks[_weight_key(name, linear)]
        if is_fused_experts(linear):
            layer = _experts_layer(linear, mask, config, canonical_name(name), sparse_matmul, layer_kwargs)
        else:
            layer = SparseLoRALinear.from_linear(linear, mask, config, **layer_kwargs)
            layer.reset_lora_parameters(layer_generator(config.init_seed, canonical_name(name)))
        layer.train(linear.training)
        _replace_module(model, name, layer)
        layers.append(LayerInfo(name, tuple(_base_weight(linear).shape), layer.density))
    return SparseLoRASummary(
        mode="dense_lora" if config.dense_baseline else config.mode,
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        total_params=sum(p.numel() for p in model.parameters()),
        layers=layers,
    )


def _experts_layer(
    module: nn.Module,
    mask: torch.Tensor | None,
    config: SparseLoRAConfig,
    expert_names: str | list[str],
    sparse_matmul: SparseMatmul | None,
    layer_kwargs: dict,
) -> SparseLoRAExperts:
    """SparseLoRAExperts around a fused module; expert e's A seeded from `expert_names[e]`."""
    base = layer_kwargs.get("mask_base_in_forward", True)
    if base == "auto":  # as SparseLoRALinear: re-mask only a base that is not already zero off M
        base = mask is not None and bool(module.expert_weights.detach()[~mask].any())
    layer = SparseLoRAExperts.from_fused(
        module, mask, config, mask_base_in_forward=base, sparse_matmul=sparse_matmul
    )
    names = [expert_names] if isinstance(expert_names, str) else list(expert_names)
    if len(names) != layer.num_experts:
        raise UserError(
            f"canonical_name gave {len(names)} names for a module of {layer.num_experts} experts",
            where="apply_sparse_lora_",
        )
    layer.reset_lora_parameters([layer_generator(config.init_seed, n) for n in names])
    return layer


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def sparse_lora_layers(model: nn.Module) -> dict[str, SparseLoRALinear]:
    """Qualified name -> SparseLoRALinear, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SparseLoRALinear)}


def sparse_lora_modules(model: nn.Module) -> dict[str, SparseLoRALinear | SparseLoRAExperts]:
    """Qualified name -> every sparse-LoRA module (linear and fused experts), in model order.
    Each has `lora_A.weight`, `lora_B.weight` and `weight_name` (its base parameter's name)."""
    kinds = (SparseLoRALinear, SparseLoRAExperts)
    return {name: m for name, m in model.named_modules() if isinstance(m, kinds)}


@torch.no_grad()
def merge_sparse_lora_(model: nn.Module) -> MergeReport:
    """Replace every SparseLoRALinear by a plain nn.Linear holding its merged weight.

    s2s: (W + s*B@A) * M, exactly zero off the mask; the merged model computes the same outputs.
    s2d: W*M + s*B@A (dense), or re-masked when the layer has `preserve_sparsity_on_merge`; the
    report says what fraction of the update's norm re-masking discarded.
    """
    layers = sparse_lora_layers(model)
    if not layers:
        raise UserError("the model holds no SparseLoRALinear layers", fix="call apply_sparse_lora_ first")
    fused = [name for name, m in sparse_lora_modules(model).items() if isinstance(m, SparseLoRAExperts)]
    if fused:
        raise UserError(
            f"the model holds fused expert layers ({fused[0]}, ...), which merge through the converters",
            fix="export with `sparse-lora convert cs-to-hf --as merged` (per-expert merge, zero violations)",
        )
    discarded, dropped_sq, total_sq = {}, 0.0, 0.0
    for name, layer in layers.items():
        weight = layer.weight.detach().clone() if layer.merged else layer.merged_weight()
        remask = (
            layer.mode == "sparse_to_dense" and layer.preserve_sparsity_on_merge and layer.mask is not None
        )
        total, off_mask = layer.update_norms()
        dropped = off_mask if remask else 0.0
        discarded[name] = dropped / total if total > 0 else 0.0
        dropped_sq += dropped**2
        total_sq += total**2
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if layer.bias is not None:
            linear.bias = nn.Parameter(layer.bias.detach(), requires_grad=False)
        linear.train(layer.training)
        _replace_module(model, name, linear)
    modes = sorted({layer.mode for layer in layers.values()})
    return MergeReport(
        mode=",".join(modes),
        merged=list(layers),
        discarded_fraction=discarded,
        total_discarded_fraction=(dropped_sq / total_sq) ** 0.5 if total_sq > 0 else 0.0,
    )


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{"<module>.lora_A.weight": [r, in], "<module>.lora_B.weight": [out, r]} (detached, model naming;
    fused experts: [r, E, in] and [out, E, r])."""
    out = {}
    for name, layer in sparse_lora_modules(model).items():
        out[f"{name}.lora_A.weight"] = layer.lora_A.weight.detach()
        out[f"{name}.lora_B.weight"] = layer.lora_B.weight.detach()
    return out


@torch.no_grad()
def load_lora_state_dict_(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Copy LoRA factors into the model's SparseLoRALinear layers; keys and shapes must match exactly."""
    own = lora_state_dict(model)
    missing, unexpected = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
    wrong = [k for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise UserError(
            f"LoRA state dict does not fit the model: missing {missing}, unexpected {unexpected}, "
            f"shape mismatches {wrong}",
            fix="load factors saved from the same model, targets and rank (lora_state_dict)",
        )
    for key, target in own.items():
        target.copy_(state_dict[key])
