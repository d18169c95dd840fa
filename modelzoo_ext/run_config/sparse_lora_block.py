"""The `sparse_lora:` block of a run YAML: one pydantic model read by both backends.

    sparse_lora:
      mode: sparse_to_sparse          # or sparse_to_dense
      r: 16
      alpha: 32.0
      dropout: 0.0
      target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]
      mask_path: masks/llama-8b-wanda-0.5.safetensors
      init_seed: 0
      skip_provenance_check: false    # true: accept masks that were not computed for this checkpoint

Unknown keys are rejected (`extra="forbid"`), so a typo fails at load time instead of being
ignored.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from modelzoo_ext.run_config.modes import export_kind

DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class SparseLoRAConfig(BaseModel):
    """LoRA on a pruned model: which layers, what rank, and whether the update keeps the sparsity.

    - `sparse_to_dense`: y = x (W*M)^T + s * dropout(x) A^T B^T; the merged weight is dense.
    - `sparse_to_sparse`: y = x ((W + s*B@A) * M)^T; the merged weight keeps the mask exactly.
    `s = alpha / r` (`scaling`). `dense_baseline=True` is plain LoRA on an unpruned model (the
    baseline of the comparisons): no masks, and `mask_path` must be left empty.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["sparse_to_dense", "sparse_to_sparse"]
    r: int = Field(16, gt=0, description="LoRA rank")
    alpha: float = Field(32.0, description="LoRA alpha; the update is scaled by alpha / r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the LoRA input")
    target_modules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES),
        min_length=1,
        description="module names (exact, or a '.'-suffix of the qualified name) or 're:<regex>'",
    )
    mask_path: str | None = Field(None, description="the mask file (sparse-lora-masks safetensors)")
    dense_baseline: bool = Field(False, description="plain LoRA without masks (the dense baseline)")
    preserve_sparsity_on_merge: bool = Field(
        False,
        description="sparse_to_dense only: re-apply the mask after merging (discards part of the update)",
    )
    init_seed: int = Field(
        0, description="seed of the LoRA A initialisation (per layer, backend-independent)"
    )
    skip_provenance_check: bool = Field(
        False,
        description="use the mask file even when the base checkpoint is neither the masks' source nor "
        "their pruned output (logged; see docs/masks.md, 'Provenance')",
    )

    @model_validator(mode="after")
    def _masks_unless_dense_baseline(self) -> SparseLoRAConfig:
        if self.dense_baseline and self.mask_path is not None:
            raise ValueError(
                "dense_baseline: true trains plain LoRA without masks, but mask_path is set; "
                "remove mask_path or set dense_baseline: false"
            )
        if not self.dense_baseline and self.mask_path is None:
            raise ValueError(
                "mask_path is required (the mask file from `sparse-lora masks compute`); "
                "set dense_baseline: true only for the unpruned plain-LoRA baseline"
            )
        return self

    @property
    def scaling(self) -> float:
        """The LoRA scale s = alpha / r."""
        return self.alpha / self.r

    @property
    def export_kind(self) -> str:
        """ "adapter" or "merged": what a finished run of this block exports (`modes.export_kind`)."""
        return export_kind(self.mode, preserve_sparsity_on_merge=self.preserve_sparsity_on_merge)
