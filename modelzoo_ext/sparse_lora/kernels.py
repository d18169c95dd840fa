"""The sparse-LoRA linear map: the one definition both backends (CS-3 and GPU) compute.

W: frozen weight [out, in]; M: bool mask [out, in] (True = kept); A [r, in]; B [out, r];
s = alpha / r; x [..., in].

- sparse_to_dense (s2d):  y = x (W*M)^T + s * dropout(x) A^T B^T
- sparse_to_sparse (s2s): y = x ((W + s*B@A) * M)^T
  (with dropout: y = x (W*M)^T + s * dropout(x) ((B@A) * M)^T, which is the same map in eval)

Memory: neither mode keeps a dense [out, in] effective weight alive between forward and
backward; the custom autograd functions save only tensors that exist anyway (x, W, M, A, B)
and recompute W*M or W_eff in backward. A mask may also come as a `PackedMask` (1 bit per
weight instead of a bool's byte): the functions unpack it where they use it, in forward and again
in backward, so no unpacked mask lives from one to the other.

s2s gradients: with G = g^T x (the full fine-tuning weight gradient, [out, in]),
dB = s (G*M) A^T and dA = s B^T (G*M). Only G on the mask support is needed, so where it pays
(`SampledPattern`, built by the layer when `use_sampled_product` says so) G is computed as a
sampled dense-dense product (`torch.sparse.sampled_addmm`); the dense path is the reference,
and both agree up to rounding.

Cerebras tracing: with no `SampledPattern` every op here is a plain dense tensor op (linear,
matmul, mul, where, casts) and the Python control flow depends only on arguments, never on
tensor values.

Low precision: B@A, W + s*B@A and the LoRA gradients are computed in float32 and cast to the
working dtype once; matmuls of bf16/fp16 operands accumulate in float32 inside the BLAS.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from modelzoo_ext.errors import UserError
from modelzoo_ext.run_config.modes import MODES, SPARSE_TO_DENSE, SPARSE_TO_SPARSE

__all__ = [
    "MODES",
    "SPARSE_TO_DENSE",
    "SPARSE_TO_SPARSE",
    "PackedMask",
    "sparse_lora_linear",
    "merged_weight",
]

# Highest mask density at which the sampled product beats the dense G = g^T x, per device type.
# CPU: measured with benchmarks/sparse_lora.py --kernel-only (torch 2.4 sampled_addmm on CSR);
# CUDA: cuSPARSE SDDMM, not yet measured here (no GPU on the development machine).
SAMPLED_MAX_DENSITY = {"cpu": 0.12, "cuda": 0.35}


@dataclass(frozen=True)
class PackedMask:
    """A bool mask [out, in] held as bits: uint8 [ceil(out * in / 8)], row-major, bit i of byte j
    for weight 8 j + i. An eighth of a bool mask's memory; `unpack()` gives the bool mask back."""

    bits: torch.Tensor
    shape: tuple[int, int]

    @staticmethod
    def pack(mask: torch.Tensor) -> PackedMask:
        """From a bool mask [out, in] (on its device)."""
        flat = mask.reshape(-1).to(torch.uint8)
        pad = (-flat.numel()) % 8
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])
        shifts = torch.arange(8, dtype=torch.uint8, device=flat.device)
        bits = (flat.view(-1, 8) << shifts).sum(dim=1, dtype=torch.uint8)  # distinct bits: the sum is an OR
        return PackedMask(bits, tuple(mask.shape))

    def unpack(self) -> torch.Tensor:
        """The bool mask [out, in] (a new tensor on the bits' device)."""
        shifts = torch.arange(8, dtype=torch.uint8, device=self.bits.device)
        flat = ((self.bits.unsqueeze(1) >> shifts) & 1).view(-1).bool()
        return flat[: self.shape[0] * self.shape[1]].view(self.shape)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the mask it stands for (for shape/dtype checks)."""
        return torch.bool


def _as_bool(mask: torch.Tensor | PackedMask | None) -> torch.Tensor | None:
    return mask.unpack() if isinstance(mask, PackedMask) else mask


def _save_mask(ctx, mask: torch.Tensor | PackedMask | None) -> torch.Tensor | None:
    """What a function saves of its mask: a bool mask itself (it exists anyway), or nothing for a
    packed one, which `ctx.packed` keeps to unpack again in backward."""
    ctx.packed = mask if isinstance(mask, PackedMask) else None
    return None if ctx.packed is not None else mask


def _saved_mask(ctx, saved: torch.Tensor | None) -> torch.Tensor | None:
    return ctx.packed.unpack() if ctx.packed is not None else saved


def _float32_if_low_precision(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def lora_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """s * B @ A, computed in float32 for low-precision inputs. [out, r] x [r, in] -> [out, in]."""
    return (_float32_if_low_precision(lora_b) @ _float32_if_low_precision(lora_a)) * scaling


def masked_weight(weight: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """W * M as `where(M, W, 0)` (exact zeros off the mask, whatever W holds there). [out, in]."""
    if mask is None:
        return weight
    return torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))


def effective_weight(
    weight: torch.Tensor | None,
    mask: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    *,
    mask_base: bool = True,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The s2s weight (W + s*B@A) * M in `dtype` (default W's), [out, in].

    `weight=None` gives the update alone, (s*B@A) * M. `mask_base=False` masks only the update,
    W + (s*B@A) * M: the same numbers, bit for bit, when W is already zero off the mask (an
    external mechanism such as cerebras.pytorch.sparse multiplies it before forward).
    This is also the s2s merged weight, so a merged model reproduces the unmerged one exactly.
    """
    delta = lora_delta(lora_a, lora_b, scaling)
    out_dtype = dtype or (weight.dtype if weight is not None else lora_a.dtype)
    zero = torch.zeros((), dtype=delta.dtype, device=delta.device)
    if weight is None:
        total = delta if mask is None else torch.where(mask, delta, zero)
    elif mask is None:
        total = _float32_if_low_precision(weight) + delta
    elif mask_base:
        total = torch.where(mask, _float32_if_low_precision(weight) + delta, zero)
    else:
        total = _float32_if_low_precision(weight) + torch.where(mask, delta, zero)
    return total.to(out_dtype)


def merged_weight(
    weight: torch.Tensor,
    mask: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    mode: str,
    *,
    preserve_sparsity: bool = False,
    mask_base: bool = True,
) -> torch.Tensor:
    """The weight [out, in] (in W's dtype) of the plain linear layer equal to the LoRA layer in eval.

    s2s, or s2d with `preserve_sparsity`: (W + s*B@A) * M, exactly zero off the mask.
    s2d: W*M + s*B@A (W itself when `mask_base=False`, i.e. W is already masked).
    Works on plain tensors, so converters can merge a checkpoint without building modules.
    """
    if mode == SPARSE_TO_SPARSE or (preserve_sparsity and mask is not None):
        return effective_weight(weight, mask, lora_a, lora_b, scaling)
    base = masked_weight(weight, mask) if mask_base else weight
    return (_float32_if_low_precision(base) + lora_delta(lora_a, lora_b, scaling)).to(weight.dtype)


@contextlib.contextmanager
def _quiet_sparse_beta() -> Iterator[None]:
    # torch warns on every process's first CSR tensor that CSR support is "beta"; we know.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        yield


@dataclass(frozen=True)
class SampledPattern:
    """The mask's support in CSR form, and the permutation to its transpose (built once per layer).

    `crow`, `col`: CSR of M [out, in]; `crow_t`, `col_t`, `perm`: CSR of M^T, whose values are
    the values of M's CSR taken at `perm`. `density`: kept fraction.
    """

    crow: torch.Tensor
    col: torch.Tensor
    crow_t: torch.Tensor
    col_t: torch.Tensor
    perm: torch.Tensor
    shape: tuple[int, int]
    density: float

    @staticmethod
    def from_mask(mask: torch.Tensor) -> SampledPattern:
        """Build from a bool mask [out, in] (on the device the kernel will run on)."""
        out_f, in_f = mask.shape
        with _quiet_sparse_beta():
            csr = mask.to(torch.float32).to_sparse_csr()
            csr_t = mask.t().to(torch.float32).to_sparse_csr()
        # Number the kept entries in CSR (row-major) order, then read them column-major.
        order = torch.zeros(mask.shape, dtype=torch.int64, device=mask.device)
        order[mask] = torch.arange(int(mask.sum()), device=mask.device)
        perm = order.t()[mask.t()]
        # int32 indices halve the pattern's memory; torch's CSR kernels accept them.
        index = torch.int32 if mask.numel() < 2**31 else torch.int64
        return SampledPattern(
            crow=csr.crow_indices().to(index),
            col=csr.col_indices().to(index),
            crow_t=csr_t.crow_indices().to(index),
            col_t=csr_t.col_indices().to(index),
            perm=perm.to(index),
            shape=(out_f, in_f),
            density=float(mask.sum()) / max(1, mask.numel()),
        )

    def masked_weight_grad(self, grad_out_2d: torch.Tensor, x_2d: torch.Tensor) -> torch.Tensor:
        """Values of G = g^T x on the support, float32, [nnz] (CSR order). g [T, out], x [T, in]."""
        ones = torch.ones(self.col.numel(), dtype=torch.float32, device=self.col.device)
        g_t = grad_out_2d.t().to(torch.float32).contiguous()
        with _quiet_sparse_beta():
            pattern = torch.sparse_csr_tensor(self.crow, self.col, ones, self.shape)
            sampled = torch.sparse.sampled_addmm(pattern, g_t, x_2d.to(torch.float32), beta=0.0)
        return sampled.values()

    def lora_grads(
        self, values: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """dA = s B^T (G*M) [r, in] and dB = s (G*M) A^T [out, r] from G's values on the support."""
        with _quiet_sparse_beta():
            gm = torch.sparse_csr_tensor(self.crow, self.col, values, self.shape)
            gm_t = torch.sparse_csr_tensor(self.crow_t, self.col_t, values[self.perm], self.shape[::-1])
            grad_b = (gm @ lora_a.float().t()) * scaling
            grad_a = (gm_t @ lora_b.float()).t() * scaling
        return grad_a, grad_b


def use_sampled_product(device: torch.device, density: float) -> bool:
    """Whether the sampled product pays for a mask of this density on this device (eager only)."""
    limit = SAMPLED_MAX_DENSITY.get(torch.device(device).type)
    return limit is not None and density <= limit


def _flatten_tokens(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
    # Inside a custom Function's forward, ops on a leaf that requires grad (an input x, a LoRA
    # factor) let autocast cache a *graph-less* low-precision copy of it; any later use of that
    # leaf in the same autocast region then silently gets no gradient. Detached inputs are
    # never cached.
    return None if t is None else t.detach()


class _MaskedLinear(torch.autograd.Function):
    """y = x (W*M)^T for a frozen W; saves W and M (not W*M) and recomputes W*M for dx."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, mask, bias) -> torch.Tensor:
        ctx.save_for_backward(weight, _save_mask(ctx, mask))
        x = _detached(x)
        return F.linear(x, masked_weight(weight, _as_bool(mask)).to(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        weight, saved = ctx.saved_tensors
        grad_x = grad_out @ masked_weight(weight, _saved_mask(ctx, saved)).to(grad_out.dtype)
        return grad_x, None, None, None


class _SparseToSparseLinear(torch.autograd.Function):
    """y = x ((W + s*B@A) * M)^T with gradients for x, A and B only.

    Saves x, W, M, A, B (all alive anyway) and recomputes W_eff in backward. `weight=None`
    computes the masked update alone (used with dropout, where the base takes the undropped x).
    The frozen bias is added inside the same `linear` call as a merged layer's, so merged and
    unmerged s2s outputs agree bit for bit.
    """

    @staticmethod
    def forward(ctx, x, weight, mask, lora_a, lora_b, scaling, bias, mask_base, pattern):
        ctx.scaling = scaling
        ctx.mask_base = mask_base
        ctx.pattern = pattern
        ctx.has_weight = weight is not None
        ctx.save_for_backward(x, weight, _save_mask(ctx, mask), lora_a, lora_b)
        x, lora_a, lora_b = _detached(x), _detached(lora_a), _detached(lora_b)
        w_eff = effective_weight(
            weight, _as_bool(mask), lora_a, lora_b, scaling, mask_base=mask_base, dtype=x.dtype
        )
        return F.linear(x, w_eff, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, saved, lora_a, lora_b = ctx.saved_tensors
        mask = _saved_mask(ctx, saved)
        s = ctx.scaling
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            w_eff = effective_weight(
                weight, mask, lora_a, lora_b, s, mask_base=ctx.mask_base, dtype=grad_out.dtype
            )
            grad_x = grad_out @ w_eff
            del w_eff
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            g2d, x2d = _flatten_tokens(grad_out), _flatten_tokens(x)
            if ctx.pattern is not None:
                values = ctx.pattern.masked_weight_grad(g2d, x2d)
                grad_a, grad_b = ctx.pattern.lora_grads(values, lora_a, lora_b, s)
            else:
                grad_a, grad_b = dense_lora_grads(g2d, x2d, mask, lora_a, lora_b, s)
            grad_a, grad_b = grad_a.to(lora_a.dtype), grad_b.to(lora_b.dtype)
        return grad_x, None, None, grad_a, grad_b, None, None, None, None


def dense_lora_grads(g2d, x2d, mask, lora_a, lora_b, scaling):
    """The reference: G = g^T x [out, in] masked, then dA = s B^T G_M, dB = s G_M A^T (float32)."""
    # Under autocast the saved x keeps its float32 while grad_out arrives in bfloat16/float16.
    common = torch.promote_types(g2d.dtype, x2d.dtype)
    g_full = _float32_if_low_precision(g2d.to(common).t() @ x2d.to(common))
    if mask is not None:
        g_full = torch.where(mask, g_full, torch.zeros((), dtype=g_full.dtype, device=g_full.device))
    grad_a = (_float32_if_low_precision(lora_b).t() @ g_full) * scaling
    grad_b = (g_full @ _float32_if_low_precision(lora_a).t()) * scaling
    return grad_a, grad_b


def _check_args(x, weight, mask, lora_a, lora_b, bias, mode) -> None:
    if mode not in MODES:
        raise UserError(f"unknown sparse-LoRA mode {mode!r}", fix=f"use one of {', '.join(MODES)}")
    # The custom autograd functions return no gradient for W or the bias: refuse rather than
    # silently train nothing there.
    frozen = [n for n, t in (("weight", weight), ("bias", bias)) if t is not None and t.requires_grad]
    if frozen and torch.is_grad_enabled():
        raise UserError(
            f"sparse_lora_linear needs a frozen {' and '.join(frozen)} (requires_grad=True given)",
            fix="call .requires_grad_(False) on the base parameters (apply_sparse_lora_ does this)",
        )
    out_f, in_f = weight.shape
    r = lora_a.shape[0]
    if x.shape[-1] != in_f or tuple(lora_a.shape) != (r, in_f) or tuple(lora_b.shape) != (out_f, r):
        raise UserError(
            f"shape mismatch: x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
            f"lora_a {tuple(lora_a.shape)}, lora_b {tuple(lora_b.shape)}",
            fix="expected x [..., in], weight [out, in], lora_a [r, in], lora_b [out, r]",
        )
    if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (out_f, in_f)):
        raise UserError(
            f"mask must be torch.bool {tuple(weight.shape)}, got {mask.dtype} {tuple(mask.shape)}",
            fix="pass the weight's mask from the mask file (True = kept)",
        )


def sparse_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    mode: str,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = False,
    *,
    mask_base: bool = True,
    pattern: SampledPattern | None = None,
) -> torch.Tensor:
    """Sparse-LoRA linear map: x [..., in] -> y [..., out] (see the module docstring for the math).

    Args:
        x: input [..., in].
        weight: frozen base weight W [out, in] (no gradient is computed for it).
        mask: bool [out, in], True = kept, or the same as a `PackedMask`; `None` means no mask
            (the dense plain-LoRA baseline).
        lora_a: A [r, in]; lora_b: B [out, r]; scaling: s = alpha / r.
        mode: "sparse_to_dense" or "sparse_to_sparse".
        bias: optional [out], added unchanged.
        dropout_p, training: dropout on the LoRA input (active only when `training`).
        mask_base: multiply W by M here (default). False when W is already zero off the mask
            (e.g. cerebras.pytorch.sparse masks it before forward): same result, one op less.
        pattern: the mask's `SampledPattern` to compute s2s LoRA gradients as a sampled product;
            `None` (always on the Cerebras backend) uses the dense reference path.
    """
    _check_args(x, weight, mask, lora_a, lora_b, bias, mode)
    bias = bias.to(x.dtype) if bias is not None else None
    dropout_active = training and dropout_p > 0.0
    if mode == SPARSE_TO_SPARSE and not dropout_active:
        return _SparseToSparseLinear.apply(x, weight, mask, lora_a, lora_b, scaling, bias, mask_base, pattern)
    if mask is not None and mask_base:
        y = _MaskedLinear.apply(x, weight, mask, bias)
    else:
        y = F.linear(x, weight.to(x.dtype), bias)
    x_lora = F.dropout(x, p=dropout_p, training=training) if dropout_active else x
    if mode == SPARSE_TO_SPARSE:
        update = _SparseToSparseLinear.apply(x_lora, None, mask, lora_a, lora_b, scaling, None, True, pattern)
    else:
        update = F.linear(F.linear(x_lora, lora_a.to(x.dtype)), lora_b.to(x.dtype)) * scaling
    return y + update
