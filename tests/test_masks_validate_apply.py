"""`validate` catches every flipped bit and every mismatch; `apply` writes exactly the masked model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from modelzoo_ext.errors import UserError
from modelzoo_ext.hf_checkpoint import HFCheckpoint
from modelzoo_ext.masks import load_masks, save_masks
from modelzoo_ext.masks.apply import apply_masks
from modelzoo_ext.masks.compute import MaskRequest, compute_masks
from modelzoo_ext.masks.validate import validate_masks


@pytest.fixture(scope="module")
def llama_masks(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("masks") / "m.safetensors"
    compute_masks(tiny_llama_dir, MaskRequest(scope="global", sparsities=(0.6,)), out, plot=False)
    return out


@pytest.fixture(scope="module")
def nm_masks(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("nm") / "m.safetensors"
    compute_masks(tiny_llama_dir, MaskRequest(structure="2:4"), out, plot=False)
    return out


def test_valid_file_passes_every_check(llama_masks, tiny_llama_dir):
    report = validate_masks(llama_masks, model_dir=tiny_llama_dir, expected_sparsity=0.6, tolerance=1e-4)
    assert report["valid"] and report["failures"] == 0
    checks = {c["check"].split(" model.")[0] for c in report["checks"]}
    assert {
        "source blake3",
        "shape",
        "checksum",
        "every targeted tensor has a mask",
        "expected sparsity",
    } <= checks


def test_every_flipped_bit_fails(llama_masks, tmp_path):
    data = llama_masks.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    # Every byte of the length prefix and of the tensor data, and a stride through the JSON header.
    positions = (
        list(range(8)) + list(range(8, 8 + header_len, 13)) + list(range(8 + header_len, len(data), 7))
    )
    tampered = tmp_path / "t.safetensors"
    for position in positions:
        flipped = bytearray(data)
        flipped[position] ^= 1 << (position % 8)
        tampered.write_bytes(bytes(flipped))
        assert not validate_masks(tampered)["valid"], f"flip at byte {position} went unnoticed"


def test_truncated_file_fails(llama_masks, tmp_path):
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(llama_masks.read_bytes()[:-100])
    report = validate_masks(truncated)
    assert not report["valid"] and report["checks"][0]["check"] == "file readable"


def test_n_m_pattern_violation_is_reported(nm_masks, tmp_path):
    masks, meta = load_masks(nm_masks)
    name = sorted(masks)[0]
    masks[name][0, :4] = torch.tensor([True, True, True, False])  # 3 of 4 kept
    keep = {k: v for k, v in meta.items() if k in ("method", "structure", "scope", "target_rule")}
    broken = tmp_path / "b.safetensors"
    save_masks(broken, masks, keep)
    report = validate_masks(broken)
    failed = [c["check"] for c in report["checks"] if not c["ok"]]
    assert failed == [f"2:4 pattern {name}"]


def test_mismatches_against_the_model(llama_masks, tiny_llama_dir, tiny_mistral_dir, tmp_path):
    # Same shapes, other weights: the recorded source sha256 catches it.
    report = validate_masks(llama_masks, model_dir=tiny_mistral_dir)
    failed = {c["check"].split(" ")[0] for c in report["checks"] if not c["ok"]}
    assert failed == {"source"}
    masks, meta = load_masks(llama_masks)
    rule = {"target_rule": meta["target_rule"]}
    # A mask for a tensor the model lacks, a wrong shape, and a targeted tensor left without mask.
    extra = dict(masks)
    extra["model.layers.7.mlp.up_proj.weight"] = torch.ones(128, 64, dtype=torch.bool)
    name = "model.layers.0.mlp.up_proj.weight"
    extra[name] = torch.ones(64, 64, dtype=torch.bool)
    del extra["model.layers.1.self_attn.v_proj.weight"]
    bad = tmp_path / "bad.safetensors"
    save_masks(bad, extra, rule)
    failed = {c["check"] for c in validate_masks(bad, model_dir=tiny_llama_dir)["checks"] if not c["ok"]}
    assert failed == {
        "tensor exists model.layers.7.mlp.up_proj.weight",
        f"shape {name}",
        "every targeted tensor has a mask",
    }
    report = validate_masks(llama_masks, expected_sparsity=0.5, tolerance=0.01)
    assert [c["check"] for c in report["checks"] if not c["ok"]] == ["expected sparsity"]


def _all_tensors(directory):
    return dict(HFCheckpoint(directory).iter_tensors())


@pytest.mark.parametrize("model_fixture", ["tiny_llama_dir", "tiny_llama_sharded_dir"])
def test_apply_zeroes_masked_positions_and_keeps_the_rest(request, llama_masks, tmp_path, model_fixture):
    model_dir = request.getfixturevalue(model_fixture)
    out = tmp_path / "pruned"
    record = apply_masks(model_dir, llama_masks, out)
    masks, _ = load_masks(llama_masks)
    before, after = _all_tensors(model_dir), _all_tensors(out)
    assert before.keys() == after.keys()
    for name, weight in before.items():
        if name in masks:
            assert (after[name][~masks[name]] == 0).all()
            assert torch.equal(
                after[name][masks[name]].view(torch.int32), weight[masks[name]].view(torch.int32)
            )
        else:
            assert torch.equal(after[name].view(torch.int32), weight.view(torch.int32))
    source_files = {p.name for p in model_dir.iterdir()}
    assert source_files | {"sparse_lora_pruning.json"} == {p.name for p in out.iterdir()}
    for shard in (p for p in model_dir.iterdir() if p.suffix == ".safetensors"):
        with (
            safe_open(str(shard), framework="pt") as a,
            safe_open(str(out / shard.name), framework="pt") as b,
        ):
            assert list(a.keys()) == list(b.keys()) and a.metadata() == b.metadata()
    for name in ("config.json", "tokenizer.json"):
        assert (out / name).read_bytes() == (model_dir / name).read_bytes()
    assert record["zeroed_positions"] == sum(int((~m).sum()) for m in masks.values())
    assert json.loads((out / "sparse_lora_pruning.json").read_text())["mask_file"] == str(
        llama_masks.resolve()
    )


def test_pruned_checkpoint_loads_in_transformers(llama_masks, tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "pruned"
    apply_masks(tiny_llama_dir, llama_masks, out)
    model = AutoModelForCausalLM.from_pretrained(out)
    masks, _ = load_masks(llama_masks)
    params = dict(model.named_parameters())
    assert all((params[name][~mask] == 0).all() for name, mask in masks.items())


def test_apply_refuses_masks_of_other_weights_and_leaves_nothing(llama_masks, tiny_mistral_dir, tmp_path):
    with pytest.raises(UserError, match="differs from the one the masks were computed for"):
        apply_masks(tiny_mistral_dir, llama_masks, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_apply_refuses_unknown_tensor_and_shape(llama_masks, tiny_llama_dir, tmp_path):
    masks, _ = load_masks(llama_masks)
    unknown = tmp_path / "unknown.safetensors"
    save_masks(unknown, {**masks, "model.layers.9.mlp.up_proj.weight": torch.ones(2, 2, dtype=torch.bool)})
    with pytest.raises(UserError, match="which the model lacks"):
        apply_masks(tiny_llama_dir, unknown, tmp_path / "out")
    shape = tmp_path / "shape.safetensors"
    save_masks(shape, {"model.layers.0.mlp.up_proj.weight": torch.ones(64, 128, dtype=torch.bool)})
    with pytest.raises(UserError, match="mask shape"):
        apply_masks(tiny_llama_dir, shape, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_apply_refuses_a_modified_weight(llama_masks, tiny_llama_dir, tmp_path):
    changed = tmp_path / "changed"
    shutil.copytree(tiny_llama_dir, changed)
    tensors = load_file(changed / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.weight"][0, 0] += 1.0
    save_file(tensors, changed / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="q_proj"):
        apply_masks(changed, llama_masks, tmp_path / "out")
    assert not (tmp_path / "out").exists()
