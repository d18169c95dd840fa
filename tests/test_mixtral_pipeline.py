"""Issue 14's acceptance run on a tiny Mixtral (4 experts, top-2, 2 layers, GQA), CPU only:

    masks compute (global) -> masks apply -> convert hf-to-cs -> unmodified `cszoo fit` (real ModelZoo
    2.10, CPU backend), both modes -> gpu_reference, both modes -> `sparse-lora parity` (rtol 1e-4)
    -> convert cs-to-hf --as merged (0 violations) and --as adapter (PeftModel logits within 1e-5 of
    the CS model) -> validate.

Every step is the command users run (`sparse-lora ...`, `cszoo fit` through the project's
launcher, `python -m gpu_reference.train`), in subprocesses where the real tools are processes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_gpu_reference_parity import CSZOO_LAUNCHER, _parity
from test_mixtral_modelzoo import cs_logits, input_ids

pytestmark = [pytest.mark.modelzoo, pytest.mark.cs, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
MODES = {"s2s": "params_sparse_lora_tiny_mixtral.yaml", "s2d": "params_sparse_lora_tiny_mixtral_s2d.yaml"}


def sparse_lora(*args: str) -> None:
    from modelzoo_ext.cli import main

    assert main([str(a) for a in args]) == 0, args


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tokenizer_dir) -> dict:
    """Run everything once; the tests below read what it wrote."""
    from modelzoo_ext.data.hdf5 import write_samples
    from modelzoo_ext.study.tiny_assets import training_samples
    from modelzoo_ext.tiny_models import save_tiny_model

    work = tmp_path_factory.mktemp("mixtral_pipeline")
    hf = save_tiny_model(work / "hf", "mixtral", seed=0, tokenizer_from=tokenizer_dir)
    sparse_lora("masks", "compute", "--model", hf, "--sparsity", "0.5", "--scope", "global", "--no-plot",
                "--out", work / "masks.safetensors")  # fmt: skip
    sparse_lora(
        "masks", "apply", "--model", hf, "--masks", work / "masks.safetensors", "--out", work / "hf_pruned"
    )
    sparse_lora("convert", "hf-to-cs", "--model", work / "hf_pruned", "--masks", work / "masks.safetensors",
                "--family", "mixtral", "--out", work / "cs")  # fmt: skip
    (work / "data").mkdir()
    write_samples(work / "data" / "data-0.h5", training_samples(32000, seed=0))
    (work / "launch_cszoo.py").write_text(CSZOO_LAUNCHER)
    runs = {}
    for mode, config in MODES.items():
        params = yaml.safe_load((REPO / "model_configs" / config).read_text())
        init, fit = params["trainer"]["init"], params["trainer"]["fit"]
        init["model_dir"] = str(work / f"cs_{mode}")
        init["model"]["sparse_lora"]["mask_path"] = str(work / "masks.safetensors")
        fit["ckpt_path"] = str(work / "cs" / "model.mdl")
        fit["train_dataloader"]["data_dir"] = str(work / "data")
        (work / config).write_text(yaml.safe_dump(params, sort_keys=False))
        cs = subprocess.run([sys.executable, "launch_cszoo.py", "fit", config], cwd=work, capture_output=True,
                            text=True, timeout=900)  # fmt: skip
        assert cs.returncode == 0, cs.stdout[-2000:] + cs.stderr[-4000:]
        gpu = subprocess.run([sys.executable, "-m", "gpu_reference.train", config, "--hf-model", str(work / "hf_pruned"),
                              "--out", str(work / f"gpu_{mode}"), "--device", "cpu", "--no-progress"],
                             cwd=work, capture_output=True, text=True, timeout=900)  # fmt: skip
        assert gpu.returncode == 0, gpu.stderr[-4000:]
        runs[mode] = {"config": work / config, "cs": work / f"cs_{mode}", "gpu": work / f"gpu_{mode}"}
    return {"work": work, "runs": runs}


@pytest.mark.parametrize("mode", list(MODES))
def test_cszoo_fit_and_the_reference_trainer_agree_step_by_step(pipeline, mode, capsys):
    run = pipeline["runs"][mode]
    assert _parity(run["cs"], run["gpu"], rtol=1e-4) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "over 4 steps" in last and last.endswith("ok"), last
    losses = [
        json.loads(line)["loss"] for line in (run["cs"] / "sparse_lora_losses.jsonl").read_text().splitlines()
    ]
    assert losses[2] < losses[0] and losses[3] < losses[1], losses  # batches repeat: the loss falls


@pytest.mark.parametrize("mode", list(MODES))
def test_fit_checkpoint_keeps_stacked_expert_masks_and_frozen_base(pipeline, mode):
    import cerebras.pytorch as cstorch

    from modelzoo_ext.masks.view import MaskView
    from modelzoo_ext.name_map import RopeLayout

    run, work = pipeline["runs"][mode], pipeline["work"]
    final = {k: v.clone() for k, v in cstorch.load(str(run["cs"] / "checkpoint_4.mdl"))["model"].items()}
    initial = {k: v.clone() for k, v in cstorch.load(str(run["cs"] / "checkpoint_0.mdl"))["model"].items()}
    section = yaml.safe_load(run["config"].read_text())["trainer"]["init"]["model"]
    view = MaskView(work / "masks.safetensors", "cs", "mixtral", RopeLayout.from_cs_config(section))
    assert len(view) == 2 * (4 + 3)
    for name, mask in view.items():
        assert torch.equal(final[f"{name}_mask"], mask), name
        assert not final[name][~mask].any(), name
    for name in [k for k in final if ".lora_" not in k and not k.endswith("_mask")]:
        assert torch.equal(final[name], initial[name]), name  # the base never moves
    fused_b = [k for k in final if "fused_ffns" in k and k.endswith("lora_B.weight")]
    assert len(fused_b) == 6 and all(final[k].shape[1] == 4 for k in fused_b)
    for name in fused_b:  # every expert of every projection trained (all were routed some tokens)
        assert all(final[name][:, e].abs().sum() > 0 for e in range(4)), name


def cs_model_logits(pipeline, mode: str) -> torch.Tensor:
    """Logits of the trained CS model (the `sparse_lora_mixtral` variant loaded from checkpoint_4)."""
    import cerebras.pytorch as cstorch
    from conftest import get_cstorch_cpu_backend

    from modelzoo_ext.cerebras.config import SparseLoRAMixtralModelConfig
    from modelzoo_ext.cerebras.model import SparseLoRAMixtralModel

    run = pipeline["runs"][mode]
    section = yaml.safe_load(run["config"].read_text())["trainer"]["init"]["model"]
    get_cstorch_cpu_backend()
    model = SparseLoRAMixtralModel(SparseLoRAMixtralModelConfig(**section)).eval()
    state = cstorch.load(str(run["cs"] / "checkpoint_4.mdl"))["model"]
    missing, unexpected = model.load_state_dict(
        {k: v for k, v in state.items() if not k.endswith("_mask")}, strict=False
    )
    assert not missing and not unexpected
    return cs_logits(model, input_ids(3))


def test_s2s_merged_export_has_zero_violations_and_the_cs_logits(pipeline, tmp_path):
    from transformers import AutoModelForCausalLM

    from modelzoo_ext.cli import main

    run, work = pipeline["runs"]["s2s"], pipeline["work"]
    out = tmp_path / "merged"
    sparse_lora("convert", "cs-to-hf", "--checkpoint", run["cs"] / "checkpoint_4.mdl", "--config", run["config"],
                "--base-model", work / "hf_pruned", "--as", "merged", "--out", out)  # fmt: skip
    assert main(["validate", "--checkpoint", str(out), "--masks", str(work / "masks.safetensors")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert (merged(input_ids=input_ids(3)).logits - cs_model_logits(pipeline, "s2s")).abs().max() < 1e-5
    report = json.loads((run["gpu"] / "sparsity_report.json").read_text())  # the reference run's merge
    assert report["ok"] and report["total_violations"] == 0 and report["matched"] == 2 * (4 + 4 * 3)


def test_s2d_adapter_export_loads_with_peft_and_gives_the_cs_logits(pipeline, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run, work = pipeline["runs"]["s2d"], pipeline["work"]
    out = tmp_path / "adapter"
    sparse_lora("convert", "cs-to-hf", "--checkpoint", run["cs"] / "checkpoint_4.mdl", "--config", run["config"],
                "--base-model", work / "hf_pruned", "--as", "adapter", "--out", out)  # fmt: skip
    cs = cs_model_logits(pipeline, "s2d")
    for adapter in (out, run["gpu"] / "adapter"):  # ours from the CS run, and the reference run's own
        peft_model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(work / "hf_pruned"), adapter
        )
        with torch.no_grad():
            difference = (peft_model.eval()(input_ids=input_ids(3)).logits - cs).abs().max()
        assert difference < 1e-5, (adapter, float(difference))
    shutil.rmtree(out)
