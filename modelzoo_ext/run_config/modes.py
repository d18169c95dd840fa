"""The fine-tuning modes, their short names, and what a finished run exports.

    sparse_to_dense  (s2d)   y = x (W*M)^T + s * dropout(x) A^T B^T   -> a PEFT adapter for the pruned base
    sparse_to_sparse (s2s)   y = x ((W + s*B@A) * M)^T                -> the merged model, zero off the mask
    dense LoRA       (lora)  plain LoRA on the unpruned model (`dense_baseline: true`): the baseline

The short names are what sweeps, registries and reports print; the long names are what a run
YAML's `sparse_lora.mode` holds. `export_kind` is the one rule deciding whether a trained run
becomes an adapter or a merged model: the reference trainer, `convert cs-to-hf` and the sweep
all ask it.
"""

from __future__ import annotations

from typing import Literal

SPARSE_TO_DENSE = "sparse_to_dense"
SPARSE_TO_SPARSE = "sparse_to_sparse"
MODES = (SPARSE_TO_DENSE, SPARSE_TO_SPARSE)

DENSE_LORA = "lora"  # the short name of plain LoRA on the dense model (not a YAML mode)
SHORT_NAMES = {SPARSE_TO_SPARSE: "s2s", SPARSE_TO_DENSE: "s2d"}
FINE_TUNE_SHORT_NAMES = ("s2s", "s2d", DENSE_LORA)

ExportKind = Literal["adapter", "merged"]
EXPORT_KINDS: tuple[ExportKind, ...] = ("adapter", "merged")


def short_name(mode: str, *, dense_baseline: bool = False) -> str:
    """`sparse_to_sparse` -> `s2s`, `sparse_to_dense` -> `s2d`; `lora` for the dense baseline."""
    return DENSE_LORA if dense_baseline else SHORT_NAMES[mode]


def yaml_mode(short: str) -> tuple[str, bool]:
    """`s2s` -> (`sparse_to_sparse`, False); `lora` -> (`sparse_to_dense`, True: dense_baseline)."""
    if short == DENSE_LORA:
        return SPARSE_TO_DENSE, True
    long = {v: k for k, v in SHORT_NAMES.items()}.get(short)
    if long is None:
        raise ValueError(f"unknown mode {short!r}; use one of {FINE_TUNE_SHORT_NAMES}")
    return long, False


def export_kind(mode: str, *, preserve_sparsity_on_merge: bool = False) -> ExportKind:
    """What a finished run exports: a PEFT adapter, or the merged model.

    s2s must merge: its update (s*B@A) * M is masked, which a PEFT adapter cannot express.
    s2d (and dense LoRA) export an adapter, unless `preserve_sparsity_on_merge` asks for a merged
    model re-masked after merging (part of the update is then discarded).
    """
    if mode == SPARSE_TO_SPARSE or preserve_sparsity_on_merge:
        return "merged"
    return "adapter"
