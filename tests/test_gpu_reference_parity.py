"""`sparse-lora parity`, and the parity itself: `cszoo fit` (CPU backend) vs gpu_reference (CPU).

The `modelzoo` test builds the tiny assets (`modelzoo_ext.study.tiny_assets`: HF model, CS
checkpoint, 50% masks, HDF5 data), runs the repository's tiny run configs through ModelZoo's
Trainer and through the reference trainer, and requires per-step losses within 1e-4 relative in
both modes (measured: relative difference 0.0, identical to the last bit, on torch 2.4 CPU), and
the same TensorBoard tags in both runs' event files, with the same loss, learning-rate and norm
curves.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gpu_reference.parity import run_parity

REPO = Path(__file__).resolve().parents[1]

# `cszoo fit` imports bigcode_eval (a GitHub-only ModelZoo requirement) while validating a config;
# where it is missing, a stand-in module is put into sys.modules before ModelZoo is imported.
CSZOO_LAUNCHER = """
import importlib.util, sys, types
if importlib.util.find_spec("bigcode_eval") is None:
    for name in ("bigcode_eval", "bigcode_eval.tasks", "bigcode_eval.base", "bigcode_eval.evaluator", "bigcode_eval.utils"):
        sys.modules[name] = types.ModuleType(name)
    sys.modules["bigcode_eval.base"].Task = type("Task", (), {})
    sys.modules["bigcode_eval.evaluator"].Evaluator = type("Evaluator", (), {})
    sys.modules["bigcode_eval.utils"].update_code_gens = lambda *a, **k: None
    sys.modules["bigcode_eval.tasks"].ALL_TASKS, sys.modules["bigcode_eval.tasks"].TASK_REGISTRY = [], {}
    sys.modules["bigcode_eval"].tasks = sys.modules["bigcode_eval.tasks"]
from modelzoo_ext.cerebras.wrapper import main
sys.argv = ["cszoo", *sys.argv[1:]]
sys.exit(main())
"""


def _write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _parity(cs, gpu, rtol=1e-4, plot=None) -> int:
    return run_parity(argparse.Namespace(cs_run=str(cs), gpu_run=str(gpu), rtol=rtol, plot=plot))


def test_parity_command_table_plot_and_exit_status(tmp_path, capsys):
    cs, gpu = tmp_path / "cs", tmp_path / "gpu"
    _write_jsonl(cs / "sparse_lora_losses.jsonl", [{"step": s, "loss": 10.0 - s} for s in range(1, 6)])
    _write_jsonl(gpu / "metrics.jsonl", [{"step": s, "loss": (10.0 - s) * (1 + 1e-6 * s)} for s in range(1, 5)]
                 + [{"step": 4, "split": "eval", "loss": 99.0}])  # fmt: skip
    assert _parity(cs, gpu) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("max relative difference 4.000e-06 at step 4 over 4 steps")
    assert "(1 CS steps have no counterpart and were not compared)" in out
    assert (gpu / "parity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _parity(cs, gpu, rtol=1e-6, plot=str(tmp_path / "p.png")) == 1
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith("FAIL")


@pytest.mark.modelzoo
@pytest.mark.slow
@pytest.mark.parametrize(
    "mode,config", [("s2s", "params_sparse_lora_tiny.yaml"), ("s2d", "params_sparse_lora_tiny_s2d.yaml")]
)
def test_cszoo_fit_and_gpu_reference_losses_agree(tmp_path, mode, config, capsys):
    from modelzoo_ext.study.tiny_assets import make_tiny_assets

    make_tiny_assets(tmp_path / "build" / "tiny")
    shutil.copy(REPO / "model_configs" / config, tmp_path / config)  # its paths are relative to the cwd
    (tmp_path / "launch_cszoo.py").write_text(CSZOO_LAUNCHER)
    fit = subprocess.run(
        [sys.executable, "launch_cszoo.py", "fit", config],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert fit.returncode == 0, fit.stdout[-2000:] + fit.stderr[-3000:]
    gpu = subprocess.run(
        [sys.executable, "-m", "gpu_reference.train", config, "--hf-model", "build/tiny/hf", "--out", f"gpu_{mode}",
         "--device", "cpu", "--no-progress"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert gpu.returncode == 0, gpu.stderr[-3000:]
    cs_run = tmp_path / "build" / "tiny" / "runs" / mode
    assert _parity(cs_run, tmp_path / f"gpu_{mode}", rtol=1e-4) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    max_steps = yaml.safe_load((tmp_path / config).read_text())["trainer"]["init"]["loop"]["max_steps"]
    assert f"over {max_steps} steps" in last and last.endswith("ok"), last  # every step compared
    # The curves side by side: the same TensorBoard tags, and the same values where they are not timings.
    from test_gpu_reference_train import MODELZOO_TRAIN_TAGS, scalars

    cs_curves, gpu_curves = scalars(cs_run), scalars(tmp_path / f"gpu_{mode}")
    assert set(cs_curves) == set(gpu_curves) == MODELZOO_TRAIN_TAGS
    for tag in ("loss", "lr/0", "lr/1", "model_wise_params_norm", "model_wise_grad_norm",
                "per_layer_grad_norm/layer_0", "per_layer_grad_norm/layer_1"):  # fmt: skip
        assert (
            [s for s, _ in gpu_curves[tag]] == [s for s, _ in cs_curves[tag]] == list(range(1, max_steps + 1))
        )
        for (_, ours), (_, theirs) in zip(gpu_curves[tag], cs_curves[tag], strict=True):
            assert ours == pytest.approx(theirs, rel=1e-4), tag
