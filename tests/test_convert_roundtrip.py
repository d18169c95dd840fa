"""HF -> CS -> HF is bit-exact for weights and masks; exports reproduce the sparse-LoRA model; errors leave nothing.

Needs cerebras-pytorch (`.mdl` files); ModelZoo is not used here (see test_convert_modelzoo.py).
The "fine-tuned" CS checkpoints are fabricated: the converted base plus random non-zero LoRA
factors, put under CS names by the rule table.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from mask_converters.cs_checkpoint import CSCheckpoint, LazyTensor, save_cs_checkpoint
from mask_converters.cs_to_hf import HF_MASKS_NAME, export_cs_to_hf
from mask_converters.hf_to_cs import CHECKPOINT_NAME, CONFIG_NAME, CS_MASKS_NAME, convert_hf_to_cs
from modelzoo_ext.cli import main as cli_main
from modelzoo_ext.errors import UserError
from modelzoo_ext.hf_checkpoint import HFCheckpoint
from modelzoo_ext.masks.format import MaskFile, load_masks, save_masks
from modelzoo_ext.masks.provenance import source_record
from modelzoo_ext.name_map import MASK_SUFFIX, RopeLayout, hf_to_cs_name, to_cs
from modelzoo_ext.sparse_lora import SparseLoRAConfig, apply_sparse_lora_, load_lora_state_dict_

pytestmark = pytest.mark.cs

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def random_masks(model_dir, seed=0, density=0.5):
    checkpoint = HFCheckpoint(model_dir)
    gen = torch.Generator().manual_seed(seed)
    return {
        name: torch.rand(checkpoint.shape(name), generator=gen) < density
        for name in checkpoint.keys()  # noqa: SIM118 (not a dict)
        if any(f".{t}." in name for t in TARGETS)
    }


def pruned_copy(model_dir, masks, out_dir):
    """The HF model with weights zeroed off the masks (what `masks apply` writes)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name in masks:
                tensor.copy_(torch.where(masks[name], tensor, torch.zeros(())))
    model.save_pretrained(out_dir, safe_serialization=True)
    for item in model_dir.iterdir():
        if "token" in item.name:
            shutil.copy(item, out_dir / item.name)
    return out_dir


@pytest.fixture(scope="module", params=["llama", "mistral"])
def pruned(request, tmp_path_factory, tiny_llama_dir, tiny_mistral_dir):
    """(family, pruned HF dir, HF mask file, masks dict, hf-to-cs output dir)."""
    family = request.param
    root = tmp_path_factory.mktemp(f"pruned_{family}")
    source = tiny_llama_dir if family == "llama" else tiny_mistral_dir
    masks = random_masks(source, seed=1)
    model_dir = pruned_copy(source, masks, root / "hf")
    mask_path = root / "masks.safetensors"
    # The copy is pruned by the masks (W*M == W): the masks describe it, so it is their source.
    source = source_record(HFCheckpoint(model_dir))
    save_masks(mask_path, masks, {"method": "random", "seed": 1, "source_model": source}, naming="hf")
    cs_dir = root / "cs"
    convert_hf_to_cs(model_dir, cs_dir, family, mask_path)
    return family, model_dir, mask_path, masks, cs_dir


def test_hf_to_cs_writes_masks_beside_their_weights(pruned):
    family, model_dir, _, masks, cs_dir = pruned
    checkpoint = CSCheckpoint(cs_dir / CHECKPOINT_NAME)
    layout = RopeLayout.from_hf_config(json.loads((model_dir / "config.json").read_text()))
    for hf_name, mask in masks.items():
        cs_name = hf_to_cs_name(hf_name, family)
        weight_cs = checkpoint.get(cs_name)
        mask_cs = checkpoint.get(cs_name + MASK_SUFFIX)
        assert mask_cs.dtype == torch.bool
        assert torch.equal(mask_cs, weight_cs != 0), hf_name  # convert(mask) == (convert(weight) != 0)
        assert torch.equal(mask_cs, to_cs(hf_name, mask, family, layout)[1])
    cs_masks = MaskFile(cs_dir / CS_MASKS_NAME)
    assert cs_masks.naming == "cs" and cs_masks.metadata["method"] == "random"
    for name in cs_masks.keys():  # noqa: SIM118 (not a dict)
        assert torch.equal(cs_masks.get(name), checkpoint.get(name + MASK_SUFFIX))
    section = yaml.safe_load((cs_dir / CONFIG_NAME).read_text())["trainer"]["init"]["model"]
    assert section["name"] == family and "norm_first" not in section
    assert section["extra_attention_params"] == {"num_kv_groups": 2}


def test_round_trip_is_bit_exact(pruned, tmp_path):
    family, model_dir, mask_path, masks, cs_dir = pruned
    out = tmp_path / "back"
    export_cs_to_hf(cs_dir / CHECKPOINT_NAME, cs_dir / CONFIG_NAME, out, base_model=model_dir, progress=False)
    original, back = HFCheckpoint(model_dir), HFCheckpoint(out)
    assert back.keys() == original.keys()
    for name in original.keys():  # noqa: SIM118 (not a dict)
        a, b = original.get(name), back.get(name)
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8)), name
    back_masks, _ = load_masks(out / HF_MASKS_NAME)
    assert back_masks.keys() == masks.keys()
    assert all(torch.equal(back_masks[k], masks[k]) for k in masks)


def test_unpruned_round_trip_without_masks_is_bit_exact(tiny_llama_sharded_dir, tmp_path):
    convert_hf_to_cs(tiny_llama_sharded_dir, tmp_path / "cs", "llama")
    assert not (tmp_path / "cs" / CS_MASKS_NAME).exists()
    export_cs_to_hf(
        tmp_path / "cs" / CHECKPOINT_NAME, tmp_path / "cs" / CONFIG_NAME, tmp_path / "hf", progress=False
    )
    original, back = HFCheckpoint(tiny_llama_sharded_dir), HFCheckpoint(tmp_path / "hf")
    assert back.keys() == original.keys()
    assert all(torch.equal(original.get(k), back.get(k)) for k in original.keys())  # noqa: SIM118
    config = json.loads((tmp_path / "hf" / "config.json").read_text())  # built from the CS config alone
    assert config["num_key_value_heads"] == 2 and config["model_type"] == "llama"


def test_mask_files_convert_both_ways(pruned, tmp_path):
    family, model_dir, mask_path, masks, cs_dir = pruned
    assert (
        cli_main(
            [
                "masks",
                "hf-to-cs",
                "--masks",
                str(mask_path),
                "--config",
                str(model_dir),
                "--family",
                family,
                "--out",
                str(tmp_path / "cs.safetensors"),
            ]
        )
        == 0
    )
    cs_masks, _ = load_masks(tmp_path / "cs.safetensors")
    expected, _ = load_masks(cs_dir / CS_MASKS_NAME)
    assert cs_masks.keys() == expected.keys() and all(torch.equal(cs_masks[k], expected[k]) for k in expected)
    assert (
        cli_main(
            [
                "masks",
                "cs-to-hf",
                "--masks",
                str(tmp_path / "cs.safetensors"),
                "--config",
                str(cs_dir / CONFIG_NAME),
                "--family",
                family,
                "--out",
                str(tmp_path / "hf.safetensors"),
            ]
        )
        == 0
    )
    back, meta = load_masks(tmp_path / "hf.safetensors")
    assert back.keys() == masks.keys() and all(torch.equal(back[k], masks[k]) for k in masks)
    assert meta["method"] == "random" and meta["naming"] == "hf"


# ----------------------------------------------------------------------------------------------
# Fine-tuned checkpoints: exports reproduce the sparse-LoRA model computed on the HF side.


def fabricate_finetuned(pruned, tmp_path, mode, seed=0):
    """A CS checkpoint = converted base + random non-zero LoRA (CS names); and the HF reference model."""
    from transformers import AutoModelForCausalLM

    family, model_dir, mask_path, masks, cs_dir = pruned
    config = SparseLoRAConfig(mode=mode, r=4, alpha=8.0, mask_path=str(mask_path), dropout=0.0)
    reference = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    apply_sparse_lora_(reference, config, masks)
    gen = torch.Generator().manual_seed(seed)
    lora = {}
    for name, tensor in reference.state_dict().items():
        if ".lora_" in name:
            lora[name] = torch.randn(tensor.shape, generator=gen) * 0.1  # B != 0: the merge matters
    load_lora_state_dict_(reference, lora)
    base = CSCheckpoint(cs_dir / CHECKPOINT_NAME)
    layout = RopeLayout.from_hf_config(json.loads((model_dir / "config.json").read_text()))
    state = {name: base.get(name) for name in base.keys()}  # noqa: SIM118 (not a dict)
    state.update(dict(to_cs(name, tensor, family, layout) for name, tensor in lora.items()))
    ckpt = tmp_path / "finetuned.mdl"
    section = yaml.safe_load((cs_dir / CONFIG_NAME).read_text())["trainer"]["init"]["model"]
    save_cs_checkpoint(
        ckpt, {k: LazyTensor(v.shape, v.dtype, lambda v=v: v) for k, v in state.items()}, section
    )
    run_yaml = tmp_path / "params.yaml"
    section = dict(section, name=f"sparse_lora_{family}", sparse_lora=config.model_dump())
    run_yaml.write_text(yaml.safe_dump({"trainer": {"init": {"model": section}}}))
    return ckpt, run_yaml, reference


def logits(model, seed=0):
    ids = torch.randint(0, 32000, (2, 10), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("mode", ["sparse_to_sparse", "sparse_to_dense"])
def test_merged_export_reproduces_the_model(pruned, tmp_path, mode):
    from transformers import AutoModelForCausalLM

    ckpt, run_yaml, reference = fabricate_finetuned(pruned, tmp_path, mode)
    out = tmp_path / "merged"
    summary = export_cs_to_hf(ckpt, run_yaml, out, base_model=pruned[1], progress=False)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert (logits(merged) - logits(reference)).abs().max() < 1e-5
    masks = pruned[3]
    state = merged.state_dict()
    if mode == "sparse_to_sparse":
        assert summary["sparsity_check"]["ok"] and summary["sparsity_check"]["matched"] == len(masks)
        assert all(int((state[k] != 0)[~m].sum()) == 0 for k, m in masks.items())
    else:  # s2d merges densely: the update lives off the mask too
        assert sum(int((state[k] != 0)[~m].sum()) for k, m in masks.items()) > 0
    assert (out / "tokenizer.model").exists()


def test_adapter_export_loads_with_peft(pruned, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ckpt, run_yaml, reference = fabricate_finetuned(pruned, tmp_path, "sparse_to_dense", seed=3)
    out = tmp_path / "adapter"
    export_cs_to_hf(ckpt, run_yaml, out, kind="adapter", base_model=pruned[1], progress=False)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(pruned[1]), out).eval()
    assert (logits(peft_model) - logits(reference)).abs().max() < 1e-5
    assert MaskFile(out / HF_MASKS_NAME).naming == "hf"


def test_s2s_cannot_be_an_adapter(pruned, tmp_path):
    ckpt, run_yaml, _ = fabricate_finetuned(pruned, tmp_path, "sparse_to_sparse")
    with pytest.raises(UserError, match="cannot be a PEFT adapter"):
        export_cs_to_hf(ckpt, run_yaml, tmp_path / "a", kind="adapter", progress=False)
    assert not (tmp_path / "a").exists()


def test_a_violation_writes_nothing(pruned, tmp_path, monkeypatch):
    from modelzoo_ext.sparse_lora import SparseLoRALinear

    ckpt, run_yaml, _ = fabricate_finetuned(pruned, tmp_path, "sparse_to_sparse")
    monkeypatch.setattr(SparseLoRALinear, "merged_weight", lambda self: self.weight.detach() + 1.0)
    with pytest.raises(UserError, match="nothing written"):
        export_cs_to_hf(ckpt, run_yaml, tmp_path / "m", progress=False)
    assert not (tmp_path / "m").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".m.")]


def test_mask_file_must_match_the_checkpoint_masks(pruned, tmp_path):
    family, model_dir, _, masks, _ = pruned
    ckpt, run_yaml, _ = fabricate_finetuned(pruned, tmp_path, "sparse_to_sparse")
    other = {k: ~m for k, m in masks.items()}
    save_masks(tmp_path / "other.safetensors", other, {"method": "x"})
    with pytest.raises(UserError, match="differs from the mask file"):
        export_cs_to_hf(
            ckpt, run_yaml, tmp_path / "m", masks_path=tmp_path / "other.safetensors", progress=False
        )
    assert not (tmp_path / "m").exists()


# ----------------------------------------------------------------------------------------------
# validate and the CLI's errors


def test_validate_both_namings(pruned, tmp_path, tiny_llama_dir):
    family, model_dir, mask_path, masks, cs_dir = pruned
    report = tmp_path / "r.json"
    assert (
        cli_main(
            ["validate", "--checkpoint", str(model_dir), "--masks", str(mask_path), "--out", str(report)]
        )
        == 0
    )
    data = json.loads(report.read_text())
    assert data["ok"] and data["matched"] == len(masks) and data["total_violations"] == 0
    assert (
        cli_main(["validate", "--checkpoint", str(cs_dir / CHECKPOINT_NAME), "--masks", str(mask_path)]) == 0
    )
    assert (
        cli_main(
            [
                "validate",
                "--checkpoint",
                str(cs_dir / CHECKPOINT_NAME),
                "--masks",
                str(cs_dir / CS_MASKS_NAME),
            ]
        )
        == 0
    )
    source = tiny_llama_dir if family == "llama" else model_dir.parent.parent
    if family == "llama":  # the unpruned model breaks the masks
        assert cli_main(["validate", "--checkpoint", str(source), "--masks", str(mask_path)]) == 1


def test_validate_is_never_valid_when_nothing_matched(pruned, tmp_path):
    family, model_dir, _, masks, _ = pruned
    renamed = {k.replace("model.layers", "model.blocks"): m for k, m in masks.items()}
    save_masks(tmp_path / "x.safetensors", renamed, {"method": "x"})
    report = tmp_path / "r.json"
    assert (
        cli_main(
            [
                "validate",
                "--checkpoint",
                str(model_dir),
                "--masks",
                str(tmp_path / "x.safetensors"),
                "--out",
                str(report),
            ]
        )
        == 1
    )
    data = json.loads(report.read_text())
    assert not data["ok"] and data["matched"] == 0 and len(data["missing"]) == len(masks)


def test_bad_inputs_exit_2_without_output(pruned, tmp_path, capsys):
    family, model_dir, mask_path, masks, _ = pruned
    out = tmp_path / "out"
    assert (
        cli_main(
            ["convert", "hf-to-cs", "--model", str(tmp_path / "nope"), "--family", family, "--out", str(out)]
        )
        == 2
    )
    wrong = {k: m[:, :-1] for k, m in masks.items()}
    save_masks(tmp_path / "wrong.safetensors", wrong, {"method": "x"})
    assert (
        cli_main(
            [
                "convert",
                "hf-to-cs",
                "--model",
                str(model_dir),
                "--masks",
                str(tmp_path / "wrong.safetensors"),
                "--family",
                family,
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "mask shapes differ" in capsys.readouterr().err
    assert not out.exists()


def test_unknown_hf_tensors_fail_the_conversion(tiny_llama_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    model_dir = tmp_path / "hf"
    shutil.copytree(tiny_llama_dir, model_dir)
    state = load_file(model_dir / "model.safetensors")
    state["model.layers.0.self_attn.extra_proj.weight"] = torch.zeros(2, 2)
    save_file(state, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="extra_proj"):
        convert_hf_to_cs(model_dir, tmp_path / "cs", "llama")
    assert not (tmp_path / "cs").exists()


def test_lora_layers_without_masks_are_refused(pruned, tmp_path):
    family, model_dir, _, masks, _ = pruned
    ckpt, run_yaml, _ = fabricate_finetuned(pruned, tmp_path, "sparse_to_sparse")
    partial = dict(sorted(masks.items())[:-1])
    save_masks(tmp_path / "partial.safetensors", partial, {"method": "x"})
    with pytest.raises(UserError, match="LoRA layers have no mask"):
        export_cs_to_hf(
            ckpt, run_yaml, tmp_path / "m", masks_path=tmp_path / "partial.safetensors", progress=False
        )
    assert not (tmp_path / "m").exists()
