"""The demo's pieces: its run config and sweep are accepted as they are; the SmolLM2 export is faithful."""

from __future__ import annotations

import argparse
import json

import pytest
import yaml

from modelzoo_ext.study.demo import add_demo_arguments, build_smollm2, demo_params, demo_sweep
from modelzoo_ext.study.grid import grid
from modelzoo_ext.study.sweep_spec import load_sweep


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_demo_arguments(parser)
    return parser.parse_args(list(argv))


def test_demo_config_is_accepted_by_the_trainer_and_matches_the_model(tmp_path, tiny_llama_dir):
    import json

    from modelzoo_ext.run_config import check_architecture, load_run_config

    args = _args("--steps", "3", "--rank", "4", "--lr", "1e-3")
    params = demo_params(tiny_llama_dir, args)
    params["trainer"]["init"]["model"]["sparse_lora"]["mask_path"] = "masks.safetensors"  # the sweep fills it
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    config = load_run_config(path)
    assert config.max_steps == 3 and config.sparse_lora.r == 4 and config.sparse_lora.scaling == 2.0
    assert config.init.optimizer == {"AdamW": {"lr": 1e-3, "weight_decay": 0.0}}
    assert config.init.model.name == "sparse_lora_llama"  # not the stock family name
    hf_config = json.loads((tiny_llama_dir / "config.json").read_text())
    check = check_architecture(config.init.model.architecture, hf_config, "llama")
    assert check.ok, check.mismatches


def test_demo_sweep_is_the_issue_s_job(tmp_path, tiny_llama_dir):
    args = _args()
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(demo_params(tiny_llama_dir, args)))
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump(demo_sweep(tiny_llama_dir, params, args)))
    runs = {(r["mode"], r["sparsity"], r["backend"]) for r in grid(load_sweep(sweep))}
    # s2s and s2d fine-tunes on CPU, and the dense and pruned models without fine-tuning.
    assert runs == {("s2s", 0.5, "cpu"), ("s2d", 0.5, "cpu"), ("none", 0.5, "eval"), ("none", 0.0, "eval")}
    spec = load_sweep(sweep)
    assert spec.tasks == ["boolq"] and spec.method_structures == [("magnitude", "unstructured")]
    assert spec.eval.limit == 40 and spec.eval.heldout_loss and spec.eval.heldout_limit == 128
    assert spec.data.protocol == "offline" and spec.data.source == "bundled"  # offline: no hub in the demo


@pytest.mark.slow
def test_smollm2_export_reproduces_the_gguf_model(tmp_path):
    """The saved HF directory gives the GGUF-loaded model's logits bit for bit (about a minute)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from modelzoo_ext.offline_assets import asset_path

    out = build_smollm2(tmp_path / "smollm2")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    gguf = asset_path("smollm2_gguf")
    reference = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    saved = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    tokens = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(reference(**tokens).logits, saved(**tokens).logits)
    # Special tokens as the GGUF file states them (completions end with EOS in the training data).
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf)).fields
    gguf_id = {k: int(fields[f"tokenizer.ggml.{k}_token_id"].parts[-1][0]) for k in ("eos", "padding")}
    assert tokenizer.eos_token_id == config["eos_token_id"] == gguf_id["eos"]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id == gguf_id["padding"]
    assert tokens.input_ids[0, 0] != tokenizer.bos_token_id  # SmolLM2 was trained without a BOS


def test_modelzoo_stage_names_what_is_missing(monkeypatch):
    """The demo's ModelZoo stage runs where ModelZoo and its `bigcode_eval` import; otherwise it is
    skipped with the reason (never silently), also where not even `cerebras` exists."""
    import importlib.util

    from modelzoo_ext.study import demo

    def absent(name):
        raise ModuleNotFoundError(f"No module named {name.split('.')[0]!r}")

    finders = {  # what find_spec does for a missing top-level module, a missing dotted one, ...
        "bigcode_eval": lambda name: None if name == "bigcode_eval" else object(),
        "cerebras.modelzoo": lambda name: absent(name) if name == "cerebras.modelzoo" else object(),
    }
    for missing, what in (("bigcode_eval", "bigcode_eval"), ("cerebras.modelzoo", "Cerebras ModelZoo")):
        monkeypatch.setattr(importlib.util, "find_spec", finders[missing])
        assert demo.modelzoo_missing() == f"{what} is not installed (see docs/modelzoo.md)"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    assert demo.modelzoo_missing() is None
