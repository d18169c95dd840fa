"""`sparse-lora convert cs-to-hf`: a (fine-tuned) ModelZoo checkpoint -> Hugging Face.

- `--as merged` (either mode): a plain HF model directory (safetensors shards + config.json)
  with LoRA folded in by the one merge definition (`SparseLoRALinear.merged_weight`):
  s2s (W + s*B@A) * M, s2d W*M + s*B@A. Every masked weight is written as W*M at least, and
  for s2s (and s2d with `preserve_sparsity_on_merge`) `check_tensor` must find zero nonzeros
  off the mask in every masked tensor, or nothing is written.
- `--as adapter` (sparse-to-dense only): a PEFT adapter directory written by
  `modelzoo_ext.sparse_lora.save_adapter` (lora_B of q/k with rows permuted back to HF order),
  for `PeftModel.from_pretrained` on the HF base pruned with the same masks.
Both hold `sparse_lora_masks.safetensors`, the masks in HF naming.

Masks come from `--masks` (either naming), else from the checkpoint's `<param>_mask` entries,
else from `sparse_lora.mask_path` of the config; where a file and the checkpoint both hold a
mask they must be equal. Both are seen in HF naming through the one `MaskView` (the
checkpoint's as `cs_checkpoint.EmbeddedMasks`), and written beside the export with the file's
provenance (or the checkpoint's path). The legacy `ln_f` duplicate must equal the final norm
(`name_map.cs_duplicate_of`) and is not exported. Tensors are read, converted and written one
at a time.

Mixtral: a fused expert tensor [out, E, in] (weight, `expert_weights_mask`, stacked LoRA
factors) is unstacked into the E per-expert HF tensors first (`name_map.to_hf_parts`); each
expert then merges through the same `SparseLoRALinear.merged_weight` and is checked like any
weight, and the adapter holds one `lora_A`/`lora_B` per expert (PEFT's Mixtral layout,
`target_modules` w1/w2/w3, `lora_dropout` 0.0: PEFT's transformers-5 fused-expert wrapper refuses
any other value).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from mask_converters.cs_checkpoint import CSCheckpoint, EmbeddedMasks
from mask_converters.hf_writer import DEFAULT_MAX_SHARD_BYTES, ShardedSafetensorsWriter
from mask_converters.mask_files import write_view
from modelzoo_ext.atomic import atomic_dir
from modelzoo_ext.errors import UserError
from modelzoo_ext.families import resolve_family
from modelzoo_ext.masks.view import MaskView
from modelzoo_ext.name_map import (
    LORA_A_SUFFIX,
    LORA_B_SUFFIX,
    MASK_SUFFIX,
    RopeLayout,
    cs_duplicate_of,
    cs_to_hf_names,
    map_names,
    split_name,
    to_hf_parts,
)
from modelzoo_ext.run_config import (
    SPARSE_TO_DENSE,
    SparseLoRAConfig,
    cs_to_hf_config,
    find_model_section,
    load_yaml,
    normalise_model_section,
)
from modelzoo_ext.run_config.modes import EXPORT_KINDS
from modelzoo_ext.sparse_lora import SparseLoRALinear, check_tensor, save_adapter
from modelzoo_ext.sparse_lora.check import SparsityReport
from modelzoo_ext.sparse_lora.kernels import masked_weight

HF_MASKS_NAME = "sparse_lora_masks.safetensors"
# Files of a HF base directory carried into a merged export (the tokenizer and generation defaults).
BASE_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)


class _Classified:
    """The checkpoint's keys sorted by role (all CS names)."""

    def __init__(self, checkpoint: CSCheckpoint, family: str) -> None:
        self.weights, self.lora, self.masks, self.aliases = [], {}, [], {}
        for key in checkpoint.keys():  # noqa: SIM118 (not a dict)
            module, suffix = split_name(key)
            original = cs_duplicate_of(key, family)
            if original is not None:
                self.aliases[key] = original
            elif suffix.endswith(MASK_SUFFIX):
                self.masks.append(key)
            elif suffix in (LORA_A_SUFFIX, LORA_B_SUFFIX):
                self.lora.setdefault(module, {})[suffix] = key
            else:
                self.weights.append(key)
        map_names(
            [k for k in checkpoint.keys() if k not in self.aliases],  # noqa: SIM118 (not a dict)
            family,
            to_cs=False,
            where=str(checkpoint.path),
        )  # noqa: SIM118 (not a dict)
        incomplete = [m for m, parts in self.lora.items() if len(parts) != 2]
        if incomplete:
            raise UserError(
                f"LoRA modules without both lora_A and lora_B: {incomplete[:10]}", where=str(checkpoint.path)
            )
        weights = set(self.weights)
        orphans = [
            m for m in self.lora if f"{m}.weight" not in weights and f"{m}.expert_weights" not in weights
        ]
        if orphans:
            raise UserError(f"LoRA modules without a base weight: {orphans[:10]}", where=str(checkpoint.path))


def _hf_weights_of(module: str, family: str, layout: RopeLayout) -> list[str]:
    """The HF weight names of a CS LoRA module (one, or each expert's of a fused module)."""
    names = cs_to_hf_names(f"{module}.{LORA_A_SUFFIX}", family, layout.num_experts)
    return [name.removesuffix(f".{LORA_A_SUFFIX}") + ".weight" for name in names]


def _check_aliases(checkpoint: CSCheckpoint, aliases: dict[str, str]) -> None:
    """Each CS duplicate (`ln_f`) equals the tensor it repeats (which is exported in its place)."""
    for alias, original in aliases.items():
        if original not in checkpoint or not torch.equal(checkpoint.get(alias), checkpoint.get(original)):
            raise UserError(
                f"{alias} should duplicate {original} but differs (or the original is missing)",
                where=str(checkpoint.path),
            )


def _sparse_lora_config(
    model_section: dict[str, Any], classified: _Classified, where: str
) -> SparseLoRAConfig | None:
    raw = model_section.get("sparse_lora")
    if raw is None:
        if classified.lora:
            raise UserError(
                f"the checkpoint holds LoRA tensors ({len(classified.lora)} modules) but the config has no "
                "sparse_lora block",
                where=where,
                fix="pass the trainer YAML of the fine-tuning run (model.sparse_lora gives mode and alpha)",
            )
        return None
    try:
        return SparseLoRAConfig(**raw)
    except Exception as exc:  # pydantic ValidationError: show it on one line
        raise UserError(f"invalid sparse_lora block: {exc}".replace("\n", " "), where=where) from exc


def _resolve_masks(
    checkpoint: CSCheckpoint,
    classified: _Classified,
    config: SparseLoRAConfig | None,
    masks_path: str | Path | None,
    config_path: Path,
    family: str,
    layout: RopeLayout,
) -> tuple[MaskView | None, MaskView | None]:
    """(masks to use or None, the checkpoint's own masks to compare against or None), in HF naming."""
    embedded = None
    if classified.masks:
        embedded = MaskView(EmbeddedMasks(checkpoint, classified.masks), "hf", family, layout)
    if masks_path is None and embedded is None and config is not None and config.mask_path:
        candidate = Path(config.mask_path)
        if not candidate.is_absolute() and not candidate.exists():
            candidate = config_path.parent / candidate
        masks_path = candidate
    if masks_path is not None:
        return MaskView(masks_path, "hf", family, layout), embedded
    if embedded is not None:
        return embedded, None
    if config is not None and not config.dense_baseline:
        raise UserError(
            "no masks: the checkpoint holds no <param>_mask entries and no mask file was found",
            where=str(checkpoint.path),
            fix="pass --masks (the run's mask file)",
        )
    return None, None


def _mask(masks: MaskView | None, embedded: MaskView | None, hf_name: str) -> torch.Tensor | None:
    if masks is None or hf_name not in masks:
        return None
    mask = masks.get(hf_name)
    if embedded is not None and hf_name in embedded and not torch.equal(embedded.get(hf_name), mask):
        raise UserError(
            f"the checkpoint's mask of {hf_name} differs from the mask file's",
            where=masks.origin,
            fix="pass the mask file the run was trained with",
        )
    return mask


def _lora_layer(
    name: str,
    weight: torch.Tensor,
    mask: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    config: SparseLoRAConfig,
) -> SparseLoRALinear:
    """A SparseLoRALinear holding the trained tensors (HF row order), for its merge definition."""
    out_features, in_features = weight.shape
    r = a.shape[0]
    if tuple(a.shape) != (r, in_features) or tuple(b.shape) != (out_features, r):
        raise UserError(
            f"LoRA shapes lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)} do not fit the weight {tuple(weight.shape)} "
            f"(expected [r, {in_features}] and [{out_features}, r])",
            where=name,
        )
    layer = SparseLoRALinear(
        nn.Parameter(weight, requires_grad=False),
        None,
        mask,
        mode=config.mode,
        r=a.shape[0],
        alpha=config.alpha,
        preserve_sparsity_on_merge=config.preserve_sparsity_on_merge,
    )
    layer.lora_A.weight = nn.Parameter(a, requires_grad=False)
    layer.lora_B.weight = nn.Parameter(b, requires_grad=False)
    return layer


def _must_stay_sparse(config: SparseLoRAConfig | None) -> bool:
    """A merged export must have zero violations unless it is an s2d run meant to become an adapter."""
    return config is None or config.export_kind == "merged"


def _hf_config(
    model_section: dict[str, Any], family: str, base_model: Path | None, dtype: torch.dtype
) -> dict:
    if base_model is not None:
        config = json.loads((base_model / "config.json").read_text())
    else:
        config = cs_to_hf_config(model_section, family)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    return config


def _hf_parts(ctx: _Export, cs_name: str) -> list[tuple[str, torch.Tensor]]:
    """One CS tensor as its HF tensor(s): renamed, q/k rows permuted, fused experts unstacked."""
    return to_hf_parts(cs_name, ctx.checkpoint.get(cs_name), ctx.family, ctx.layout)


def _lora_parts(ctx: _Export, cs_weight: str) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """The (A, B) of each HF part of a CS weight (HF row order), or None without LoRA."""
    module, suffix = split_name(cs_weight)
    parts = ctx.classified.lora.get(module) if suffix in ("weight", "expert_weights") else None
    if parts is None:
        return None
    a_parts, b_parts = _hf_parts(ctx, parts[LORA_A_SUFFIX]), _hf_parts(ctx, parts[LORA_B_SUFFIX])
    return [(a, b) for (_, a), (_, b) in zip(a_parts, b_parts, strict=True)]


def _export_merged(ctx: _Export, tmp: Path) -> dict[str, Any]:
    writer = ShardedSafetensorsWriter(tmp, ctx.max_shard_bytes)
    checks, dtypes = [], set()
    tied = bool(
        normalise_model_section(ctx.model_section).values["share_embedding_weights"]
    )  # ModelZoo's default
    for cs_name in tqdm(ctx.classified.weights, desc="merging", unit="tensor", disable=not ctx.progress):
        lora = _lora_parts(ctx, cs_name)
        for i, (hf_name, weight) in enumerate(_hf_parts(ctx, cs_name)):
            if tied and hf_name == "lm_head.weight":
                continue  # HF ties it to the embedding
            mask = _mask(ctx.masks, ctx.embedded, hf_name)
            if lora is not None:
                a, b = lora[i]
                weight = _lora_layer(hf_name, weight, mask, a, b, ctx.config).merged_weight()
            elif mask is not None:
                weight = masked_weight(weight, mask)
            if mask is not None:
                checks.append(check_tensor(hf_name, weight, mask))
            dtypes.add(weight.dtype)
            writer.add(hf_name, weight.to(ctx.dtype) if ctx.dtype else weight)
    report = SparsityReport(tensors=checks)
    if _must_stay_sparse(ctx.config) and report.total_violations:
        raise UserError(
            f"the merged model breaks its masks ({report.total_violations} nonzeros off the mask); nothing written",
            where=str(ctx.checkpoint.path),
            fix="check the masks are the ones the run was trained with",
        )
    writer.close()
    out_dtype = ctx.dtype or (dtypes.pop() if len(dtypes) == 1 else torch.float32)
    config = _hf_config(ctx.model_section, ctx.family, ctx.base_model, out_dtype)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return {"merged_is_sparse": _must_stay_sparse(ctx.config), "sparsity_check": report.to_dict()}


def _export_adapter(ctx: _Export, tmp: Path) -> dict[str, Any]:
    config = ctx.config
    if config is None or not ctx.classified.lora:
        raise UserError(
            "the checkpoint holds no LoRA tensors: nothing to export as an adapter", fix="use --as merged"
        )
    if config.mode != SPARSE_TO_DENSE:
        raise UserError(
            f"{config.mode} cannot be a PEFT adapter: its update (s*B@A) * M is masked",
            fix="export it with --as merged (zero violations are checked)",
        )
    skeleton = nn.Module()
    for parts in ctx.classified.lora.values():
        a_parts, b_parts = _hf_parts(ctx, parts[LORA_A_SUFFIX]), _hf_parts(ctx, parts[LORA_B_SUFFIX])
        for (a_name, a), (_, b) in zip(a_parts, b_parts, strict=True):
            hf_module = a_name[: -len("." + LORA_A_SUFFIX)]
            meta_weight = torch.empty(b.shape[0], a.shape[1], dtype=a.dtype, device="meta")
            layer = _lora_layer(hf_module, meta_weight, None, a, b, config)
            layer.set_mask(_mask(ctx.masks, ctx.embedded, f"{hf_module}.weight"))
            _set_submodule(skeleton, hf_module, layer)
    base = str(ctx.base_model) if ctx.base_model else None
    # PEFT's transformers-5 fused-expert wrapper refuses lora_dropout != 0 (inference ignores it).
    dropout = 0.0 if ctx.layout.num_experts else None
    save_adapter(skeleton, tmp, base_model_name_or_path=base, lora_dropout=dropout)
    return {"lora_modules": len(ctx.classified.lora)}


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    *parents, leaf = name.split(".")
    node = root
    for part in parents:
        if not hasattr(node, part):
            node.add_module(part, nn.Module())
        node = getattr(node, part)
    node.add_module(leaf, module)


@dataclass
class _Export:
    """Everything one export needs, resolved and checked before anything is written."""

    checkpoint: CSCheckpoint
    family: str
    layout: RopeLayout
    classified: _Classified
    config: SparseLoRAConfig | None
    masks: MaskView | None
    embedded: MaskView | None
    model_section: dict[str, Any]
    base_model: Path | None
    dtype: torch.dtype | None
    max_shard_bytes: int
    progress: bool


def export_cs_to_hf(
    checkpoint_path: str | Path,
    config_path: str | Path,
    out_dir: str | Path,
    *,
    kind: str = "merged",
    family: str | None = None,
    masks_path: str | Path | None = None,
    base_model: str | Path | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
) -> dict[str, Any]:
    """Export a CS checkpoint as a merged HF model or a PEFT adapter (see module docstring).

    Returns a summary (paths, counts, the sparsity check of a merged export).
    """
    if kind not in EXPORT_KINDS:
        raise UserError(f"unknown export kind {kind!r}", fix=f"use one of {EXPORT_KINDS}")
    config_path = Path(config_path)
    model_section = find_model_section(load_yaml(config_path), str(config_path))
    family = resolve_family(family, model_name=model_section.get("name"), where=str(config_path)).name
    layout = RopeLayout.from_cs_config(model_section)
    checkpoint = CSCheckpoint(checkpoint_path)
    classified = _Classified(checkpoint, family)
    _check_aliases(checkpoint, classified.aliases)
    config = _sparse_lora_config(model_section, classified, str(config_path))
    masks, embedded = _resolve_masks(checkpoint, classified, config, masks_path, config_path, family, layout)
    base = Path(base_model) if base_model else None
    if base is not None and not (base / "config.json").is_file():
        raise UserError(
            "--base-model has no config.json", where=str(base), fix="pass the (pruned) HF base directory"
        )
    ctx = _Export(
        checkpoint=checkpoint,
        family=family,
        layout=layout,
        classified=classified,
        config=config,
        masks=masks,
        embedded=embedded,
        model_section=model_section,
        base_model=base,
        dtype=dtype,
        max_shard_bytes=max_shard_bytes,
        progress=progress,
    )
    weights_hf = {n for w in classified.weights for n in cs_to_hf_names(w, family, layout.num_experts)}
    stray = [name for name in (masks.keys() if masks else []) if name not in weights_hf]
    if stray:
        raise UserError(
            f"masks name no weight of the checkpoint: {stray[:10]}", where=str(masks_path or checkpoint.path)
        )
    if config is not None and not config.dense_baseline:
        unmasked = [
            m
            for m in classified.lora
            if any(n not in (masks or ()) for n in _hf_weights_of(m, family, layout))
        ]
        if unmasked:
            raise UserError(
                f"{len(unmasked)} LoRA layers have no mask: {unmasked[:5]}",
                where=masks.origin,
                fix="pass the mask file the run was trained with (--masks)",
            )
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        summary = _export_merged(ctx, tmp) if kind == "merged" else _export_adapter(ctx, tmp)
        if masks:  # in HF naming, with the mask file's provenance (or the checkpoint's path)
            write_view(masks, tmp / HF_MASKS_NAME)
        if kind == "merged" and base is not None:
            for name in BASE_FILES:
                if (base / name).is_file():
                    shutil.copy(base / name, tmp / name)
    return {"out": str(out_dir), "kind": kind, "family": family, "masks": len(masks or ()), **summary}
