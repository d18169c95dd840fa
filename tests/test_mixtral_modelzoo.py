"""Mixtral against the real ModelZoo 2.10 on the CPU: ModelZoo's own converter as the reference,
the `sparse_lora_mixtral` variant's fused-expert LoRA, exports back to HF (merged and PEFT
adapter), and `cszoo checkpoint convert` through our registry entries.

The tiny Mixtral: 2 layers, hidden 64, intermediate 96, GQA 4/2 heads, 4 experts, top-2, saved
sharded (ModelZoo's converter reads sharded checkpoints only). "Fine-tuned" = random non-zero
LoRA factors in the CS model, masked base weights.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import get_cstorch_cpu_backend

from mask_converters.cs_checkpoint import CSCheckpoint, LazyTensor, save_cs_checkpoint
from mask_converters.cs_to_hf import export_cs_to_hf
from mask_converters.hf_to_cs import CHECKPOINT_NAME, CONFIG_NAME, convert_hf_to_cs
from modelzoo_ext.hf_checkpoint import HFCheckpoint
from modelzoo_ext.masks.format import save_masks
from modelzoo_ext.masks.provenance import source_record
from modelzoo_ext.name_map import MASK_SUFFIX

pytestmark = [pytest.mark.modelzoo, pytest.mark.cs]

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3")


@contextlib.contextmanager
def metric_sink():
    """ModelZoo's MoE forward logs router statistics (`summarize_scalar`), which raises outside a
    Trainer run: a stand-in trainer that drops them, for plain forwards in tests."""
    from cerebras.modelzoo.trainer.callbacks.summaries import _GLOBAL_SUMMARIES

    class Sink:
        def log_metrics(self, **_):
            pass

    _GLOBAL_SUMMARIES._trainer_stack.append(Sink())
    try:
        yield
    finally:
        _GLOBAL_SUMMARIES._trainer_stack.pop()


def cs_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """The logits of ModelZoo's GPT2LMHeadModel (with MoE it also returns routing weights and masks)."""
    with torch.no_grad(), metric_sink():
        out = model.model(input_ids=ids)
    return out[0] if isinstance(out, tuple) else out


def input_ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 32000, (2, 12), generator=torch.Generator().manual_seed(seed))


def run_cszoo(monkeypatch, args: list[str]) -> None:
    """The real `cszoo` entry point, in this process (our registry entries added first)."""
    from cerebras.modelzoo.cli.main import main as cszoo_main

    from modelzoo_ext.cerebras.registration import register_all

    register_all()
    monkeypatch.setattr(sys, "argv", ["cszoo", *args])
    try:
        cszoo_main()
    except SystemExit as exc:
        assert exc.code in (0, None)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_dir):
    """(HF dir (sharded), HF masks, converted dir, model section)."""
    from modelzoo_ext.tiny_models import save_tiny_model

    root = tmp_path_factory.mktemp("mz_mixtral")
    source = save_tiny_model(
        root / "hf", "mixtral", seed=0, tokenizer_from=tokenizer_dir, max_shard_size="1MB"
    )
    checkpoint = HFCheckpoint(source)
    gen = torch.Generator().manual_seed(5)
    masks = {
        n: torch.rand(checkpoint.shape(n), generator=gen) < 0.6
        for n in checkpoint.keys()  # noqa: SIM118 (not a dict)
        if n.rsplit(".", 2)[-2] in TARGETS
    }
    save_masks(
        root / "masks.safetensors", masks, {"method": "random", "source_model": source_record(checkpoint)}
    )
    convert_hf_to_cs(source, root / "cs", "mixtral", root / "masks.safetensors")
    section = yaml.safe_load((root / "cs" / CONFIG_NAME).read_text())["trainer"]["init"]["model"]
    return source, masks, root, section


def test_our_hf_to_cs_equals_modelzoos_own_mixtral_converter(tiny, tmp_path, monkeypatch):
    from modelzoo_ext.cerebras.converters import newest_stock_cs_format

    source, masks, root, section = tiny
    fmt = newest_stock_cs_format("mixtral")  # cs-2.9 in ModelZoo 2.10, cs-2.5 in 2.6
    run_cszoo(monkeypatch, ["checkpoint", "convert", "--model", "mixtral", "--src-fmt", "hf", "--tgt-fmt", fmt,
                            "--config", str(source / "config.json"), str(source / "model.safetensors.index.json"),
                            "--output-dir", str(tmp_path / "mz")])  # fmt: skip
    theirs = CSCheckpoint(tmp_path / "mz" / f"model_to_{fmt}.mdl")
    ours = CSCheckpoint(root / "cs" / CHECKPOINT_NAME)
    weights = [k for k in ours.keys() if not k.endswith(MASK_SUFFIX)]  # noqa: SIM118
    assert sorted(theirs.keys()) == sorted(weights)
    assert all(torch.equal(theirs.get(k), ours.get(k)) for k in weights)
    fused = [k for k in weights if k.endswith("expert_weights")]
    assert len(fused) == 2 * 3 and ours.shape(fused[0])[1] == 4
    assert len([k for k in ours.keys() if k.endswith("expert_weights_mask")]) == 6  # noqa: SIM118
    their_model = yaml.safe_load((tmp_path / "mz" / f"config_to_{fmt}.yaml").read_text())["model"]
    assert {k: v for k, v in section["moe"].items() if k != "moe_implementation"} == their_model["moe"]
    assert (
        section["moe"]["moe_implementation"] == "optimized"
    )  # theirs leaves it out: `experimental` can't load


def test_converted_checkpoint_loads_strictly_and_gives_the_hf_logits(tiny):
    from cerebras.modelzoo.models.nlp.mixtral.model import MixtralModel, MixtralModelConfig
    from transformers import AutoModelForCausalLM

    source, _, root, section = tiny
    get_cstorch_cpu_backend()
    model = MixtralModel(MixtralModelConfig(**section)).eval()
    state = CSCheckpoint(root / "cs" / CHECKPOINT_NAME)
    model.load_state_dict({k: state.get(k) for k in state.keys() if not k.endswith(MASK_SUFFIX)}, strict=True)  # noqa: SIM118
    hf = AutoModelForCausalLM.from_pretrained(source).eval()
    with torch.no_grad():
        difference = (cs_logits(model, input_ids()) - hf(input_ids=input_ids()).logits).abs().max()
    assert difference < 1e-5


def test_cstorch_sparse_matmul_is_the_reference_one_bit_for_bit():
    from modelzoo_ext.cerebras.model import cs_sparse_matmul
    from modelzoo_ext.sparse_lora import reference_sparse_matmul

    get_cstorch_cpu_backend()
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 5, 2, 16, generator=gen), torch.randn(24, 4, 16, generator=gen)
    idx = torch.stack([torch.randperm(4, generator=gen)[:2] for _ in range(10)]).reshape(2, 5, 2)
    assert torch.equal(cs_sparse_matmul(x, idx, w), reference_sparse_matmul(x, idx, w))


def sparse_lora_mixtral(section: dict, masks_path: Path, mode: str):
    """The registered variant built from a run config section (masks read through the model's view)."""
    from modelzoo_ext.cerebras.config import SparseLoRAMixtralModelConfig
    from modelzoo_ext.cerebras.model import SparseLoRAMixtralModel

    sparse_lora = {
        "mode": mode,
        "r": 4,
        "alpha": 16.0,
        "mask_path": str(masks_path),
        "target_modules": list(TARGETS),
    }
    run_section = dict(section, name="sparse_lora_mixtral", sparse_lora=sparse_lora)
    get_cstorch_cpu_backend()
    return SparseLoRAMixtralModel(SparseLoRAMixtralModelConfig(**run_section)), run_section


def test_variant_puts_stacked_lora_on_every_expert_and_seeds_it_like_the_hf_side(tiny):
    from transformers import AutoModelForCausalLM

    from modelzoo_ext.sparse_lora import (
        SparseLoRAConfig,
        SparseLoRAExperts,
        apply_sparse_lora_,
        sparse_lora_modules,
    )

    source, masks, root, section = tiny
    model, run_section = sparse_lora_mixtral(section, root / "masks.safetensors", "sparse_to_dense")
    layers = sparse_lora_modules(model)
    fused = {n: m for n, m in layers.items() if isinstance(m, SparseLoRAExperts)}
    assert len(layers) == 2 * 7 and len(fused) == 6
    assert not any(".ffn.gate" in n for n in layers)  # never the router
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    hf = AutoModelForCausalLM.from_pretrained(source)
    apply_sparse_lora_(hf, SparseLoRAConfig(**run_section["sparse_lora"]), masks)
    w1 = "model.transformer_decoder.layers.1.ffn.experts.fused_ffns.0.linear_layer_for_glu"
    for e in range(4):
        hf_a = hf.get_submodule(f"model.layers.1.block_sparse_moe.experts.{e}.w1").lora_A.weight
        assert torch.equal(model.get_submodule(w1).lora_A.weight[:, e], hf_a)  # both backends start alike


def finetuned_checkpoint(tiny, tmp_path: Path, mode: str):
    """A CS checkpoint of the variant: base masked (as cstorch keeps it), random non-zero LoRA,
    `<param>_mask` entries; returns (checkpoint, run YAML, the CS model's logits)."""
    source, masks, root, section = tiny
    model, run_section = sparse_lora_mixtral(section, root / "masks.safetensors", mode)
    base = CSCheckpoint(root / "cs" / CHECKPOINT_NAME)
    weights = {k: base.get(k) for k in base.keys() if not k.endswith(MASK_SUFFIX)}  # noqa: SIM118
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and all(".lora_" in k for k in missing)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, mask in model.masks.items():  # what cstorch's hook leaves in W
            model.get_parameter(name).mul_(mask)
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state.update({f"{name}{MASK_SUFFIX}": mask for name, mask in model.masks.items()})
    ckpt = tmp_path / "checkpoint_10.mdl"
    save_cs_checkpoint(
        ckpt, {k: LazyTensor(v.shape, v.dtype, lambda v=v: v) for k, v in state.items()}, section
    )
    run_yaml = tmp_path / "params.yaml"
    run_yaml.write_text(yaml.safe_dump({"trainer": {"init": {"model": run_section}}}))
    return ckpt, run_yaml, cs_logits(model.eval(), input_ids(1))


@pytest.mark.parametrize("mode", ["sparse_to_sparse", "sparse_to_dense"])
def test_merged_export_reproduces_the_cs_model_with_zero_violations(tiny, tmp_path, mode):
    from transformers import AutoModelForCausalLM

    source, masks, _, _ = tiny
    ckpt, run_yaml, cs_logits = finetuned_checkpoint(tiny, tmp_path, mode)
    summary = export_cs_to_hf(ckpt, run_yaml, tmp_path / "merged", base_model=source, progress=False)
    assert summary["sparsity_check"]["matched"] == len(masks) == 2 * (4 + 4 * 3)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert (merged(input_ids=input_ids(1)).logits - cs_logits).abs().max() < 1e-5
    if mode == "sparse_to_sparse":
        assert summary["sparsity_check"]["total_violations"] == 0
        state = merged.state_dict()
        assert all(not state[k][~m].any() for k, m in masks.items())


def test_adapter_export_loads_with_peft_and_reproduces_the_cs_model(tiny, tmp_path):
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    source, masks, _, _ = tiny
    ckpt, run_yaml, cs_logits = finetuned_checkpoint(tiny, tmp_path, "sparse_to_dense")
    export_cs_to_hf(ckpt, run_yaml, tmp_path / "adapter", kind="adapter", base_model=source, progress=False)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj", "w1", "w2", "w3"]
    assert config["lora_dropout"] == 0.0
    base = AutoModelForCausalLM.from_pretrained(source)
    with torch.no_grad():  # the pruned HF base the adapter is for
        for name, tensor in base.state_dict().items():
            if name in masks:
                tensor.mul_(masks[name])
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    wrapped = [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and ".experts." in n]
    assert len(wrapped) == 2 * 4 * 3 and not any(
        n.endswith("block_sparse_moe.gate") for n, _ in peft_model.named_modules() if hasattr(_, "lora_A")
    )
    with torch.no_grad():
        assert (peft_model(input_ids=input_ids(1)).logits - cs_logits).abs().max() < 1e-5


def test_cszoo_checkpoint_convert_sparse_lora_mixtral_both_ways(tiny, tmp_path, monkeypatch):
    """Our registry entry: hf -> cs-X.Y (the installed release) equals `convert hf-to-cs`; cs-auto -> hf
    keeps per-expert LoRA and masks."""
    from safetensors.torch import load_file

    from modelzoo_ext.cerebras.converters import our_cs_formats

    source, masks, root, _ = tiny
    fmt = our_cs_formats()[-1]
    run_cszoo(monkeypatch, ["checkpoint", "convert", "--model", "sparse_lora_mixtral", "--src-fmt", "hf", "--tgt-fmt",
                            fmt, "--config", str(source / "config.json"), str(source / "model.safetensors.index.json"),
                            "--output-dir", str(tmp_path / "to_cs")])  # fmt: skip
    theirs = CSCheckpoint(tmp_path / "to_cs" / f"model_to_{fmt}.mdl")
    ours = CSCheckpoint(root / "cs" / CHECKPOINT_NAME)
    assert set(theirs.keys()) == {k for k in ours.keys() if not k.endswith(MASK_SUFFIX)}  # noqa: SIM118
    assert all(torch.equal(theirs.get(k), ours.get(k)) for k in theirs.keys())  # noqa: SIM118
    config = yaml.safe_load((tmp_path / "to_cs" / f"config_to_{fmt}.yaml").read_text())["model"]
    assert config["moe"]["moe_implementation"] == "optimized" and "norm_first" not in config

    ckpt, run_yaml, _ = finetuned_checkpoint(tiny, tmp_path, "sparse_to_dense")
    run_cszoo(monkeypatch, ["checkpoint", "convert", "--model", "sparse_lora_mixtral", "--src-fmt", "cs-auto",
                            "--tgt-fmt", "hf", "--config", str(run_yaml), str(ckpt), "--output-dir",
                            str(tmp_path / "to_hf"), "--export-safetensors"])  # fmt: skip
    tensors = {}
    for shard in (tmp_path / "to_hf" / "checkpoint_10_to_hf").glob("*.safetensors"):
        tensors.update(load_file(shard))
    assert len([k for k in tensors if ".lora_" in k]) == 2 * len(masks)
    assert all(torch.equal(tensors[k + MASK_SUFFIX].bool(), m) for k, m in masks.items())
    assert "model.layers.0.block_sparse_moe.experts.3.w2.lora_B.weight" in tensors
