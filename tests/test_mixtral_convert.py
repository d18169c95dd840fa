"""Mixtral through the converters' files (needs cerebras-pytorch for `.mdl`, not ModelZoo):
HF -> CS -> HF bit-exact for weights, masks and LoRA factors; mask files both ways; `validate`
on a `.mdl` with fused expert masks.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mask_converters.cs_checkpoint import CSCheckpoint, LazyTensor, save_cs_checkpoint
from mask_converters.cs_to_hf import HF_MASKS_NAME, export_cs_to_hf
from mask_converters.hf_to_cs import CHECKPOINT_NAME, CONFIG_NAME, convert_hf_to_cs
from modelzoo_ext.cli import main as cli_main
from modelzoo_ext.hf_checkpoint import HFCheckpoint
from modelzoo_ext.masks.format import MaskFile, load_masks, save_masks
from modelzoo_ext.name_map import MASK_SUFFIX, RopeLayout, group_by_cs, to_cs_stacked

pytestmark = pytest.mark.cs

E = 4


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, tokenizer_dir):
    """(pruned tiny Mixtral dir, its mask file, masks, hf-to-cs output dir): per-tensor 50% magnitude,
    pruned by `masks apply` (exact +0.0 off the mask, as users' pruned checkpoints are)."""
    from modelzoo_ext.masks.apply import apply_masks
    from modelzoo_ext.study.tiny_assets import make_tiny_assets

    root = tmp_path_factory.mktemp("mixtral_convert")
    paths = make_tiny_assets(root, family="mixtral", tokenizer_from=tokenizer_dir)
    masks, _ = load_masks(paths["masks"])
    apply_masks(paths["hf"], paths["masks"], root / "hf_pruned")
    convert_hf_to_cs(root / "hf_pruned", root / "cs_masked", "mixtral", paths["masks"])
    return root / "hf_pruned", paths["masks"], masks, root / "cs_masked"


def test_hf_to_cs_to_hf_is_bit_exact_for_weights_and_masks(pruned, tmp_path):
    model_dir, _, masks, cs_dir = pruned
    checkpoint = CSCheckpoint(cs_dir / CHECKPOINT_NAME)
    fused = [k for k in checkpoint.keys() if k.endswith("expert_weights_mask")]  # noqa: SIM118
    assert len(fused) == 6 and all(checkpoint.shape(k)[1] == E for k in fused)
    for key in fused:  # the embedded mask is the pruned weight's support, expert by expert
        assert torch.equal(checkpoint.get(key), checkpoint.get(key[: -len(MASK_SUFFIX)]) != 0)
    out = tmp_path / "back"
    export_cs_to_hf(cs_dir / CHECKPOINT_NAME, cs_dir / CONFIG_NAME, out, base_model=model_dir, progress=False)
    original, back = HFCheckpoint(model_dir), HFCheckpoint(out)
    assert back.keys() == original.keys()
    for name in original.keys():  # noqa: SIM118
        a, b = original.get(name), back.get(name)
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8)), name
    back_masks, _ = load_masks(out / HF_MASKS_NAME)
    assert back_masks.keys() == masks.keys() and all(torch.equal(back_masks[k], masks[k]) for k in masks)
    config = json.loads((out / "config.json").read_text())
    assert config["num_local_experts"] == E and config["model_type"] == "mixtral"


def test_mask_files_convert_both_ways_bit_exact(pruned, tmp_path):
    model_dir, mask_path, masks, _ = pruned
    cs_file, hf_file = tmp_path / "cs.safetensors", tmp_path / "hf.safetensors"
    assert cli_main(["masks", "hf-to-cs", "--masks", str(mask_path), "--config", str(model_dir),
                     "--family", "mixtral", "--out", str(cs_file)]) == 0  # fmt: skip
    cs = MaskFile(cs_file)
    fused = "model.transformer_decoder.layers.1.ffn.experts.fused_ffns.1.linear_layer.expert_weights"
    assert cs.naming == "cs" and tuple(cs.shape(fused)) == (64, E, 96)
    assert cli_main(["masks", "cs-to-hf", "--masks", str(cs_file), "--config", str(model_dir),
                     "--family", "mixtral", "--out", str(hf_file)]) == 0  # fmt: skip
    back, _ = load_masks(hf_file)
    assert back.keys() == masks.keys() and all(torch.equal(back[k], masks[k]) for k in masks)


def test_lora_factors_round_trip_through_a_cs_checkpoint_into_the_adapter_bit_exact(pruned, tmp_path):
    """Per-expert HF factors -> stacked CS factors in a `.mdl` -> `cs-to-hf --as adapter` -> the same bits."""
    model_dir, mask_path, masks, cs_dir = pruned
    gen = torch.Generator().manual_seed(2)
    lora = {}
    for name, mask in masks.items():
        module = name.removesuffix(".weight")
        lora[f"{module}.lora_A.weight"] = torch.randn(4, mask.shape[1], generator=gen)
        lora[f"{module}.lora_B.weight"] = torch.randn(mask.shape[0], 4, generator=gen)
    layout = RopeLayout.from_hf_config(json.loads((model_dir / "config.json").read_text()))
    groups = group_by_cs(lora, "mixtral", E, where="test")
    state = {
        cs: to_cs_stacked(cs, [(n, lora[n]) for n in parts], "mixtral", layout)
        for cs, parts in groups.items()
    }
    assert state[
        "model.transformer_decoder.layers.0.ffn.experts.fused_ffns.0.linear_layer.lora_A.weight"
    ].shape == (
        4,
        E,
        64,
    )
    base = CSCheckpoint(cs_dir / CHECKPOINT_NAME)
    state.update({k: base.get(k) for k in base.keys()})  # noqa: SIM118
    section = yaml.safe_load((cs_dir / CONFIG_NAME).read_text())["trainer"]["init"]["model"]
    ckpt = tmp_path / "checkpoint_3.mdl"
    save_cs_checkpoint(
        ckpt, {k: LazyTensor(v.shape, v.dtype, lambda v=v: v) for k, v in state.items()}, section
    )
    sparse_lora = {"mode": "sparse_to_dense", "r": 4, "alpha": 8.0, "mask_path": str(mask_path)}
    run_yaml = tmp_path / "params.yaml"
    run_yaml.write_text(
        yaml.safe_dump({"trainer": {"init": {"model": dict(section, sparse_lora=sparse_lora)}}})
    )
    export_cs_to_hf(
        ckpt, run_yaml, tmp_path / "adapter", kind="adapter", base_model=model_dir, progress=False
    )
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert {k.removeprefix("base_model.model.") for k in adapter} == set(lora)
    assert all(torch.equal(adapter[f"base_model.model.{k}"], v) for k, v in lora.items())


def test_validate_checks_every_expert_of_a_cs_checkpoint(pruned, tmp_path):
    _, mask_path, masks, cs_dir = pruned
    ckpt = cs_dir / CHECKPOINT_NAME
    assert (
        cli_main(
            [
                "validate",
                "--checkpoint",
                str(ckpt),
                "--masks",
                str(mask_path),
                "--out",
                str(tmp_path / "r.json"),
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["matched"] == 2 * (4 + 3) and report["total_violations"] == 0
    expert = "model.layers.1.block_sparse_moe.experts.2.w3.weight"  # flip one kept position of one expert
    flipped = dict(masks)
    flipped[expert] = masks[expert].clone()
    flipped[expert][masks[expert].nonzero()[0].tolist()[0], masks[expert].nonzero()[0].tolist()[1]] = False
    save_masks(tmp_path / "flipped.safetensors", flipped, naming="hf")
    assert (
        cli_main(["validate", "--checkpoint", str(ckpt), "--masks", str(tmp_path / "flipped.safetensors")])
        != 0
    )


def test_a_mixtral_checkpoint_is_not_converted_as_llama(pruned, tmp_path):
    model_dir, _, _, _ = pruned
    assert (
        cli_main(
            [
                "convert",
                "hf-to-cs",
                "--model",
                str(model_dir),
                "--family",
                "llama",
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert not (tmp_path / "x").exists()
