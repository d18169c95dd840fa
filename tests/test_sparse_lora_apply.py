"""Config, targeting, training, merging and checking on toy modules and the tiny Llama fixture."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from modelzoo_ext.errors import UserError
from modelzoo_ext.masks.format import MaskFile, save_masks
from modelzoo_ext.sparse_lora import (
    SparseLoRAConfig,
    SparseLoRALinear,
    apply_sparse_lora_,
    check_sparsity,
    load_lora_state_dict_,
    lora_state_dict,
    merge_sparse_lora_,
    sparse_lora_layers,
)

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def config(mode="sparse_to_sparse", **kw) -> SparseLoRAConfig:
    kw.setdefault("mask_path", "masks.safetensors")
    return SparseLoRAConfig(mode=mode, r=4, alpha=8.0, **kw)


def random_masks(model: nn.Module, suffixes, sparsity=0.5, seed=0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        f"{name}.weight": torch.rand(m.weight.shape, generator=gen) >= sparsity
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in suffixes
    }


@torch.no_grad()
def randomise_lora_(model: nn.Module, seed=1) -> None:
    """Non-zero A and B (B = 0 would make every merge/export test pass trivially)."""
    gen = torch.Generator().manual_seed(seed)
    for layer in sparse_lora_layers(model).values():
        layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=gen) * 0.1)
        layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.1)


class ToyBlock(nn.Module):
    """ModelZoo-style names: proj_q_dense_layer and ffn.ffn.0.linear_layer."""

    def __init__(self):
        super().__init__()
        self.proj_q_dense_layer = nn.Linear(8, 8, bias=False)
        self.ffn = nn.Module()
        self.ffn.ffn = nn.ModuleList([nn.Module()])
        self.ffn.ffn[0].linear_layer = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(8)


def toy_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.ModuleDict({"layers": nn.ModuleList([ToyBlock(), ToyBlock()])})


@pytest.fixture
def tiny_llama(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, torch_dtype=torch.float32, attn_implementation="eager"
    )


# ---------------------------------------------------------------- config


def test_config_defaults_scaling_and_validation():
    cfg = SparseLoRAConfig(mode="sparse_to_dense", mask_path="m.safetensors")
    assert (cfg.r, cfg.alpha, cfg.scaling, cfg.target_modules) == (16, 32.0, 2.0, PROJECTIONS)
    with pytest.raises(ValidationError, match="mask_path is required"):
        SparseLoRAConfig(mode="sparse_to_dense")
    with pytest.raises(ValidationError, match="dense_baseline"):
        SparseLoRAConfig(mode="sparse_to_dense", dense_baseline=True, mask_path="m")
    with pytest.raises(ValidationError, match="extra"):
        SparseLoRAConfig(mode="sparse_to_dense", mask_path="m", rank=8)
    for bad in ({"r": 0}, {"dropout": 1.0}, {"mode": "dense"}):
        with pytest.raises(ValidationError):
            SparseLoRAConfig(**{"mode": "sparse_to_dense", "mask_path": "m", **bad})
    assert SparseLoRAConfig(mode="sparse_to_sparse", dense_baseline=True).mask_path is None


# ---------------------------------------------------------------- targeting and errors


def test_targets_by_suffix_and_regex_with_modelzoo_names():
    model = toy_model()
    masks = random_masks(model, {"linear_layer", "proj_q_dense_layer"})
    summary = apply_sparse_lora_(
        model,
        config(),
        masks,
        target_modules=["proj_q_dense_layer", "re:layers\\.\\d\\.ffn\\.ffn\\.0\\.linear_layer"],
    )
    assert sorted(sparse_lora_layers(model)) == sorted(k.removesuffix(".weight") for k in masks)
    assert [info.name for info in summary.layers] == sorted(sparse_lora_layers(model))
    assert "layers.0.ffn.ffn.0.linear_layer" in str(summary)


def test_exact_dotted_suffix_entry():
    model = toy_model()
    masks = random_masks(model, {"linear_layer"})
    apply_sparse_lora_(model, config(), masks, target_modules=["ffn.ffn.0.linear_layer"])
    assert len(sparse_lora_layers(model)) == 2


def test_every_problem_is_listed_and_nothing_is_changed():
    model = toy_model()
    masks = random_masks(model, {"linear_layer"})
    masks["layers.9.nothing.weight"] = torch.ones(2, 2, dtype=torch.bool)
    masks["layers.0.ffn.ffn.0.linear_layer.weight"] = torch.ones(3, 8, dtype=torch.bool)
    with pytest.raises(UserError) as err:
        apply_sparse_lora_(model, config(), masks, target_modules=["linear_layer", "proj_q_dense_layer"])
    text = str(err.value)
    assert "layers.9.nothing.weight" in text  # mask with no module
    assert (
        "layers.0.proj_q_dense_layer.weight" in text and "layers.1.proj_q_dense_layer.weight" in text
    )  # no mask
    assert "(3, 8)" in text  # shape mismatch
    assert not sparse_lora_layers(model)
    assert all(p.requires_grad for p in model.parameters())


def test_unmatched_target_and_second_apply_raise():
    model = toy_model()
    with pytest.raises(UserError, match="match no nn.Linear.*q_proj"):
        apply_sparse_lora_(model, config(), {}, target_modules=["q_proj"])
    masks = random_masks(model, {"linear_layer"})
    apply_sparse_lora_(model, config(), masks, target_modules=["linear_layer"])
    with pytest.raises(UserError, match="already holds 2 SparseLoRALinear"):
        apply_sparse_lora_(model, config(), masks, target_modules=["linear_layer"])


def test_dense_baseline_needs_no_masks_and_refuses_them():
    model = toy_model()
    cfg = SparseLoRAConfig(mode="sparse_to_dense", dense_baseline=True, r=2, target_modules=["linear_layer"])
    with pytest.raises(UserError, match="dense_baseline is set"):
        apply_sparse_lora_(model, cfg, random_masks(model, {"linear_layer"}))
    summary = apply_sparse_lora_(model, cfg, {})
    assert summary.mode == "dense_lora" and all(info.density == 1.0 for info in summary.layers)


def test_freezes_everything_but_lora_and_counts_parameters():
    model = toy_model()
    total_before = sum(p.numel() for p in model.parameters())
    summary = apply_sparse_lora_(
        model, config(), random_masks(model, {"linear_layer"}), target_modules=["linear_layer"]
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"layers.{i}.ffn.ffn.0.linear_layer.lora_{ab}.weight" for i in (0, 1) for ab in "AB"}
    assert summary.trainable_params == 2 * 4 * (8 + 16)
    assert summary.total_params == total_before + summary.trainable_params


def test_lora_a_init_is_seeded_by_canonical_name_not_by_model():
    """Two models with different module names but the same canonical (HF) names get the same A."""
    a, b = toy_model(), toy_model()
    masks = random_masks(a, {"linear_layer"})
    apply_sparse_lora_(a, config(init_seed=7), masks, target_modules=["linear_layer"])
    renamed = {"layers.0.ffn.ffn.0.linear_layer": "model.layers.0.mlp.up_proj"}
    apply_sparse_lora_(
        b,
        config(init_seed=7),
        masks,
        target_modules=["linear_layer"],
        canonical_name=lambda n: renamed.get(n, n),
    )
    la, lb = sparse_lora_layers(a), sparse_lora_layers(b)
    same = "layers.1.ffn.ffn.0.linear_layer"
    changed = "layers.0.ffn.ffn.0.linear_layer"
    assert torch.equal(la[same].lora_A.weight, lb[same].lora_A.weight)
    assert not torch.equal(la[changed].lora_A.weight, lb[changed].lora_A.weight)
    assert not torch.equal(la[same].lora_A.weight, la[changed].lora_A.weight)
    bound = 1 / 8**0.5  # Kaiming-uniform(a=sqrt(5)) on fan_in 8
    for layer in la.values():
        assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.abs().max() > bound / 2
        assert torch.count_nonzero(layer.lora_B.weight) == 0
    c = toy_model()
    apply_sparse_lora_(c, config(init_seed=8), masks, target_modules=["linear_layer"])
    assert not torch.equal(sparse_lora_layers(c)[same].lora_A.weight, la[same].lora_A.weight)


# ---------------------------------------------------------------- layer


@pytest.mark.parametrize("mode", ["sparse_to_dense", "sparse_to_sparse"])
def test_mask_base_in_forward_false_is_the_same_math_on_a_premasked_weight(mode):
    torch.manual_seed(0)
    linear = nn.Linear(12, 10)
    mask = torch.rand(10, 12) >= 0.6
    inner = SparseLoRALinear.from_linear(linear, mask, config(mode))
    with torch.no_grad():
        premasked = nn.Linear(12, 10)
        premasked.weight.copy_(linear.weight * mask)
        premasked.bias.copy_(linear.bias)
    outer = SparseLoRALinear.from_linear(premasked, mask, config(mode), mask_base_in_forward=False)
    for layer in (inner, outer):
        with torch.no_grad():
            layer.lora_A.weight.copy_(torch.arange(48.0).reshape(4, 12).sin())
            layer.lora_B.weight.copy_(torch.arange(40.0).reshape(10, 4).cos())
    x = torch.randn(3, 12)
    assert torch.equal(inner(x), outer(x))
    assert torch.equal(inner.merged_weight(), outer.merged_weight())
    assert "mode=" + mode in repr(inner) and "r=4" in repr(inner) and "density=" in repr(inner)


@pytest.mark.parametrize("mode", ["sparse_to_dense", "sparse_to_sparse"])
def test_mask_base_auto_skips_masking_only_on_a_premasked_weight(mode):
    """ "auto" masks a dense W in forward and skips it on a pruned W: outputs and gradients of
    x, A and B bit-identical to always masking."""
    torch.manual_seed(0)
    mask = torch.rand(10, 12) >= 0.6
    for premask in (False, True):
        linear = nn.Linear(12, 10)
        with torch.no_grad():
            linear.weight.mul_(mask if premask else 1)
        layers = {
            flag: SparseLoRALinear.from_linear(linear, mask, config(mode), mask_base_in_forward=flag)
            for flag in (True, "auto")
        }
        assert layers["auto"].mask_base_in_forward is (not premask)
        results = []
        for layer in layers.values():
            with torch.no_grad():
                layer.lora_A.weight.copy_(torch.arange(48.0).reshape(4, 12).sin())
                layer.lora_B.weight.copy_(torch.arange(40.0).reshape(10, 4).cos())
            x = torch.arange(36.0).reshape(3, 12).cos().requires_grad_()
            layer(x).square().sum().backward()
            results.append([layer(x), x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad])
        for got, expected in zip(results[1], results[0], strict=True):
            assert torch.equal(got, expected)


def test_unmerge_is_exact_for_s2d_and_refused_for_s2s():
    torch.manual_seed(0)
    for mode in ("sparse_to_dense", "sparse_to_sparse"):
        linear = nn.Linear(6, 5)
        original = linear.weight.detach().clone()
        layer = SparseLoRALinear.from_linear(linear, torch.rand(5, 6) > 0.5, config(mode))
        nn.init.normal_(layer.lora_B.weight)
        x = torch.randn(4, 6)
        before = layer(x)
        layer.merge()
        torch.testing.assert_close(layer(x), before, rtol=1e-6, atol=1e-6)
        if mode == "sparse_to_dense":
            layer.unmerge()
            assert torch.equal(layer.weight, original)
        else:
            with pytest.raises(UserError, match="cannot unmerge"):
                layer.unmerge()


def test_sampled_product_layer_gradients_match_dense_path():
    torch.manual_seed(0)
    linear = nn.Linear(32, 48, bias=False)
    mask = torch.rand(48, 32) >= 0.9
    layers = [
        SparseLoRALinear.from_linear(linear, mask, config(), sampled_product=c) for c in ("always", "never")
    ]
    for layer in layers:
        with torch.no_grad():
            layer.lora_A.weight.copy_(torch.linspace(-1, 1, 4 * 32).reshape(4, 32).cos())
            layer.lora_B.weight.copy_(torch.linspace(-1, 1, 48 * 4).reshape(48, 4))
        layer(torch.linspace(-2, 2, 5 * 32).reshape(5, 32)).square().sum().backward()
    assert layers[0]._pattern is not None and layers[1]._pattern is None
    # "auto" at density 0.5 on the CPU takes the dense path and never builds the CSR pattern
    # (it costs ~12 bytes per kept weight).
    auto = SparseLoRALinear.from_linear(linear, torch.rand(48, 32) >= 0.5, config())
    auto(torch.ones(2, 32)).sum().backward()
    assert auto._pattern is None and auto.lora_A.weight.grad is not None
    for name in ("lora_A", "lora_B"):
        g0, g1 = (getattr(layer, name).weight.grad for layer in layers)
        torch.testing.assert_close(g0, g1, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- training and merging on the tiny Llama


def train_steps(model, steps=2, seed=0) -> set[str]:
    """A few AdamW steps on random tokens; returns the parameters that got a non-zero gradient."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    got_grad = set()
    for _ in range(steps):
        ids = torch.randint(0, 32000, (2, 12), generator=gen)
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert torch.isfinite(loss)
        got_grad |= {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        opt.step()
    model.eval()
    return got_grad


@pytest.mark.parametrize("mode", ["sparse_to_dense", "sparse_to_sparse"])
def test_training_touches_only_lora_and_s2s_merge_is_exact(tiny_llama, mode):
    model = tiny_llama
    masks = random_masks(model, PROJECTIONS, sparsity=0.6)
    apply_sparse_lora_(model, config(mode), masks)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    masks_before = {n: layer.mask.clone() for n, layer in sparse_lora_layers(model).items()}
    lora_before = {k: v.clone() for k, v in lora_state_dict(model).items()}
    got_grad = train_steps(model)
    assert got_grad == set(lora_before)
    for name, param in model.named_parameters():
        if name in frozen_before:
            assert torch.equal(param, frozen_before[name]), name
    assert all(torch.equal(layer.mask, masks_before[n]) for n, layer in sparse_lora_layers(model).items())
    assert all(torch.count_nonzero(v) > 0 for k, v in lora_state_dict(model).items() if "lora_B" in k)
    assert all(not torch.equal(v, lora_before[k]) for k, v in lora_state_dict(model).items())

    ids = torch.randint(0, 32000, (2, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
    report = merge_sparse_lora_(model)
    assert len(report.merged) == 14 and not sparse_lora_layers(model)
    with torch.no_grad():
        merged = model(input_ids=ids).logits
    check = check_sparsity(model, masks)
    if mode == "sparse_to_sparse":
        assert torch.equal(merged, unmerged)
        assert check.ok and check.total_violations == 0 and check.matched == 14
    else:
        torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
        assert not check.ok and check.total_violations > 0  # the s2d update is dense


def test_s2d_preserve_sparsity_on_merge_reports_what_it_discards(tiny_llama):
    model = tiny_llama
    masks = random_masks(model, PROJECTIONS, sparsity=0.7)
    apply_sparse_lora_(model, config("sparse_to_dense", preserve_sparsity_on_merge=True), masks)
    randomise_lora_(model)
    expected = {}
    for name, layer in sparse_lora_layers(model).items():
        delta = layer.scaling * layer.lora_B.weight @ layer.lora_A.weight
        expected[name] = (delta * ~masks[f"{name}.weight"]).norm() / delta.norm()
    report = merge_sparse_lora_(model)
    for name, fraction in report.discarded_fraction.items():
        assert fraction == pytest.approx(float(expected[name]), rel=1e-5)
    assert 0.5 < report.total_discarded_fraction < 1.0  # ~sqrt(0.7) for random factors
    assert check_sparsity(model, masks).ok


def test_lora_state_dict_round_trip(tiny_llama, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    masks = random_masks(tiny_llama, PROJECTIONS)
    apply_sparse_lora_(tiny_llama, config(), masks)
    randomise_lora_(tiny_llama)
    state = lora_state_dict(tiny_llama)
    assert len(state) == 28 and "model.layers.0.self_attn.q_proj.lora_A.weight" in state
    fresh = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, torch_dtype=torch.float32, attn_implementation="eager"
    )
    apply_sparse_lora_(fresh, config(), masks)
    load_lora_state_dict_(fresh, state)
    ids = torch.arange(12).reshape(1, 12)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(input_ids=ids).logits, tiny_llama.eval()(input_ids=ids).logits)
    with pytest.raises(UserError, match="unexpected.*bogus"):
        load_lora_state_dict_(fresh, {**state, "bogus.lora_A.weight": torch.zeros(1)})


# ---------------------------------------------------------------- check_sparsity


def test_check_sparsity_counts_exact_violations(tmp_path):
    gen = torch.Generator().manual_seed(0)
    masks = {f"w{i}": torch.rand(8, 16, generator=gen) > 0.5 for i in range(3)}
    weights = {k: torch.randn(8, 16, generator=gen) * m for k, m in masks.items()}
    assert check_sparsity(weights, masks).ok
    off = (~masks["w1"]).nonzero()[:5]
    weights["w1"][off[:, 0], off[:, 1]] = 1e-30  # tiny is still nonzero
    weights["w2"][tuple((~masks["w2"]).nonzero()[0].tolist())] = float("nan")
    report = check_sparsity(weights, masks)
    assert not report.ok and report.total_violations == 6
    assert [t.violations for t in report.tensors] == [0, 5, 1]
    assert json.loads(json.dumps(report.to_dict()))["total_violations"] == 6
    save_masks(tmp_path / "m.safetensors", masks, {"method": "test"}, naming="hf")
    assert check_sparsity(weights, MaskFile(tmp_path / "m.safetensors")).total_violations == 6


def test_check_sparsity_is_never_ok_when_nothing_matched():
    masks = {"a.weight": torch.ones(2, 2, dtype=torch.bool), "b.weight": torch.ones(2, 2, dtype=torch.bool)}
    assert not check_sparsity({}, {}).ok
    report = check_sparsity({"a.weight": torch.ones(2, 2), "b.weight": torch.ones(3, 2)}, masks)
    assert not report.ok and report.matched == 1 and len(report.shape_mismatches) == 1
    report = check_sparsity({"a.weight": torch.ones(2, 2)}, masks)
    assert not report.ok and report.missing == ["b.weight"]


@pytest.mark.parametrize("mode", ["sparse_to_dense", "sparse_to_sparse"])
def test_bf16_layer_trains_finite_with_float32_factors(mode):
    torch.manual_seed(0)
    linear = nn.Linear(64, 32).to(torch.bfloat16)
    mask = torch.rand(32, 64) >= 0.7
    layer = SparseLoRALinear.from_linear(linear, mask, config(mode))
    assert layer.lora_A.weight.dtype == torch.float32 and layer.weight.dtype == torch.bfloat16
    weight_before = layer.weight.detach().clone()
    opt = torch.optim.SGD([layer.lora_A.weight, layer.lora_B.weight], lr=0.1)
    for _ in range(5):
        x = torch.randn(8, 64).to(torch.bfloat16)
        loss = layer(x).float().square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    assert torch.isfinite(layer.lora_B.weight).all() and layer.lora_B.weight.abs().sum() > 0
    assert torch.equal(layer.weight, weight_before)
    assert layer(x).dtype == torch.bfloat16


def test_linear_subclasses_are_refused():
    class ScaledLinear(nn.Linear):
        pass

    model = toy_model()
    model["layers"][0].proj_q_dense_layer = ScaledLinear(8, 8)
    with pytest.raises(UserError, match=r"subclasses.*layers.0.proj_q_dense_layer \(ScaledLinear\)"):
        apply_sparse_lora_(
            model,
            config(),
            random_masks(model, {"proj_q_dense_layer"}),
            target_modules=["proj_q_dense_layer"],
        )
