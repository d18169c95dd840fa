"""`SparseLoRALinear`: a frozen (pruned) linear layer plus a trainable low-rank update.

State, named like PEFT so adapters export without renaming:
- `weight` [out, in], `bias` [out] | None: frozen Parameters (taken over from the nn.Linear).
- `lora_A.weight` [r, in], `lora_B.weight` [out, r]: the trainable factors (`nn.Linear`s
  without bias, as in PEFT and ModelZoo's `lora_A`/`lora_B`); float32 when the base is
  bf16/fp16 (as PEFT's default), else the base's dtype.
- `mask` [out, in] bool: a **non-persistent** buffer (not in `state_dict`). The mask file is
  the single record of the masks; checkpoints hold weights and LoRA factors only, so a saved
  state dict loads into the unpruned model class and into ModelZoo without extra keys. The
  mask is fixed after construction (the sampled-product pattern is cached from it).
  Dense baseline: `mask is None`. With `pack_mask=True` the layer holds the mask as bits
  (`mask_bits`, uint8, an eighth of the memory; the kernels unpack it per call) and `mask` reads
  it back unpacked (a new tensor on each read).

Lifecycle: `from_linear(linear, mask, config)` -> train (only lora_A/lora_B get gradients) ->
`merge()` folds the update into `weight` (s2s: (W + s*B@A) * M, zero off the mask bit for bit;
s2d: W*M + s*B@A, or re-masked with `preserve_sparsity_on_merge`) -> `unmerge()` where exact
(s2d without re-masking; s2s refuses) -> `merge_sparse_lora_` in `apply.py` swaps the layer for
a plain `nn.Linear`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from modelzoo_ext.errors import UserError
from modelzoo_ext.run_config.sparse_lora_block import SparseLoRAConfig
from modelzoo_ext.sparse_lora.kernels import (
    SPARSE_TO_DENSE,
    SPARSE_TO_SPARSE,
    PackedMask,
    SampledPattern,
    lora_delta,
    merged_weight,
    sparse_lora_linear,
    use_sampled_product,
)

SAMPLED_PRODUCT_CHOICES = ("auto", "never", "always")


def kaiming_a(shape: tuple[int, int], generator: torch.Generator | None) -> torch.Tensor:
    """A LoRA A [r, in] ~ Kaiming-uniform(a=sqrt(5)) (PEFT's init), drawn on the CPU in float32 from
    `generator`: the same A on every device and backend for the same generator state."""
    a = torch.empty(shape, dtype=torch.float32)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
    return a


class SparseLoRALinear(nn.Module):
    """y = sparse_lora_linear(x, weight, mask, lora_A.weight, lora_B.weight, scaling, mode, bias).

    Args:
        weight, bias: the frozen base parameters (shared with the nn.Linear they came from).
        mask: bool [out, in], True = kept, or None for the dense-LoRA baseline.
        mode, r, alpha, dropout: as in `SparseLoRAConfig`.
        mask_base_in_forward: multiply W by the mask in forward (default True). Set False when an
            external mechanism (cerebras.pytorch.sparse's `weight_mask` hook) already zeroes W
            off the mask before forward; the math is identical then. "auto": False when W is
            already exactly zero off the mask here (a pruned checkpoint; W is frozen, and W*M
            then equals W bit for bit), True otherwise; only for callers that never load other
            base weights into the layer afterwards (gpu_reference).
        preserve_sparsity_on_merge: s2d only, re-apply the mask after merging.
        sampled_product: "auto" (use the sampled s2s weight-gradient product where it pays:
            eager CPU/CUDA, see `kernels.use_sampled_product`), "never" (dense path only; use
            on the Cerebras backend) or "always" (eager CPU/CUDA, for tests and benchmarks).
        pack_mask: hold the mask as bits (`kernels.PackedMask`): the same outputs and gradients
            bit for bit, an eighth of the mask memory, an unpack per forward and backward
            (eager only; the reference trainer packs, the Cerebras backend does not).
    """

    weight_name = "weight"  # the base parameter's name (fused experts: `expert_weights`)

    def __init__(
        self,
        weight: nn.Parameter,
        bias: nn.Parameter | None,
        mask: torch.Tensor | None,
        *,
        mode: str,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        mask_base_in_forward: bool | str = True,
        preserve_sparsity_on_merge: bool = False,
        sampled_product: str = "auto",
        pack_mask: bool = False,
    ) -> None:
        super().__init__()
        out_f, in_f = weight.shape
        if mode not in (SPARSE_TO_DENSE, SPARSE_TO_SPARSE):
            raise UserError(
                f"unknown sparse-LoRA mode {mode!r}", fix="use sparse_to_dense or sparse_to_sparse"
            )
        if sampled_product not in SAMPLED_PRODUCT_CHOICES:
            raise UserError(
                f"sampled_product={sampled_product!r}", fix=f"use one of {SAMPLED_PRODUCT_CHOICES}"
            )
        if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (out_f, in_f)):
            raise UserError(
                f"mask {mask.dtype} {tuple(mask.shape)} does not fit weight {(out_f, in_f)}",
                fix="pass a torch.bool mask of the weight's shape",
            )
        self.in_features, self.out_features = in_f, out_f
        # `density`: fraction of kept weights (1.0 without a mask), fixed like the mask.
        self.mode, self.r, self.alpha = mode, r, float(alpha)
        self.scaling = self.alpha / r
        self.dropout_p = float(dropout)
        if mask_base_in_forward == "auto":
            mask_base_in_forward = mask is not None and bool(weight.detach()[~mask.to(weight.device)].any())
        self.mask_base_in_forward = bool(mask_base_in_forward)
        self.preserve_sparsity_on_merge = preserve_sparsity_on_merge
        self.sampled_product = sampled_product
        self.weight = weight
        self.weight.requires_grad_(False)
        self.bias = bias
        if bias is not None:
            bias.requires_grad_(False)
        mask = mask.to(weight.device) if mask is not None else None
        self.pack_mask = bool(pack_mask) and mask is not None
        self.register_buffer("mask", None if self.pack_mask else mask, persistent=False)
        self.register_buffer(
            "mask_bits", PackedMask.pack(mask).bits if self.pack_mask else None, persistent=False
        )
        self.density = 1.0 if mask is None else float(mask.sum()) / mask.numel()
        # Like PEFT (autocast_adapter_dtype): float32 factors on a bf16/fp16 base, so small
        # updates are not rounded away; the kernel casts them for the matmuls.
        lora_dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        factory = {"device": weight.device, "dtype": lora_dtype}
        self.lora_A = nn.Linear(in_f, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, out_f, bias=False, **factory)
        self.merged = False
        self._weight_before_merge: torch.Tensor | None = None
        self._pattern: tuple[torch.device, SampledPattern] | None = None
        self.reset_lora_parameters()

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, mask: torch.Tensor | None, config: SparseLoRAConfig, **kwargs
    ) -> SparseLoRALinear:
        """Wrap `linear` (its weight and bias are shared, not copied); kwargs as in `__init__`."""
        return cls(
            linear.weight,
            linear.bias,
            mask,
            mode=config.mode,
            r=config.r,
            alpha=config.alpha,
            dropout=config.dropout,
            preserve_sparsity_on_merge=config.preserve_sparsity_on_merge,
            **kwargs,
        )

    def set_mask(self, mask: torch.Tensor | None) -> None:
        """Replace the mask (bool [out, in], kept on its own device) and what is derived from it:
        `density` and the cached sampled-product pattern. `mask_base_in_forward` is unchanged.

        For exports that build a layer around a weight on the `meta` device and attach the real
        mask afterwards (`mask_converters.cs_to_hf`)."""
        if mask is not None and (
            mask.dtype != torch.bool or tuple(mask.shape) != (self.out_features, self.in_features)
        ):
            raise UserError(
                f"mask {mask.dtype} {tuple(mask.shape)} does not fit weight {(self.out_features, self.in_features)}",
                fix="pass a torch.bool mask of the weight's shape",
            )
        self.pack_mask = self.pack_mask and mask is not None
        self.mask = None if self.pack_mask else mask
        self.mask_bits = PackedMask.pack(mask).bits if self.pack_mask else None
        self.density = 1.0 if mask is None else float(mask.sum()) / mask.numel()
        self._pattern = None

    def __getattr__(self, name: str):
        # `mask` of a packed layer: the bool mask unpacked from `mask_bits` (its `mask` buffer is None).
        if name == "mask" and self._buffers.get("mask_bits") is not None:
            return self._kernel_mask().unpack()
        return super().__getattr__(name)

    def _kernel_mask(self) -> torch.Tensor | PackedMask | None:
        """The mask as the kernels take it: packed when held packed (unpacked where used)."""
        bits = self._buffers.get("mask_bits")
        if bits is not None:
            return PackedMask(bits, (self.out_features, self.in_features))
        return self._buffers.get("mask")

    def _mask_device(self) -> torch.device:
        bits = self._buffers.get("mask_bits")
        return (bits if bits is not None else self._buffers["mask"]).device

    @torch.no_grad()
    def reset_lora_parameters(self, generator: torch.Generator | None = None) -> None:
        """A ~ Kaiming-uniform(a=sqrt(5)) drawn on the CPU from `generator`; B = 0 (as PEFT).

        Drawing on the CPU in float32 makes A the same on every device and backend for the
        same generator state.
        """
        self.lora_A.weight.copy_(kaiming_a(tuple(self.lora_A.weight.shape), generator))
        self.lora_B.weight.zero_()

    def _sampled_pattern(self, x: torch.Tensor) -> SampledPattern | None:
        wanted = (
            self.mode == SPARSE_TO_SPARSE
            and self._kernel_mask() is not None
            and self.training
            and self.sampled_product != "never"
            and x.device.type in ("cpu", "cuda")
            and torch.is_grad_enabled()
        )
        if not wanted or not (
            self.sampled_product == "always" or use_sampled_product(x.device, self.density)
        ):
            return None
        # Built only when used: the CSR pattern costs ~12 bytes per kept weight.
        if self._pattern is None or self._pattern[0] != self._mask_device():
            self._pattern = (self._mask_device(), SampledPattern.from_mask(self.mask))
        return self._pattern[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]. After `merge()`, a plain linear map with the merged weight."""
        if self.merged:
            return nn.functional.linear(x, self.weight, self.bias)
        return sparse_lora_linear(
            x,
            self.weight,
            self._kernel_mask(),
            self.lora_A.weight,
            self.lora_B.weight,
            self.scaling,
            self.mode,
            self.bias,
            dropout_p=self.dropout_p,
            training=self.training,
            mask_base=self.mask_base_in_forward,
            pattern=self._sampled_pattern(x),
        )

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The weight a plain nn.Linear needs to compute this layer in eval mode. [out, in]."""
        return merged_weight(
            self.weight,
            self.mask,
            self.lora_A.weight,
            self.lora_B.weight,
            self.scaling,
            self.mode,
            preserve_sparsity=self.preserve_sparsity_on_merge,
            mask_base=self.mask_base_in_forward,
        )

    @torch.no_grad()
    def update_norms(self) -> tuple[float, float]:
        """(||s*B@A||, ||(s*B@A) * ~M||): the update's norm and the part off the mask."""
        delta = lora_delta(self.lora_A.weight, self.lora_B.weight, self.scaling)
        off_mask = 0.0 if self.mask is None else float(delta[~self.mask].norm())
        return float(delta.norm()), off_mask

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into `weight` in place; forward is then a plain linear map."""
        if self.merged:
            raise UserError("this SparseLoRALinear is already merged", fix="call unmerge() first")
        merged = self.merged_weight()
        exact_unmerge = self.mode == SPARSE_TO_DENSE and not self.preserve_sparsity_on_merge
        # Keep what unmerge needs to restore W exactly: the original weight, not a subtraction.
        self._weight_before_merge = self.weight.detach().clone() if exact_unmerge else None
        self.weight.copy_(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the original weight, bit for bit; only s2d without re-masking can."""
        if not self.merged:
            raise UserError("this SparseLoRALinear is not merged", fix="call merge() first")
        if self._weight_before_merge is None:
            raise UserError(
                f"cannot unmerge a {self.mode} layer merged with the mask re-applied: the update off "
                "the mask and the base weights under it were folded irreversibly",
                fix="keep an unmerged copy (or the adapter) if you need to continue training",
            )
        self.weight.copy_(self._weight_before_merge)
        self._weight_before_merge = None
        self.merged = False

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"alpha={self.alpha:g}, mode={self.mode}, density={self.density:.4f}, "
            f"dropout={self.dropout_p:g}, merged={self.merged}"
        )
