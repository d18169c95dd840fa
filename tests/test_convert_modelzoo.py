"""Against the real ModelZoo 2.10 on the CPU: converted checkpoints load into ModelZoo models and give
the HF logits; a fine-tuned CS checkpoint exported as adapter and as merged reproduces the CS model;
`cszoo checkpoint convert --model sparse_lora_llama` works through our registry entries.

The CS model is ModelZoo's stock LlamaModel/MistralModel (built from the `model_config.yaml` that
`convert hf-to-cs` writes) with the shared sparse-LoRA layers put on its linears by attribute name,
as the `sparse_lora_*` variants do. "Fine-tuned" = random non-zero LoRA factors in the CS model.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
import yaml

from mask_converters.cs_checkpoint import CSCheckpoint, LazyTensor, save_cs_checkpoint
from mask_converters.cs_to_hf import export_cs_to_hf
from mask_converters.hf_to_cs import CHECKPOINT_NAME, CONFIG_NAME, convert_hf_to_cs
from modelzoo_ext.hf_checkpoint import HFCheckpoint
from modelzoo_ext.masks.format import save_masks
from modelzoo_ext.masks.provenance import source_record
from modelzoo_ext.name_map import MASK_SUFFIX, hf_module_to_cs_module
from modelzoo_ext.sparse_lora import SparseLoRAConfig, apply_sparse_lora_

pytestmark = [pytest.mark.modelzoo, pytest.mark.cs]

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def modelzoo_model(section: dict):
    """ModelZoo's own model class for the `model:` section (llama or mistral)."""
    from cerebras.modelzoo.models.nlp.llama.model import LlamaModel, LlamaModelConfig
    from cerebras.modelzoo.models.nlp.mistral.model import MistralModel, MistralModelConfig

    if section["name"] == "llama":
        return LlamaModel(LlamaModelConfig(**section))
    return MistralModel(MistralModelConfig(**section))


def input_ids(seed=0):
    return torch.randint(0, 32000, (2, 12), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=["llama", "mistral"])
def converted(request, tmp_path_factory, tiny_llama_dir, tiny_mistral_dir):
    """(family, HF dir, HF masks, hf-to-cs output dir, model section)."""
    family = request.param
    source = tiny_llama_dir if family == "llama" else tiny_mistral_dir
    root = tmp_path_factory.mktemp(f"mz_{family}")
    checkpoint = HFCheckpoint(source)
    gen = torch.Generator().manual_seed(5)
    masks = {
        n: torch.rand(checkpoint.shape(n), generator=gen) < 0.6
        for n in checkpoint.keys()  # noqa: SIM118 (not a dict)
        if any(f".{t}." in n for t in TARGETS)
    }
    save_masks(
        root / "masks.safetensors",
        masks,
        {"method": "random", "source_model": source_record(checkpoint)},
        naming="hf",
    )
    convert_hf_to_cs(source, root / "cs", family, root / "masks.safetensors")
    section = yaml.safe_load((root / "cs" / CONFIG_NAME).read_text())["trainer"]["init"]["model"]
    return family, source, masks, root, section


def test_converted_checkpoint_loads_strictly_and_matches_hf_logits(converted):
    """A CS model on the CPU, loaded from our .mdl, gives the HF model's logits."""
    from transformers import AutoModelForCausalLM

    family, source, _, root, section = converted
    model = modelzoo_model(section).eval()
    state = CSCheckpoint(root / "cs" / CHECKPOINT_NAME)
    weights = {k: state.get(k) for k in state.keys() if not k.endswith(MASK_SUFFIX)}  # noqa: SIM118
    model.load_state_dict(weights, strict=True)
    hf = AutoModelForCausalLM.from_pretrained(source).eval()
    with torch.no_grad():
        difference = (model.model(input_ids=input_ids()) - hf(input_ids=input_ids()).logits).abs().max()
    assert difference < 1e-5


def finetuned_cs_model(converted, tmp_path, mode):
    """A CS model with masked base weights and random non-zero LoRA, saved as a .mdl + run YAML."""
    family, _, _, root, section = converted
    base = CSCheckpoint(root / "cs" / CHECKPOINT_NAME)
    state = {k: base.get(k) for k in base.keys()}  # noqa: SIM118 (not a dict)
    masks = {k[: -len(MASK_SUFFIX)]: v for k, v in state.items() if k.endswith(MASK_SUFFIX)}
    for name, mask in masks.items():  # what cstorch sparsity leaves in W during training
        state[name] = torch.where(mask, state[name], torch.zeros(()))
    config = SparseLoRAConfig(mode=mode, r=4, alpha=16.0, mask_path=str(root / "masks.safetensors"))
    model = modelzoo_model(section)
    targets = [hf_module_to_cs_module(t, family) for t in config.target_modules]
    apply_sparse_lora_(model, config, masks, target_modules=targets)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    model_state = model.state_dict()
    model.load_state_dict(
        {k: state[k] if ".lora_" not in k else v for k, v in model_state.items()}, strict=True
    )
    to_save = {k: v.detach().clone() for k, v in model.state_dict().items()}
    to_save.update({k: v for k, v in state.items() if k.endswith(MASK_SUFFIX)})
    ckpt = tmp_path / "checkpoint_10.mdl"
    save_cs_checkpoint(
        ckpt, {k: LazyTensor(v.shape, v.dtype, lambda v=v: v) for k, v in to_save.items()}, section
    )
    run_yaml = tmp_path / "params.yaml"
    run_section = dict(section, name=f"sparse_lora_{family}", sparse_lora=config.model_dump())
    run_yaml.write_text(yaml.safe_dump({"trainer": {"init": {"model": run_section}}}))
    with torch.no_grad():
        cs_logits = model.eval().model(input_ids=input_ids(1))
    return ckpt, run_yaml, cs_logits


@pytest.mark.parametrize("mode", ["sparse_to_sparse", "sparse_to_dense"])
def test_merged_export_reproduces_the_cs_model(converted, tmp_path, mode):
    from transformers import AutoModelForCausalLM

    family, source, masks, _, _ = converted
    ckpt, run_yaml, cs_logits = finetuned_cs_model(converted, tmp_path, mode)
    out = tmp_path / "merged"
    export_cs_to_hf(ckpt, run_yaml, out, base_model=source, progress=False)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert (merged(input_ids=input_ids(1)).logits - cs_logits).abs().max() < 1e-5
    if mode == "sparse_to_sparse":
        state = merged.state_dict()
        assert all(int((state[k] != 0)[~m].sum()) == 0 for k, m in masks.items())


def test_adapter_export_reproduces_the_cs_model(converted, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    family, source, masks, _, _ = converted
    ckpt, run_yaml, cs_logits = finetuned_cs_model(converted, tmp_path, "sparse_to_dense")
    out = tmp_path / "adapter"
    export_cs_to_hf(ckpt, run_yaml, out, kind="adapter", base_model=source, progress=False)
    base = AutoModelForCausalLM.from_pretrained(source)
    with torch.no_grad():  # the pruned HF base the adapter is for
        for name, tensor in base.state_dict().items():
            if name in masks:
                tensor.copy_(torch.where(masks[name], tensor, torch.zeros(())))
    peft_model = PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        assert (peft_model(input_ids=input_ids(1)).logits - cs_logits).abs().max() < 1e-5


def register_for_cszoo() -> None:
    """What `modelzoo_ext.cerebras.registration` does in a `cszoo` process: model names, then converters."""
    from cerebras.modelzoo.registry.registry import registry

    from modelzoo_ext.cerebras.converters import register_converters

    processors = ("cerebras.modelzoo.data.nlp.gpt.GptHDF5MapDataProcessor.GptHDF5MapDataProcessor",)
    for family in ("llama", "mistral"):
        name = f"sparse_lora_{family}"
        if name not in registry.get_model_names():
            path = f"modelzoo_ext.cerebras.model.SparseLoRA{family.title()}Model"
            registry.register_model(name=name, path=path, data_processor_paths=processors)
    register_converters()
    register_converters()  # idempotent


def test_cszoo_checkpoint_convert_keeps_lora_and_masks(converted, tmp_path, monkeypatch):
    """`cszoo checkpoint convert --model sparse_lora_<family> --src-fmt cs-auto --tgt-fmt hf` (2.10 checkpoint)."""
    from safetensors.torch import load_file

    from modelzoo_ext.cerebras.converters import converter_classes

    family, _, masks, _, _ = converted
    ckpt, run_yaml, _ = finetuned_cs_model(converted, tmp_path, "sparse_to_dense")
    args = [
        "checkpoint",
        "convert",
        "--model",
        f"sparse_lora_{family}",
        "--src-fmt",
        "cs-auto",
        "--tgt-fmt",
        "hf",
        "--config",
        str(run_yaml),
        str(ckpt),
        "--output-dir",
        str(tmp_path / "out"),
        "--export-safetensors",
    ]
    register_for_cszoo()
    from cerebras.modelzoo.cli.main import main as cszoo_main

    monkeypatch.setattr(sys, "argv", ["cszoo", *args])
    try:
        cszoo_main()  # the real `cszoo` entry point, in this process
    except SystemExit as exc:
        assert exc.code in (0, None)
    out_dir = tmp_path / "out" / "checkpoint_10_to_hf"
    tensors = {}
    for shard in out_dir.glob("*.safetensors"):
        tensors.update(load_file(shard))
    lora = [k for k in tensors if ".lora_" in k]
    assert len(lora) == 2 * len(masks)
    assert {k[: -len(MASK_SUFFIX)] for k in tensors if k.endswith(MASK_SUFFIX)} == set(masks)
    assert all(torch.equal(tensors[k + MASK_SUFFIX].bool(), m) for k, m in masks.items())
    assert json.loads((out_dir / "config.json").read_text())["model_type"] == family
    assert f"sparse_lora_{family}" in converter_classes()


def test_cszoo_hf_to_cs_equals_our_conversion(converted, tmp_path, monkeypatch, tokenizer_dir):
    """`cszoo checkpoint convert --src-fmt hf --tgt-fmt cs-X.Y` (the installed release) on a sharded HF
    checkpoint = `convert hf-to-cs`."""
    from modelzoo_ext.cerebras.converters import our_cs_formats
    from modelzoo_ext.tiny_models import save_tiny_model

    family, _, _, root, _ = converted
    sharded = save_tiny_model(
        tmp_path / "hf",
        family,
        seed=0 if family == "llama" else 1,
        tokenizer_from=tokenizer_dir,
        max_shard_size="2MB",
    )
    ours = CSCheckpoint(root / "cs" / CHECKPOINT_NAME)  # from the same weights (same seed), unsharded
    fmt = our_cs_formats()[-1]
    args = ["checkpoint", "convert", "--model", f"sparse_lora_{family}", "--src-fmt", "hf", "--tgt-fmt", fmt,
            "--config", str(sharded / "config.json"), str(sharded / "model.safetensors.index.json"),
            "--output-dir", str(tmp_path / "out")]  # fmt: skip
    register_for_cszoo()
    from cerebras.modelzoo.cli.main import main as cszoo_main

    monkeypatch.setattr(sys, "argv", ["cszoo", *args])
    try:
        cszoo_main()
    except SystemExit as exc:
        assert exc.code in (0, None)
    theirs = CSCheckpoint(tmp_path / "out" / f"model_to_{fmt}.mdl")
    assert set(theirs.keys()) == {k for k in ours.keys() if not k.endswith(MASK_SUFFIX)}  # noqa: SIM118
    assert all(torch.equal(theirs.get(k), ours.get(k)) for k in theirs.keys())  # noqa: SIM118
    config = yaml.safe_load((tmp_path / "out" / f"config_to_{fmt}.yaml").read_text())["model"]
    assert config["name"] == f"sparse_lora_{family}"
    assert "norm_first" not in config and "use_ff_layer1_dropout" not in config
