"""Sparse LoRA on fused top-k experts: ModelZoo's `TopKExpertsSparseLinear` layout, pure torch.

ModelZoo's Mixtral (`moe_implementation: optimized`) keeps the experts of one projection in one
parameter `expert_weights` [out, E, in] and computes each routed copy of a token with
`sparse_matmul(x [..., K, in], topk_indices [..., K], W [out, E, in]) -> [..., K, out]`
(row k of a token goes through expert `topk_indices[k]`). `SparseLoRAExperts` replaces such a
module: same parameter (the same object, the same name), same forward signature, plus

    lora_A.weight [r, E, in]      lora_A.weight[:, e] = expert e's A  (PEFT's per-expert lora_A [r, in])
    lora_B.weight [out, E, r]     lora_B.weight[:, e] = expert e's B  (PEFT's per-expert lora_B [out, r])
    mask          [out, E, in]    non-persistent bool buffer; [:, e] = expert e's mask

i.e. the LoRA factors are stacked on dim 1 exactly like the weight, so one converter rule
(stack / unstack on dim 1, `modelzoo_ext.name_map`) carries weights, masks and both factors, and
the factors are valid weights of `sparse_matmul` themselves. Per expert e, for the rows routed
to e (s = alpha / r), the design's math (`kernels.py`):

    s2d: y = x (W_e*M_e)^T + s * dropout(x) A_e^T B_e^T
         = sparse_matmul(x, W*M) + s * sparse_matmul(sparse_matmul(dropout(x), A), B)
    s2s: y = x ((W_e + s*B_e@A_e) * M_e)^T
         = sparse_matmul(x, where(M, W + s*einsum('oer,rei->oei', B, A), 0))

Only dense ops (einsum, where, mul) and the injected `sparse_matmul`: ModelZoo passes
cerebras-pytorch's (the CSX kernel on the wafer, a dense scatter/einsum/gather off it);
`reference_sparse_matmul` is that CPU path written out, for use without cerebras. Autograd
differentiates the expressions above (the s2s W_eff is rebuilt by autograd's saved tensors, not
a custom kernel: the traced CS graph must stay plain ops).

Lifecycle: `SparseLoRAExperts.from_fused(module, mask, config)` -> train -> exports go through
the converters, which unstack to per-expert `SparseLoRALinear`s (one merge definition).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from modelzoo_ext.errors import UserError
from modelzoo_ext.run_config.sparse_lora_block import SparseLoRAConfig
from modelzoo_ext.sparse_lora.kernels import SPARSE_TO_DENSE, SPARSE_TO_SPARSE, masked_weight
from modelzoo_ext.sparse_lora.layer import kaiming_a

SparseMatmul = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def reference_sparse_matmul(
    input_values: torch.Tensor, input_indices: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """Top-k expert matmul: [..., K, in] x indices [..., K] x weight [out, E, in] -> [..., K, out].

    Row k of each token is multiplied by expert `input_indices[..., k]`'s [out, in] slice. Written
    as cerebras-pytorch 2.10's off-wafer `sparse_matmul` (scatter into all E experts, one einsum,
    gather), so the two agree bit for bit on the CPU.
    """
    sparse_dim = -2
    dense_shape = (*input_values.shape[:sparse_dim], weight.shape[1], input_values.shape[-1])
    indices = input_indices.to(torch.int64)[..., None]
    dense_input = torch.zeros(dense_shape, dtype=input_values.dtype, device=input_values.device)
    dense_input.scatter_(sparse_dim, indices.broadcast_to(input_values.shape), input_values)
    output = torch.einsum("...MBN, KBN -> ...MBK", dense_input, weight)
    output_shape = (*input_values.shape[:-1], weight.shape[0])
    return torch.gather(output, sparse_dim, indices.broadcast_to(output_shape))


def experts_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """s * B_e @ A_e for every expert: [out, E, r] x [r, E, in] -> [out, E, in]."""
    return torch.einsum("oer,rei->oei", lora_b, lora_a) * scaling


class _Factor(nn.Module):
    """Holds one stacked LoRA factor as `.weight`, so its name ends in `lora_A.weight` like PEFT's."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))


class SparseLoRAExperts(nn.Module):
    """Fused experts [out, E, in] with per-expert sparse LoRA (see the module docstring).

    Args:
        expert_weights: the frozen fused weight [out, E, in] (shared, not copied).
        mask: bool [out, E, in] or None (dense-LoRA baseline).
        mode, r, alpha, dropout: as in `SparseLoRAConfig`.
        mask_base_in_forward: multiply W by M here (default); False where cerebras-pytorch's
            `expert_weights_mask` hook zeroes W before forward (same result).
        sparse_matmul: the top-k expert matmul (default `reference_sparse_matmul`).
    """

    weight_name = "expert_weights"

    def __init__(
        self,
        expert_weights: nn.Parameter,
        mask: torch.Tensor | None,
        *,
        mode: str,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        mask_base_in_forward: bool = True,
        sparse_matmul: SparseMatmul | None = None,
    ) -> None:
        super().__init__()
        if mode not in (SPARSE_TO_DENSE, SPARSE_TO_SPARSE):
            raise UserError(
                f"unknown sparse-LoRA mode {mode!r}", fix="use sparse_to_dense or sparse_to_sparse"
            )
        if expert_weights.dim() != 3:
            raise UserError(f"fused expert weights must be [out, E, in], got {tuple(expert_weights.shape)}")
        out_f, experts, in_f = expert_weights.shape
        if mask is not None and (mask.dtype != torch.bool or mask.shape != expert_weights.shape):
            raise UserError(
                f"mask {mask.dtype} {tuple(mask.shape)} does not fit fused weight {tuple(expert_weights.shape)}",
                fix="pass the stacked bool mask [out, E, in] (MaskView in CS naming)",
            )
        self.out_features, self.num_experts, self.in_features = out_f, experts, in_f
        self.mode, self.r, self.alpha, self.scaling = mode, r, float(alpha), float(alpha) / r
        self.dropout_p = float(dropout)
        self.mask_base_in_forward = bool(mask_base_in_forward)
        self.sparse_matmul = sparse_matmul or reference_sparse_matmul
        self.expert_weights = expert_weights
        self.expert_weights.requires_grad_(False)
        self.register_buffer(
            "mask", None if mask is None else mask.to(expert_weights.device), persistent=False
        )
        self.density = 1.0 if mask is None else float(mask.sum()) / mask.numel()
        # float32 factors on a bf16/fp16 base, as `SparseLoRALinear` (PEFT's autocast_adapter_dtype).
        dtype = (
            torch.float32 if expert_weights.dtype in (torch.float16, torch.bfloat16) else expert_weights.dtype
        )
        self.lora_A = _Factor((r, experts, in_f), dtype, expert_weights.device)
        self.lora_B = _Factor((out_f, experts, r), dtype, expert_weights.device)
        self.lora_dropout = nn.Dropout(self.dropout_p) if self.dropout_p > 0 else nn.Identity()

    @classmethod
    def from_fused(
        cls, module: nn.Module, mask: torch.Tensor | None, config: SparseLoRAConfig, **kwargs
    ) -> SparseLoRAExperts:
        """Wrap a module holding `expert_weights` [out, E, in] and no bias (ModelZoo's
        `TopKExpertsSparseLinear`); kwargs as in `__init__`."""
        if getattr(module, "expert_biases", None) is not None:
            raise UserError(
                f"{type(module).__name__} has expert biases, which sparse LoRA does not carry",
                fix="Mixtral's experts have none; check the model config (use_ffn_bias: false)",
            )
        return cls(
            module.expert_weights,
            mask,
            mode=config.mode,
            r=config.r,
            alpha=config.alpha,
            dropout=config.dropout,
            **kwargs,
        )

    @property
    def weight(self) -> nn.Parameter:
        """The fused base weight (the name `SparseLoRALinear` gives its base)."""
        return self.expert_weights

    @torch.no_grad()
    def reset_lora_parameters(self, generators: list[torch.Generator] | None = None) -> None:
        """Expert e's A [r, in] ~ Kaiming-uniform(a=sqrt(5)) drawn on the CPU from `generators[e]`
        (as `SparseLoRALinear` draws its A, so expert e starts where the per-expert HF layer does);
        B = 0."""
        gens = generators or [None] * self.num_experts
        if len(gens) != self.num_experts:
            raise UserError(f"{len(gens)} generators for {self.num_experts} experts")
        a = torch.stack([kaiming_a((self.r, self.in_features), g) for g in gens], dim=1)
        self.lora_A.weight.copy_(a)
        self.lora_B.weight.zero_()

    def _base(self) -> torch.Tensor:
        if self.mask is None or not self.mask_base_in_forward:
            return self.expert_weights
        return masked_weight(self.expert_weights, self.mask)

    def forward(self, input: torch.Tensor, topk_indices: torch.Tensor) -> torch.Tensor:
        """input [..., K, in], topk_indices [..., K] -> [..., K, out] (each row through its expert)."""
        idx = topk_indices.to(torch.int64)
        a, b = self.lora_A.weight.to(input.dtype), self.lora_B.weight.to(input.dtype)
        if self.mode == SPARSE_TO_SPARSE and self.mask is not None:
            w_eff = self.expert_weights.to(input.dtype) + experts_delta(a, b, self.scaling)
            zero = torch.zeros((), dtype=w_eff.dtype, device=w_eff.device)
            y = self.sparse_matmul(input, idx, torch.where(self.mask, w_eff, zero))
            if self.dropout_p > 0 and self.training:  # the update sees dropped-out inputs (kernels.py)
                update = torch.where(self.mask, experts_delta(a, b, self.scaling), zero)
                y = y + self.sparse_matmul(self.lora_dropout(input) - input, idx, update)
            return y
        base = self.sparse_matmul(input, idx, self._base().to(input.dtype))
        low = self.sparse_matmul(self.sparse_matmul(self.lora_dropout(input), idx, a), idx, b)
        return base + low * self.scaling

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """[out, E, in]: s2s (W + s*B@A) * M per expert; s2d W*M + s*B@A (the fused form of
        `kernels.merged_weight`)."""
        delta = experts_delta(self.lora_A.weight.float(), self.lora_B.weight.float(), self.scaling)
        w = self.expert_weights.float()
        if self.mask is None:
            return (w + delta).to(self.expert_weights.dtype)
        if self.mode == SPARSE_TO_SPARSE:
            return torch.where(self.mask, w + delta, torch.zeros(())).to(self.expert_weights.dtype)
        return (masked_weight(w, self.mask) + delta).to(self.expert_weights.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, experts={self.num_experts}, "
            f"r={self.r}, alpha={self.alpha:g}, mode={self.mode}, density={self.density:.4f}"
        )
