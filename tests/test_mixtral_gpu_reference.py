"""The reference trainer on the tiny Mixtral over 2 gloo processes, plain (DDP-style all-reduce)
and `--fsdp` (one unit per MixtralDecoderLayer), each also with micro-batches of 1 and activation
checkpointing: the same per-step losses as 1 process on the whole batch (the router loss is a sum
over samples, so ranks and micro-batches add exactly; experts a rank's slice never reached get
zero gradients, so every rank all-reduces the same tensors), and the s2s merged export of the
FSDP run has zero violations in every expert. CPU, float32.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_mixtral_core import needs_per_expert_mixtral

from gpu_reference.metrics import read_metrics
from gpu_reference.train import train

pytestmark = [pytest.mark.slow, needs_per_expert_mixtral]

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def params(tmp_path_factory, tokenizer_dir) -> tuple[Path, Path]:
    """(run config, HF dir): the tiny Mixtral s2s config pointing at fresh tiny assets."""
    from modelzoo_ext.study.tiny_assets import make_tiny_assets

    root = tmp_path_factory.mktemp("mixtral_reference")
    paths = make_tiny_assets(root / "assets", family="mixtral", tokenizer_from=tokenizer_dir)
    config = yaml.safe_load((REPO / "model_configs" / "params_sparse_lora_tiny_mixtral.yaml").read_text())
    config["trainer"]["init"]["model"]["sparse_lora"]["mask_path"] = str(paths["masks"])
    config["trainer"]["fit"]["train_dataloader"]["data_dir"] = str(paths["data"])
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, paths["hf"]


def torchrun(params: Path, hf: Path, out: Path, *extra: str) -> Path:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "gpu_reference.train", str(params), "--hf-model", str(hf), "--out", str(out),
           "--device", "cpu", "--no-progress", *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def step_losses(run: Path) -> list[float]:
    return [row["loss"] for row in read_metrics(run / "metrics.jsonl") if row.get("split") != "eval"]


MICRO = ("--micro-batch-size", "1", "--activation-checkpointing")


@pytest.mark.parametrize(
    "extra",
    [(), ("--fsdp",), MICRO, (*MICRO, "--fsdp")],
    ids=["ddp", "fsdp", "ddp-micro-ckpt", "fsdp-micro-ckpt"],
)
def test_two_processes_compute_what_one_computes(params, tmp_path, extra):
    config, hf = params
    single = step_losses(train(config, hf, tmp_path / "single", "cpu", progress=False))
    multi = step_losses(torchrun(config, hf, tmp_path / "multi", *extra))
    assert len(single) == len(multi) == 4
    assert all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(single, multi, strict=True)), (single, multi)
    report = json.loads((tmp_path / "multi" / "sparsity_report.json").read_text())
    assert report["ok"] and report["total_violations"] == 0 and report["matched"] == 2 * (4 + 4 * 3)
