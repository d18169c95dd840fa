"""The sparse-LoRA layer traced and trained by cerebras-pytorch's CPU backend (as on CS-3)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from modelzoo_ext.sparse_lora import SparseLoRAConfig, SparseLoRALinear

pytestmark = pytest.mark.cs

STEPS = 3


def batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(4, 16, generator=gen) for _ in range(STEPS)]


def make_layer(mode: str) -> SparseLoRALinear:
    torch.manual_seed(0)
    linear = nn.Linear(16, 8)
    mask = torch.rand(8, 16) > 0.5
    cfg = SparseLoRAConfig(mode=mode, r=2, alpha=4.0, mask_path="m.safetensors")
    layer = SparseLoRALinear.from_linear(linear, mask, cfg, sampled_product="never")
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.linspace(-0.5, 0.5, 16).reshape(8, 2))  # non-zero B
    return layer


def eager_losses(layer: SparseLoRALinear) -> list[float]:
    opt = torch.optim.SGD([layer.lora_A.weight, layer.lora_B.weight], lr=0.05)
    losses = []
    for x in batches():
        loss = layer(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    return losses


def test_cstorch_cpu_backend_traces_both_modes_like_eager(cstorch_cpu_backend):
    import cerebras.pytorch as cstorch

    backend = cstorch_cpu_backend
    for mode in ("sparse_to_dense", "sparse_to_sparse"):
        layer = make_layer(mode)
        expected = eager_losses(copy.deepcopy(layer))
        weight_before = layer.weight.detach().clone()
        compiled = cstorch.compile(layer, backend)
        opt = cstorch.optim.SGD([layer.lora_A.weight, layer.lora_B.weight], lr=0.05)

        @cstorch.trace
        def train_step(x, compiled=compiled, opt=opt):
            loss = compiled(x).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            return loss

        loader = cstorch.utils.data.DataLoader(batches)
        losses = [float(train_step(x)) for x in cstorch.utils.data.DataExecutor(loader, num_steps=STEPS)]
        assert losses == pytest.approx(expected, rel=1e-5), mode
        assert torch.equal(layer.weight.detach().cpu(), weight_before), mode
