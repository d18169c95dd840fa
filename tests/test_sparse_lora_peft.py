"""Our s2d adapter loads into real PEFT on a pruned HF base and gives the same logits."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from modelzoo_ext.errors import UserError
from modelzoo_ext.sparse_lora import SparseLoRAConfig, apply_sparse_lora_, save_adapter, sparse_lora_layers

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path, torch_dtype=torch.float32, attn_implementation="eager"
    ).eval()


@pytest.fixture(scope="module")
def pruned_llama(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama with every projection pruned to 50% by a seeded random mask, saved as HF."""
    model = load(tiny_llama_dir)
    gen = torch.Generator().manual_seed(3)
    masks = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in PROJECTIONS:
                masks[f"{name}.weight"] = torch.rand(module.weight.shape, generator=gen) >= 0.5
                module.weight.mul_(masks[f"{name}.weight"])
    out = tmp_path_factory.mktemp("pruned_llama")
    model.save_pretrained(out, safe_serialization=True)
    return out, masks


def adapted(pruned_dir, masks, mode, dropout=0.0):
    model = load(pruned_dir)
    cfg = SparseLoRAConfig(mode=mode, r=4, alpha=16.0, dropout=dropout, mask_path="m.safetensors")
    apply_sparse_lora_(model, cfg, masks)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():  # random non-zero factors, as after training
        for layer in sparse_lora_layers(model).values():
            layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=gen) * 0.2)
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.2)
    return model.eval()


def test_s2d_adapter_round_trips_through_peft(pruned_llama, tmp_path):
    from peft import PeftModel

    pruned_dir, masks = pruned_llama
    ours = adapted(pruned_dir, masks, "sparse_to_dense", dropout=0.1)
    out = save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(pruned_dir))
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 16.0, 0.1)
    assert sorted(config["target_modules"]) == sorted(PROJECTIONS)
    provenance = json.loads((out / "sparse_lora.json").read_text())
    assert provenance["mode"] == "sparse_to_dense" and set(provenance["mask_sha256"]) == set(masks)

    peft_model = PeftModel.from_pretrained(load(pruned_dir), out).eval()
    ids = torch.randint(0, 32000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours_logits = ours(input_ids=ids).logits
        peft_logits = peft_model(input_ids=ids).logits
        base_logits = load(pruned_dir)(input_ids=ids).logits
    torch.testing.assert_close(peft_logits, ours_logits, rtol=1e-5, atol=1e-5)
    assert (ours_logits - base_logits).abs().max() > 1e-2  # the adapter does change the model


def test_s2s_adapter_is_refused_without_partial_output(pruned_llama, tmp_path):
    pruned_dir, masks = pruned_llama
    model = adapted(pruned_dir, masks, "sparse_to_sparse")
    with pytest.raises(UserError, match="sparse_to_sparse cannot be saved as a PEFT adapter.*merged model"):
        save_adapter(model, tmp_path / "adapter")
    assert list(tmp_path.iterdir()) == []
