"""Mixtral in the pure-PyTorch core: names, stacking, transformers-5 fused experts, masks, the fused
sparse-LoRA layer, the run config's `moe` keys and the reference trainer's router loss.

No cerebras here (these run in `make test-latest` too, except what needs transformers 4's
per-expert Mixtral, which says so). The tiny Mixtral: 2 layers, hidden 64, intermediate 96,
GQA 4/2 heads, 4 experts, top-2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import MIXTRAL_ON_TRANSFORMERS_5, transformers_major

from modelzoo_ext.errors import UserError
from modelzoo_ext.hf_checkpoint import HFCheckpoint
from modelzoo_ext.name_map import (
    RopeLayout,
    cs_to_hf_names,
    group_by_cs,
    hf_module_to_cs_module,
    hf_to_cs_name,
    to_cs_stacked,
    to_hf_parts,
)

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "hf_configs" / "Mixtral-8x7B-v0.1.config.json"
E = 4
EXPERT_W1 = "model.transformer_decoder.layers.{i}.ffn.experts.fused_ffns.0.linear_layer_for_glu"


needs_per_expert_mixtral = pytest.mark.skipif(transformers_major() >= 5, reason=MIXTRAL_ON_TRANSFORMERS_5)


def layout() -> RopeLayout:
    return RopeLayout(num_heads=4, num_kv_heads=2, head_dim=16, rotary_dim=16, num_experts=E)


def hf_state(directory: Path) -> dict[str, torch.Tensor]:
    checkpoint = HFCheckpoint(directory)
    return dict(checkpoint.iter_tensors())


def to_cs_state(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    groups = group_by_cs(hf, "mixtral", E, where="test")
    return {
        cs: to_cs_stacked(cs, [(n, hf[n]) for n in parts], "mixtral", layout())
        for cs, parts in groups.items()
    }


def to_hf_state(cs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(part for name, t in cs.items() for part in to_hf_parts(name, t, "mixtral", layout()))


# ------------------------------------------------------------------------------------ names


def test_expert_names_stack_on_dim_1_and_back_bit_exact(tiny_mixtral_dir):
    """Weights, masks and LoRA factors share one rule: experts stacked on dim 1, [:, e] = expert e."""
    hf = hf_state(tiny_mixtral_dir)
    gen = torch.Generator().manual_seed(0)
    for name in [n for n in hf if ".experts." in n or ".self_attn.q_proj." in n]:
        module = name.removesuffix(".weight")
        out, inp = hf[name].shape
        hf[f"{module}.weight_mask"] = torch.rand(out, inp, generator=gen) < 0.5
        hf[f"{module}.lora_A.weight"] = torch.randn(3, inp, generator=gen)
        hf[f"{module}.lora_B.weight"] = torch.randn(out, 3, generator=gen)
    cs = to_cs_state(hf)
    fused = EXPERT_W1.format(i=1)
    assert cs[f"{fused}.expert_weights"].shape == (96, E, 64)
    assert cs[f"{fused}.expert_weights_mask"].shape == (96, E, 64)
    assert cs[f"{fused}.lora_A.weight"].shape == (3, E, 64)
    assert cs[f"{fused}.lora_B.weight"].shape == (96, E, 3)
    w2 = "model.transformer_decoder.layers.0.ffn.experts.fused_ffns.1.linear_layer.expert_weights"
    assert cs[w2].shape == (64, E, 96)
    for e in range(E):
        expert = f"model.layers.1.block_sparse_moe.experts.{e}.w1"
        assert torch.equal(cs[f"{fused}.expert_weights"][:, e], hf[f"{expert}.weight"])
        assert torch.equal(cs[f"{fused}.lora_B.weight"][:, e], hf[f"{expert}.lora_B.weight"])
    assert "model.transformer_decoder.layers.0.ffn.gate.weight" in cs
    back = to_hf_state(cs)
    assert set(back) == set(hf)
    assert all(torch.equal(back[k], hf[k]) for k in hf)


def test_partial_experts_unknown_tensors_and_the_router_are_refused():
    names = [f"model.layers.0.block_sparse_moe.experts.{e}.w2.weight" for e in (0, 1, 3)]
    with pytest.raises(UserError, match=r"stacks 4 experts .* experts \[0, 1, 3\]"):
        group_by_cs(names, "mixtral", E, where="test")
    with pytest.raises(UserError, match="no mixtral rule"):
        hf_to_cs_name("model.layers.0.mlp.gate_proj.weight", "mixtral")  # a Llama tensor is not Mixtral's
    with pytest.raises(UserError, match="names 0 mixtral decoder modules"):
        hf_module_to_cs_module("gate", "mixtral")  # the router is never a LoRA target
    assert hf_module_to_cs_module("w1", "mixtral") == "ffn.experts.fused_ffns.0.linear_layer_for_glu"
    assert hf_module_to_cs_module("w3", "mixtral") == "ffn.experts.fused_ffns.0.linear_layer"
    assert hf_module_to_cs_module("w2", "mixtral") == "ffn.experts.fused_ffns.1.linear_layer"
    assert cs_to_hf_names(f"{EXPERT_W1.format(i=0)}.expert_weights", "mixtral", 2) == [
        "model.layers.0.block_sparse_moe.experts.0.w1.weight",
        "model.layers.0.block_sparse_moe.experts.1.w1.weight",
    ]


# ------------------------------------------------------------------ transformers-5 fused files


def save_v5_layout(source: Path, out: Path) -> Path:
    """The tiny Mixtral as transformers 5 keeps it (`save_original_format=False`): per layer
    `mlp.gate.weight`, `mlp.experts.gate_up_proj` [E, 2I, H] = cat(stack(w1), stack(w3)) and
    `mlp.experts.down_proj` [E, H, I] = stack(w2) (transformers' conversion_mapping for mixtral)."""
    from safetensors.torch import save_file

    hf = hf_state(source)
    v5 = {
        k.replace(".block_sparse_moe.gate.", ".mlp.gate."): v for k, v in hf.items() if ".experts." not in k
    }
    for i in range(2):
        p = f"model.layers.{i}.block_sparse_moe.experts"
        stack = {w: torch.stack([hf[f"{p}.{e}.{w}.weight"] for e in range(E)]) for w in ("w1", "w2", "w3")}
        v5[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.cat([stack["w1"], stack["w3"]], dim=1)
        v5[f"model.layers.{i}.mlp.experts.down_proj"] = stack["w2"]
    out.mkdir()
    half = sorted(v5)[: len(v5) // 2]
    save_file(
        {k: v5[k] for k in half}, str(out / "model-00001-of-00002.safetensors"), metadata={"format": "pt"}
    )
    rest = {k: v5[k] for k in v5 if k not in half}
    save_file(rest, str(out / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    index = {
        k: "model-00001-of-00002.safetensors" if k in half else "model-00002-of-00002.safetensors" for k in v5
    }
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    (out / "config.json").write_text((source / "config.json").read_text())
    return out


def test_transformers5_fused_checkpoint_reads_as_per_expert_tensors(tiny_mixtral_dir, tmp_path):
    v5 = HFCheckpoint(save_v5_layout(tiny_mixtral_dir, tmp_path / "v5"))
    v4 = HFCheckpoint(tiny_mixtral_dir)
    assert v5.keys() == v4.keys()
    assert v5.shapes() == v4.shapes()
    assert all(torch.equal(v5.get(k), v4.get(k)) for k in v4.keys())  # noqa: SIM118
    assert dict(v5.iter_tensors()).keys() == set(v4.keys())
    assert v5.stored_parts("model.layers.0.mlp.experts.down_proj")[
        "model.layers.0.block_sparse_moe.experts.2.w2.weight"
    ] == (2,)


TORCH_FREE_LAYOUT = """
import sys
from modelzoo_ext.hf_checkpoint import HFCheckpoint
from modelzoo_ext.masks.provenance import source_record
for directory in sys.argv[1:]:
    checkpoint = HFCheckpoint(directory)
    shapes = checkpoint.shapes()
    for entry in checkpoint.entries(checkpoint.keys()):
        assert checkpoint.read(entry).size == entry.nbytes and entry.shape == shapes[entry.name]
    source_record(checkpoint)
print("torch imported:", "torch" in sys.modules)
"""


def test_the_layout_and_byte_reader_never_import_torch(
    tiny_mixtral_dir, tiny_llama_dir, tiny_llama_sharded_dir, tmp_path
):
    """Opening a checkpoint (Mixtral per expert, transformers-5 fused, Llama single and sharded),
    its names, shapes, entries, raw bytes and source record: all from the headers, no torch."""
    import subprocess
    import sys

    v5 = save_v5_layout(tiny_mixtral_dir, tmp_path / "v5")
    directories = [tiny_mixtral_dir, v5, tiny_llama_dir, tiny_llama_sharded_dir]
    result = subprocess.run(
        [sys.executable, "-c", TORCH_FREE_LAYOUT, *map(str, directories)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "torch imported: False"


def test_an_experts_bytes_are_its_slice_of_the_fused_tensor(tiny_mixtral_dir, tmp_path):
    """The torch-free reader of a transformers-5 checkpoint reads exactly each expert's tensor."""
    v5 = HFCheckpoint(save_v5_layout(tiny_mixtral_dir, tmp_path / "v5"))
    v4 = HFCheckpoint(tiny_mixtral_dir)
    for entry in v5.entries(v5.keys()):
        expected = v4.get(entry.name).contiguous().view(-1).view(torch.uint8).numpy()
        assert entry.shape == v4.shape(entry.name) and (v5.read(entry) == expected).all(), entry.name


def test_masks_compute_and_apply_on_a_transformers5_checkpoint_equal_the_per_expert_ones(
    tiny_mixtral_dir, tmp_path
):
    from modelzoo_ext.masks.apply import apply_masks
    from modelzoo_ext.masks.compute import MaskRequest, compute_masks
    from modelzoo_ext.masks.format import MaskFile
    from modelzoo_ext.masks.provenance import check_hf_checkpoint

    v5_dir = save_v5_layout(tiny_mixtral_dir, tmp_path / "v5")
    request = MaskRequest(method="magnitude", scope="global", sparsities=(0.5,))
    compute_masks(tiny_mixtral_dir, request, tmp_path / "v4.safetensors", plot=False)
    compute_masks(v5_dir, request, tmp_path / "v5.safetensors", plot=False)
    v4_masks, v5_masks = MaskFile(tmp_path / "v4.safetensors"), MaskFile(tmp_path / "v5.safetensors")
    assert v4_masks.keys() == v5_masks.keys()
    assert len([k for k in v4_masks.keys() if ".experts." in k]) == 2 * E * 3  # noqa: SIM118
    assert not any(".gate." in k for k in v4_masks.keys())  # noqa: SIM118 (the router)
    for name in v4_masks.keys():  # noqa: SIM118
        assert torch.equal(v4_masks.get(name), v5_masks.get(name)), name
        assert v4_masks.source_checksum(name) == v5_masks.source_checksum(name)
    # global scope over experts is exact: exactly half of all targeted weights kept
    kept = sum(v4_masks.info(n)["kept"] for n in v4_masks.keys())  # noqa: SIM118
    numel = sum(v4_masks.info(n)["numel"] for n in v4_masks.keys())  # noqa: SIM118
    assert kept == numel - round(0.5 * numel)

    pruned = tmp_path / "v5_pruned"
    apply_masks(v5_dir, tmp_path / "v5.safetensors", pruned)
    checkpoint = HFCheckpoint(pruned)
    for name in v5_masks.keys():  # noqa: SIM118
        weight, mask = checkpoint.get(name), v5_masks.get(name)
        assert not weight[~mask].any() and torch.equal(
            weight[mask], HFCheckpoint(v5_dir).get(name)[mask]
        ), name
    assert check_hf_checkpoint(v5_masks, checkpoint, skip=False)  # its pruned output is accepted
    with pytest.raises(UserError, match="provenance|belong|other"):
        check_hf_checkpoint(v5_masks, HFCheckpoint(tiny_mixtral_dir), skip=False)  # another file set


def test_mask_view_shows_stacked_expert_masks_in_cs_naming(tiny_mixtral_dir, tmp_path):
    from modelzoo_ext.masks.compute import MaskRequest, compute_masks
    from modelzoo_ext.masks.format import MaskFile
    from modelzoo_ext.masks.view import MaskView

    compute_masks(tiny_mixtral_dir, MaskRequest(sparsities=(0.3,)), tmp_path / "m.safetensors", plot=False)
    hf = MaskFile(tmp_path / "m.safetensors")
    view = MaskView(hf, "cs", "mixtral", layout())
    fused = f"{EXPERT_W1.format(i=0)}.expert_weights"
    assert len(view) == 2 * (4 + 3)
    stacked = view.get(fused)
    expected = torch.stack(
        [hf.get(f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight") for e in range(E)], 1
    )
    assert torch.equal(stacked, expected)
    info = view.info(fused)
    assert info["shape"] == [96, E, 64] and info["kept"] == int(expected.sum())
    assert view.source_checksum(fused) is None  # a stacked mask describes no single source tensor


# ---------------------------------------------------------------------- the fused LoRA layer


@pytest.mark.parametrize("mode", ["sparse_to_dense", "sparse_to_sparse"])
def test_fused_expert_layer_equals_per_expert_sparse_lora_linears(mode):
    """SparseLoRAExperts on [out, E, in] computes, for each routed row, expert e's SparseLoRALinear."""
    from modelzoo_ext.sparse_lora import SparseLoRAConfig, SparseLoRAExperts, SparseLoRALinear

    gen = torch.Generator().manual_seed(3)
    out_f, in_f, r = 12, 10, 3
    weight = torch.nn.Parameter(torch.randn(out_f, E, in_f, generator=gen), requires_grad=False)
    mask = torch.rand(out_f, E, in_f, generator=gen) < 0.5
    config = SparseLoRAConfig(mode=mode, r=r, alpha=6.0, mask_path="unused")
    module = torch.nn.Module()
    module.expert_weights = weight
    module.expert_biases = None
    fused = SparseLoRAExperts.from_fused(module, mask, config)
    with torch.no_grad():
        fused.lora_A.weight.normal_(generator=gen)
        fused.lora_B.weight.normal_(generator=gen)  # a non-zero B: merges are not trivially equal
    experts = []
    for e in range(E):
        layer = SparseLoRALinear(
            torch.nn.Parameter(weight[:, e].clone(), requires_grad=False),
            None,
            mask[:, e].clone(),
            mode=mode,
            r=r,
            alpha=6.0,
        )
        with torch.no_grad():
            layer.lora_A.weight.copy_(fused.lora_A.weight[:, e])
            layer.lora_B.weight.copy_(fused.lora_B.weight[:, e])
        experts.append(layer)
    x = torch.randn(2, 5, 2, in_f, generator=gen, requires_grad=True)  # [B, S, K, in]
    idx = torch.stack([torch.randperm(E, generator=gen)[:2] for _ in range(10)]).reshape(2, 5, 2)
    y = fused(x, idx)
    probe = torch.randn(y.shape, generator=gen)  # a fixed linear loss: gradients of order one
    (y * probe).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = torch.stack(
        [experts[int(idx.flatten()[t])](x_ref.reshape(-1, in_f)[t]) for t in range(idx.numel())]
    ).reshape(2, 5, 2, out_f)
    (y_ref * probe).sum().backward()
    assert (y - y_ref).abs().max() < 1e-5
    assert (x.grad - x_ref.grad).abs().max() < 1e-4
    for e in range(E):
        assert torch.allclose(fused.lora_B.weight.grad[:, e], experts[e].lora_B.weight.grad, atol=1e-4)
        assert torch.allclose(fused.lora_A.weight.grad[:, e], experts[e].lora_A.weight.grad, atol=1e-4)
        assert torch.allclose(fused.merged_weight()[:, e], experts[e].merged_weight(), atol=1e-6)
    if mode == "sparse_to_sparse":
        assert not fused.merged_weight()[~mask].any()


# ----------------------------------------------------------------------------- run config


def test_the_8x7b_run_config_describes_mixtral_8x7b_exactly():
    from modelzoo_ext.run_config import check_architecture

    params = yaml.safe_load((REPO / "model_configs" / "params_sparse_lora_mixtral_8x7b.yaml").read_text())
    section = params["trainer"]["init"]["model"]
    architecture = {k: v for k, v in section.items() if k not in ("name", "sparse_lora", "loss_scaling")}
    hf = json.loads(FIXTURE.read_text())
    check = check_architecture(architecture, hf, "mixtral")
    assert check.ok, check.mismatches
    assert {"moe.num_experts", "moe.top_k", "moe.load_balancing_loss_coef", "moe.router_use_bias"} <= set(
        check.compared
    )
    assert section["sparse_lora"]["target_modules"] == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "w1",
        "w2",
        "w3",
    ]
    wrong = dict(architecture, moe={**architecture["moe"], "top_k": 1})
    assert check_architecture(wrong, hf, "mixtral").mismatches == ["moe.top_k: run config 1, HF model 2"]
    defaults = dict(architecture, moe={"num_experts": 8, "top_k": 2})  # coef left at ModelZoo's 0.0
    assert any(
        m.startswith("moe.load_balancing_loss_coef")
        for m in check_architecture(defaults, hf, "mixtral").mismatches
    )
    with pytest.raises(UserError, match="router_jitter_noise"):
        check_architecture(architecture, {**hf, "router_jitter_noise": 0.1}, "mixtral")


def test_hf_and_cs_configs_round_trip_the_moe_keys():
    from modelzoo_ext.run_config import cs_to_hf_config, hf_to_cs_model_config

    hf = json.loads(FIXTURE.read_text())
    cs = hf_to_cs_model_config(hf, "mixtral")
    assert cs["moe"] == {
        "num_experts": 8,
        "top_k": 2,
        "load_balancing_loss_coef": 0.02,
        "moe_implementation": "optimized",
    }
    back = cs_to_hf_config(cs, "mixtral")
    for key in (
        "num_local_experts",
        "num_experts_per_tok",
        "router_aux_loss_coef",
        "sliding_window",
        "rope_theta",
    ):
        assert back[key] == hf[key], key
    assert back["architectures"] == ["MixtralForCausalLM"]
    with pytest.raises(UserError, match="model_type 'mixtral', expected 'llama'"):
        hf_to_cs_model_config(hf, "llama")  # never converted as Llama


# ------------------------------------------------------------------ reference trainer loss


def modelzoo_aux(router_logits, loss_mask, experts, top_k):
    """ModelZoo 2.10's LoadBalancingLoss written out per sample (losses/LoadBalancingLoss.py)."""
    batch, length = loss_mask.shape
    per_layer = []
    for logits in router_logits:
        p = torch.softmax(logits.reshape(batch, length, experts).float(), -1)
        d = torch.nn.functional.one_hot(p.topk(top_k, -1).indices, experts).sum(-2).float()
        m = loss_mask.float()[..., None]
        per_layer.append(((d * m).sum(1) / m.sum(1), (p * m).sum(1) / m.sum(1)))
    f = torch.stack([a for a, _ in per_layer]).mean(0)
    p = torch.stack([b for _, b in per_layer]).mean(0)
    return experts**2 * (f * p).mean()


def test_router_loss_sum_is_modelzoos_loss_times_the_batch_and_adds_over_slices():
    from gpu_reference.loss import aux_loss_sum

    gen = torch.Generator().manual_seed(1)
    logits = [torch.randn(3 * 7, E, generator=gen) for _ in range(2)]
    mask = (torch.rand(3, 7, generator=gen) < 0.6).int()
    mask[:, -1] = 1
    total = aux_loss_sum(logits, mask, E, 2)
    assert torch.allclose(total / 3, modelzoo_aux(logits, mask, E, 2), rtol=1e-6)
    halves = aux_loss_sum([x[:7] for x in logits], mask[:1], E, 2) + aux_loss_sum(
        [x[7:] for x in logits], mask[1:], E, 2
    )
    assert torch.allclose(halves, total, rtol=1e-6)  # ranks / micro-batches add exactly
    mask[1] = 0
    with pytest.raises(UserError, match="without loss tokens"):
        aux_loss_sum(logits, mask, E, 2)


@needs_per_expert_mixtral
def test_train_step_adds_the_router_loss_and_fills_unrouted_experts_gradients(tiny_mixtral_dir):
    from gpu_reference.loss import RouterLoss, loss_sums
    from gpu_reference.model import load_hf_model
    from gpu_reference.step import StepConfig, train_step
    from modelzoo_ext.sparse_lora import SparseLoRAConfig, apply_sparse_lora_

    model = load_hf_model(tiny_mixtral_dir)
    config = SparseLoRAConfig(
        mode="sparse_to_dense", r=2, dense_baseline=True, target_modules=["w1", "w2", "w3"]
    )
    apply_sparse_lora_(model, config, {})
    ids = torch.randint(0, 32000, (2, 6), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones(2, 6, dtype=torch.int32)}
    router = RouterLoss(num_experts=E, top_k=2, coef=0.02)
    aux = loss_sums(model, batch, False, torch.device("cpu"), router).router
    with torch.no_grad():
        out = model(input_ids=ids.long(), output_router_logits=True)
    assert torch.allclose(aux / 2, modelzoo_aux(out.router_logits, batch["attention_mask"], E, 2), rtol=1e-6)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.0)
    one_token = {k: v[:1, :1] for k, v in batch.items()}  # 1 token x top-2: at most 2 of 4 experts per layer
    result = train_step(model, optimizer, trainable, [one_token], StepConfig(batch_size=1, router=router))
    assert result.loss > 0
    assert (
        RouterLoss.from_model_section({"moe": {"num_experts": 8, "top_k": 2}}) is None
    )  # coef 0: nothing added


@pytest.mark.parametrize(
    "method,structure,scope",
    [("wanda", "unstructured", "global"), ("gradient", "unstructured", "layer"), ("taylor", "2:4", "layer"),
     ("random", "rows", "layer"), ("magnitude", "cols", "layer")],
)  # fmt: skip
def test_every_method_and_structure_masks_every_expert_and_never_the_router(
    tiny_mixtral_dir, tmp_path, method, structure, scope
):
    from modelzoo_ext.masks.calibration import CalibrationConfig
    from modelzoo_ext.masks.compute import MaskRequest, compute_masks
    from modelzoo_ext.masks.format import MaskFile

    if method in ("wanda", "gradient", "taylor") and transformers_major() >= 5:
        pytest.skip("calibration hooks the per-expert nn.Linear modules of transformers 4.x")
    request = MaskRequest(
        method=method, structure=structure, scope=scope, sparsities=(0.5,),
        calibration=CalibrationConfig(tokens=128, seq_len=32),
    )  # fmt: skip
    (result,) = compute_masks(tiny_mixtral_dir, request, tmp_path / "m.safetensors", plot=False)
    masks = MaskFile(tmp_path / "m.safetensors")
    assert result["achieved_sparsity"] == 0.5
    assert len([k for k in masks.keys() if ".experts." in k]) == 2 * E * 3  # noqa: SIM118
    assert len(masks) == 2 * (4 + E * 3) and not any(".gate." in k for k in masks.keys())  # noqa: SIM118


def test_mask_writer_streams_to_disk_and_writes_what_save_file_writes(tmp_path):
    """The writer holds one mask at a time (Mixtral-8x7B's masks are 5.6 GB packed) and still writes
    the exact bytes `safetensors.save_file` would, in any order of `add`."""
    from safetensors.torch import save_file

    from modelzoo_ext.masks.format import METADATA_KEY, MaskFile, MaskWriter, pack_bits

    gen = torch.Generator().manual_seed(0)
    masks = {f"model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight": torch.rand(9, 5, generator=gen) < 0.5
             for i in range(2) for e in range(3)}  # fmt: skip
    writer = MaskWriter(
        tmp_path / "m.safetensors", naming="hf", metadata={"source_model": {"directory": "/données"}}
    )
    for name in reversed(list(masks)):
        writer.add(name, masks[name])
    assert not hasattr(writer, "packed")  # nothing kept in memory but the per-tensor records
    metadata = writer.write()
    reference = {name: torch.from_numpy(pack_bits(mask.numpy())) for name, mask in masks.items()}
    save_file(
        reference,
        str(tmp_path / "ref.safetensors"),
        metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True)},
    )
    assert (tmp_path / "m.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert all(torch.equal(MaskFile(tmp_path / "m.safetensors").get(k), m) for k, m in masks.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "ref.safetensors"]  # no spool left
