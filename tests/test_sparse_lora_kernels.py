"""The functional kernel against the math written out here with plain autograd ops.

A matrix over modes x dtypes x shapes x sparsities (PEFT-style CASES), float64 gradcheck of the
custom autograd functions, the sampled-product path against the dense one, and what the s2s
backward keeps alive.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from modelzoo_ext.errors import UserError
from modelzoo_ext.sparse_lora.kernels import SampledPattern, merged_weight, sparse_lora_linear

MODES = ("sparse_to_dense", "sparse_to_sparse")
# (batch shape, in, out, r): square, wide, tall, no batch dim, rank 1.
SHAPES = [((2, 5), 16, 16, 4), ((3,), 24, 40, 8), ((7,), 40, 24, 1), ((2, 3, 2), 8, 12, 2)]
SPARSITIES = (0.0, 0.5, 0.9, 1.0)
DTYPES = (torch.float32, torch.float64)
CASES = list(itertools.product(MODES, DTYPES, SHAPES, SPARSITIES))
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


def reference(x, weight, mask, a, b, s, mode, bias=None, x_lora=None):
    """The design's math with no custom autograd: s2d x(W*M)^T + s x_l A^T B^T; s2s x((W+sBA)*M)^T."""
    m = mask.to(weight.dtype)
    x_lora = x if x_lora is None else x_lora
    if mode == "sparse_to_dense":
        y = x @ (weight * m).T + s * (x_lora @ a.T) @ b.T
    elif x_lora is x:
        y = x @ ((weight + s * b @ a) * m).T
    else:
        y = x @ (weight * m).T + s * x_lora @ ((b @ a) * m).T
    return y if bias is None else y + bias


def make_inputs(batch, n_in, n_out, r, sparsity, dtype, seed=0, bias=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, n_in, generator=gen, dtype=torch.float64)
    weight = torch.randn(n_out, n_in, generator=gen, dtype=torch.float64)
    mask = torch.rand(n_out, n_in, generator=gen) >= sparsity
    a = torch.randn(r, n_in, generator=gen, dtype=torch.float64) / n_in**0.5
    b = torch.randn(n_out, r, generator=gen, dtype=torch.float64)  # never zero: B = 0 hides bugs
    bias_t = torch.randn(n_out, generator=gen, dtype=torch.float64) if bias else None
    cast = [t.to(dtype) if t is not None else None for t in (x, weight, a, b, bias_t)]
    x, weight, a, b, bias_t = cast
    x.requires_grad_(True)
    a.requires_grad_(True)
    b.requires_grad_(True)
    return x, weight, mask, a, b, bias_t


def outputs_and_grads(fn, x, a, b, upstream):
    for t in (x, a, b):
        t.grad = None
    y = fn()
    y.backward(upstream)
    return y.detach(), x.grad.clone(), a.grad.clone(), b.grad.clone()


@pytest.mark.parametrize("mode,dtype,shape,sparsity", CASES)
def test_matches_reference(mode, dtype, shape, sparsity):
    batch, n_in, n_out, r = shape
    x, w, m, a, b, bias = make_inputs(batch, n_in, n_out, r, sparsity, dtype, bias=True)
    upstream = torch.randn(*batch, n_out, generator=torch.Generator().manual_seed(1), dtype=dtype)
    got = outputs_and_grads(lambda: sparse_lora_linear(x, w, m, a, b, 1.5, mode, bias), x, a, b, upstream)
    want = outputs_and_grads(lambda: reference(x, w, m, a, b, 1.5, mode, bias), x, a, b, upstream)
    tol = TOLERANCE[dtype]
    for name, g, e in zip(("y", "dx", "dA", "dB"), got, want, strict=True):
        assert g.dtype == dtype
        torch.testing.assert_close(g, e, rtol=tol, atol=tol, msg=f"{name} differs")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_close_to_float32_and_finite(mode, dtype):
    x, w, m, a, b, _ = make_inputs((4, 8), 64, 48, 8, 0.7, dtype)
    upstream = torch.randn(4, 8, 48, generator=torch.Generator().manual_seed(2)).to(dtype)
    got = outputs_and_grads(lambda: sparse_lora_linear(x, w, m, a, b, 2.0, mode), x, a, b, upstream)
    x32, a32, b32 = (t.detach().float().requires_grad_(True) for t in (x, a, b))
    want = outputs_and_grads(
        lambda: reference(x32, w.float(), m, a32, b32, 2.0, mode), x32, a32, b32, upstream.float()
    )
    for name, g, e in zip(("y", "dx", "dA", "dB"), got, want, strict=True):
        assert g.dtype == dtype and torch.isfinite(g).all(), name
        # Relative to the tensor's scale: bf16 keeps 8 bits of mantissa.
        assert (g.float() - e).abs().max() <= 2e-2 * e.abs().max(), name


@pytest.mark.parametrize("mode", MODES)
def test_bfloat16_autocast_gradients_match_float32(mode):
    """Mixed precision (`precision.enabled`) trains the same adapters: gradients of x, A, B under
    bf16 autocast stay within bf16 rounding of float32, including for a leaf input x (autocast's
    cast cache once dropped x's gradient through the LoRA branch)."""
    x, w, m, a, b, bias = make_inputs((4, 8), 64, 48, 8, 0.7, torch.float32, bias=True)
    upstream = torch.randn(4, 8, 48, generator=torch.Generator().manual_seed(3))

    def run():
        return sparse_lora_linear(x, w, m, a, b, 2.0, mode, bias).float()

    want = outputs_and_grads(run, x, a, b, upstream)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = outputs_and_grads(run, x, a, b, upstream)
    for name, g, e in zip(("y", "dx", "dA", "dB"), got, want, strict=True):
        assert torch.isfinite(g).all(), name
        assert (g - e).abs().max() <= 2e-2 * e.abs().max(), name


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_gradcheck_float64(mode, with_bias):
    x, w, m, a, b, bias = make_inputs((3,), 6, 5, 2, 0.5, torch.float64, bias=with_bias)

    def fn(x_, a_, b_):
        return sparse_lora_linear(x_, w, m, a_, b_, 0.7, mode, bias)

    assert torch.autograd.gradcheck(fn, (x, a, b))


@pytest.mark.parametrize("mode", MODES)
def test_dropout_matches_reference_with_same_rng(mode):
    x, w, m, a, b, _ = make_inputs((4, 3), 16, 12, 4, 0.5, torch.float32)
    upstream = torch.randn(4, 3, 12, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(123)
    got = outputs_and_grads(
        lambda: sparse_lora_linear(x, w, m, a, b, 2.0, mode, dropout_p=0.3, training=True), x, a, b, upstream
    )
    torch.manual_seed(123)
    want = outputs_and_grads(
        lambda: reference(x, w, m, a, b, 2.0, mode, x_lora=torch.nn.functional.dropout(x, 0.3, True)),
        x,
        a,
        b,
        upstream,
    )
    for name, g, e in zip(("y", "dx", "dA", "dB"), got, want, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5, msg=f"{name} differs")
    # Dropout is off outside training: the output is the deterministic map.
    eval_y = sparse_lora_linear(x, w, m, a, b, 2.0, mode, dropout_p=0.3, training=False)
    torch.testing.assert_close(eval_y, reference(x, w, m, a, b, 2.0, mode), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_merged_weight_reproduces_the_layer(dtype):
    x, w, m, a, b, bias = make_inputs((6,), 16, 12, 4, 0.6, dtype, bias=True)
    with torch.no_grad():
        s2s = merged_weight(w, m, a, b, 2.0, "sparse_to_sparse")
        assert s2s.dtype == dtype and torch.count_nonzero(s2s[~m]) == 0
        y = sparse_lora_linear(x, w, m, a, b, 2.0, "sparse_to_sparse", bias)
        assert torch.equal(torch.nn.functional.linear(x, s2s, bias), y)  # bit for bit
        s2d = merged_weight(w, m, a, b, 2.0, "sparse_to_dense")
        y = sparse_lora_linear(x, w, m, a, b, 2.0, "sparse_to_dense", bias)
        torch.testing.assert_close(
            torch.nn.functional.linear(x, s2d, bias), y, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype]
        )
        assert torch.count_nonzero(s2d[~m]) > 0  # the s2d update is dense
        remasked = merged_weight(w, m, a, b, 2.0, "sparse_to_dense", preserve_sparsity=True)
        assert torch.count_nonzero(remasked[~m]) == 0 and torch.equal(remasked[m], s2d[m])


def test_no_mask_is_plain_lora():
    x, w, _, a, b, _ = make_inputs((5,), 8, 6, 2, 0.0, torch.float32)
    plain = x @ w.T + 1.5 * x @ a.T @ b.T
    for mode in MODES:
        torch.testing.assert_close(sparse_lora_linear(x, w, None, a, b, 1.5, mode), plain)


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.99])
def test_sampled_product_matches_dense_path(sparsity):
    x, w, m, a, b, _ = make_inputs((4, 16), 48, 80, 8, sparsity, torch.float32)
    upstream = torch.randn(4, 16, 80, generator=torch.Generator().manual_seed(3))
    pattern = SampledPattern.from_mask(m)
    assert pattern.density == int(m.sum()) / m.numel()
    sampled = outputs_and_grads(
        lambda: sparse_lora_linear(x, w, m, a, b, 2.0, "sparse_to_sparse", pattern=pattern), x, a, b, upstream
    )
    dense = outputs_and_grads(
        lambda: sparse_lora_linear(x, w, m, a, b, 2.0, "sparse_to_sparse"), x, a, b, upstream
    )
    for name, g, e in zip(("y", "dx", "dA", "dB"), sampled, dense, strict=True):
        # Only the summation order differs: float32 rounding relative to the gradient's scale.
        assert (g - e).abs().max() <= 1e-6 * e.abs().max(), name


@pytest.mark.parametrize("mode", MODES)
def test_backward_keeps_no_dense_effective_weight(mode):
    """Every [out, in]-sized tensor saved for backward is W or M itself, not a new W*M or W_eff."""
    x, w, m, a, b, _ = make_inputs((2, 4), 24, 40, 4, 0.5, torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        sparse_lora_linear(x, w, m, a, b, 2.0, mode)
    big = [t for t in saved if t.numel() == w.numel()]
    assert big, "W and M themselves are expected among the saved tensors"
    assert all(t.data_ptr() in (w.data_ptr(), m.data_ptr()) for t in big), [t.shape for t in big]


def test_bad_arguments_raise_user_errors():
    x, w, m, a, b, _ = make_inputs((2,), 8, 6, 2, 0.5, torch.float32)
    with pytest.raises(UserError, match="unknown sparse-LoRA mode"):
        sparse_lora_linear(x, w, m, a, b, 1.0, "dense")
    with pytest.raises(UserError, match="shape mismatch"):
        sparse_lora_linear(x, w, m, b, a, 1.0, "sparse_to_sparse")
    with pytest.raises(UserError, match="mask must be torch.bool"):
        sparse_lora_linear(x, w, m.float(), a, b, 1.0, "sparse_to_sparse")
    with pytest.raises(UserError, match="frozen weight"):
        sparse_lora_linear(x, w.clone().requires_grad_(True), m, a, b, 1.0, "sparse_to_sparse")


@pytest.mark.parametrize("shape", [(7, 13), (64, 64), (1, 9)])
def test_packed_mask_round_trips_in_an_eighth_of_the_memory(shape):
    from modelzoo_ext.sparse_lora.kernels import PackedMask

    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = PackedMask.pack(mask)
    assert packed.bits.dtype == torch.uint8 and packed.bits.numel() == -(-mask.numel() // 8)
    assert torch.equal(packed.unpack(), mask)


@pytest.mark.parametrize(
    "mode,mask_base,dropout,sampled",
    list(itertools.product(MODES, (True, False), (0.0, 0.25), ("never", "always"))),
)
def test_a_packed_mask_gives_the_same_layer_bit_for_bit(mode, mask_base, dropout, sampled):
    """SparseLoRALinear(pack_mask=True): outputs, input and LoRA gradients, the mask it reads back
    and the merged weight equal the bool-mask layer's exactly (masked or pruned base, with and
    without dropout, dense and sampled s2s gradients)."""
    from modelzoo_ext.sparse_lora.layer import SparseLoRALinear

    results = []
    for pack in (False, True):
        weight = torch.randn(48, 40, generator=torch.Generator().manual_seed(1))
        mask = torch.rand(48, 40, generator=torch.Generator().manual_seed(2)) > 0.5
        if not mask_base:
            weight = weight * mask  # a pruned base
        torch.manual_seed(0)  # the same A
        layer = SparseLoRALinear(torch.nn.Parameter(weight), None, mask, mode=mode, r=4, alpha=8.0, dropout=dropout,
                                 mask_base_in_forward=mask_base, sampled_product=sampled, pack_mask=pack)  # fmt: skip
        with torch.no_grad():
            layer.lora_B.weight.normal_(generator=torch.Generator().manual_seed(3))
        assert (layer.mask_bits is not None) == pack and (layer._buffers["mask"] is None) == pack
        x = torch.randn(3, 5, 40, generator=torch.Generator().manual_seed(4), requires_grad=True)
        torch.manual_seed(5)  # the same dropout masks
        y = layer.train()(x)
        (y * torch.arange(48.0)).sum().backward()
        results.append([y.detach(), x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad, layer.mask,
                        layer.merged_weight()])  # fmt: skip
    for got, expected in zip(results[1], results[0], strict=True):
        assert torch.equal(got, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu_reference(mode, dtype):
    x, w, m, a, b, _ = make_inputs((4, 32), 64, 96, 8, 0.9, torch.float32)
    upstream = torch.randn(4, 32, 96, generator=torch.Generator().manual_seed(3))
    want = outputs_and_grads(lambda: reference(x, w, m, a, b, 2.0, mode), x, a, b, upstream)
    xc, ac, bc = (t.detach().cuda().to(dtype).requires_grad_(True) for t in (x, a, b))
    wc, mc = w.cuda().to(dtype), m.cuda()
    for pattern in (None, SampledPattern.from_mask(mc)):
        got = outputs_and_grads(
            lambda p=pattern: sparse_lora_linear(xc, wc, mc, ac, bc, 2.0, mode, pattern=p),
            xc,
            ac,
            bc,
            upstream.cuda().to(dtype),
        )
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        for name, g, e in zip(("y", "dx", "dA", "dB"), got, want, strict=True):
            assert (g.float().cpu() - e).abs().max() <= tol * max(1.0, e.abs().max().item()), name
