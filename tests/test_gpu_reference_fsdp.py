"""`--fsdp`: the frozen base sharded over 2 gloo processes computes what 1 process computes.

On the tiny model of test_gpu_reference_train.py (its fixture and helpers, CPU float32):
- s2s: per-step losses equal 1 process within 1e-5 (relative); the merged export from the FSDP
  run has zero violations and equals the 1-process export within 1e-6 (absolute: the two runs sum
  the same gradients in a different order, the factors then differ in the last bits);
- s2d: same losses and validation loss; the PEFT adapter equals the 1-process adapter within 1e-6;
- resume: kill the FSDP run after a checkpoint, rerun it: bit-identical factors and losses to the
  uninterrupted FSDP run;
- `--fsdp` in a single process exits 2 with one line and writes nothing;
- every rank really holds only a shard of the frozen base (gpu_reference.distributed).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_gpu_reference_train import assets, losses, write_params  # noqa: F401  (assets: a fixture)

from gpu_reference.metrics import read_metrics
from gpu_reference.train import train
from modelzoo_ext.masks.format import load_masks

REPO = Path(__file__).resolve().parents[1]


def torchrun_command(params: Path, hf: Path, out: Path, nproc: int = 2) -> list[str]:
    """`torchrun --standalone --nproc-per-node N -m gpu_reference.train ... --fsdp` on the CPU."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "gpu_reference.train", str(params), "--hf-model", str(hf), "--out", str(out),
            "--device", "cpu", "--no-progress", "--fsdp"]  # fmt: skip


def run_fsdp(params: Path, hf: Path, out: Path) -> Path:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = torchrun_command(params, hf, out)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def assert_factors_close(got: Path, expected: Path, atol: float) -> None:
    a, b = load_file(expected), load_file(got)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=atol)


@pytest.fixture(scope="module")
def s2s_params(assets) -> Path:  # noqa: F811
    return write_params(assets, "fsdp_s2s", max_steps=8, checkpoint_steps=2)


@pytest.fixture(scope="module")
def s2s_single(assets, s2s_params) -> Path:  # noqa: F811
    return train(s2s_params, assets["hf"], assets["root"] / "fsdp_s2s_single", "cpu", progress=False)


@pytest.fixture(scope="module")
def s2s_fsdp(assets, s2s_params) -> Path:  # noqa: F811
    return run_fsdp(s2s_params, assets["hf"], assets["root"] / "fsdp_s2s_fsdp")


# ----------------------------------------------------------------------------- equivalence
@pytest.mark.slow
def test_fsdp_s2s_equals_one_process_and_exports_zero_violations(assets, s2s_single, s2s_fsdp):  # noqa: F811
    from modelzoo_ext.hf_checkpoint import HFCheckpoint

    single, fsdp = losses(s2s_single), losses(s2s_fsdp)
    assert len(fsdp) == 8
    torch.testing.assert_close(torch.tensor(fsdp), torch.tensor(single), rtol=1e-5, atol=0)
    assert_factors_close(s2s_fsdp / "lora.safetensors", s2s_single / "lora.safetensors", atol=1e-6)
    lora = load_file(s2s_fsdp / "lora.safetensors")
    assert all(lora[k].abs().max() > 0 for k in lora if k.endswith("lora_B.weight"))

    assert json.loads((s2s_fsdp / "sparsity_report.json").read_text())["ok"] is True
    masks, _ = load_masks(assets["masks"])
    merged, reference = HFCheckpoint(s2s_fsdp / "merged"), HFCheckpoint(s2s_single / "merged")
    assert sorted(merged.keys()) == sorted(reference.keys())
    for name, mask in masks.items():  # read back independently of check_sparsity
        assert int((merged.get(name)[~mask] != 0).sum()) == 0, name
    for name in sorted(reference.keys()):
        torch.testing.assert_close(merged.get(name), reference.get(name), rtol=0, atol=1e-6)
    record = json.loads((s2s_fsdp / "run.json").read_text())
    assert record["complete"] and record["fsdp"] is True and record["world_size"] == 2


def eval_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r.get("split") == "eval"]


@pytest.mark.slow
def test_fsdp_s2d_equals_one_process(assets):  # noqa: F811
    """Also evaluates (2 validation batches after step 3): the eval loss runs through FSDP too."""
    params = write_params(assets, "fsdp_s2d", mode="sparse_to_dense", max_steps=3)
    config = yaml.safe_load(params.read_text())
    config["trainer"]["init"]["loop"].update(eval_frequency=3, eval_steps=2)
    config["trainer"]["fit"]["val_dataloader"] = {
        **config["trainer"]["fit"]["train_dataloader"],
        "shuffle": False,
    }
    params.write_text(yaml.safe_dump(config))
    single = train(params, assets["hf"], assets["root"] / "fsdp_s2d_single", "cpu", progress=False)
    fsdp = run_fsdp(params, assets["hf"], assets["root"] / "fsdp_s2d_fsdp")
    torch.testing.assert_close(torch.tensor(losses(fsdp)), torch.tensor(losses(single)), rtol=1e-5, atol=0)
    assert len(eval_losses(single)) == 1
    torch.testing.assert_close(
        torch.tensor(eval_losses(fsdp)), torch.tensor(eval_losses(single)), rtol=1e-5, atol=0
    )
    assert_factors_close(fsdp / "adapter" / "adapter_model.safetensors",
                         single / "adapter" / "adapter_model.safetensors", atol=1e-6)  # fmt: skip
    config = json.loads((fsdp / "adapter" / "adapter_config.json").read_text())
    assert config == json.loads((single / "adapter" / "adapter_config.json").read_text())


# ----------------------------------------------------------------------------- resume
@pytest.mark.slow
def test_fsdp_resume_after_kill_equals_the_uninterrupted_run(assets, s2s_params, s2s_fsdp):  # noqa: F811
    """SIGKILL both ranks and torchrun after the step-2 checkpoint, rerun: bit-identical to s2s_fsdp."""
    killed = assets["root"] / "fsdp_s2s_killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(torchrun_command(s2s_params, assets["hf"], killed), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step_2.pt").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    ranks = psutil.Process(proc.pid).children(recursive=True)  # torchrun starts them in new sessions
    for process in [*ranks, psutil.Process(proc.pid)]:
        process.send_signal(signal.SIGKILL)
    proc.wait()
    psutil.wait_procs(ranks, timeout=30)
    assert not (killed / "run.json").exists(), "the run finished before the kill: nothing was resumed"
    run_fsdp(s2s_params, assets["hf"], killed)
    assert losses(killed) == losses(s2s_fsdp)  # one row per step, none repeated
    ref, resumed = load_file(s2s_fsdp / "lora.safetensors"), load_file(killed / "lora.safetensors")
    assert ref.keys() == resumed.keys() and all(torch.equal(ref[k], resumed[k]) for k in ref)


# ----------------------------------------------------------------------------- refusals
def test_fsdp_in_one_process_exits_2_and_writes_nothing(assets):  # noqa: F811
    params = write_params(assets, "fsdp_single_process")
    out = assets["root"] / "fsdp_refused"
    cmd = [sys.executable, "-m", "gpu_reference.train", str(params), "--hf-model", str(assets["hf"]),
           "--out", str(out), "--device", "cpu", "--fsdp"]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "WORLD_SIZE": "1"}
    )
    assert proc.returncode == 2
    assert "--fsdp" in proc.stderr and "torchrun" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_decoder_layers_are_required(assets):  # noqa: F811
    from gpu_reference.distributed import decoder_layer_classes
    from modelzoo_ext.errors import UserError

    with pytest.raises(UserError, match="decoder layers"):
        decoder_layer_classes(torch.nn.Sequential(torch.nn.Linear(2, 2)))


# ----------------------------------------------------------------------------- sharding
SHARD_SCRIPT = """
import json, sys, torch, torch.distributed as dist
from gpu_reference.distributed import local_parameter_bytes, shard_frozen_base
from gpu_reference.model import load_hf_model as _load_hf_model
from modelzoo_ext.masks.format import load_masks
from modelzoo_ext.sparse_lora import SparseLoRAConfig, apply_sparse_lora_
dist.init_process_group("gloo")
model = _load_hf_model(sys.argv[1])
masks, _ = load_masks(sys.argv[2])
targets = sorted({k.rsplit(".", 2)[-2] for k in masks})
apply_sparse_lora_(model, SparseLoRAConfig(mode="sparse_to_sparse", r=4, alpha=8.0, target_modules=targets,
                                            mask_path=sys.argv[2]), masks)
whole = local_parameter_bytes(model)
held = local_parameter_bytes(shard_frozen_base(model, torch.device("cpu")))
print(json.dumps({"rank": dist.get_rank(), "whole": whole, "held": held}))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_each_rank_holds_half_of_the_frozen_base(assets):  # noqa: F811
    script = assets["root"] / "shard_bytes.py"
    script.write_text(SHARD_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(script), str(assets["hf"]), str(assets["masks"])]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["rank"] for r in rows) == [0, 1]
    whole = rows[0]["whole"]
    assert sum(r["held"]["frozen"] for r in rows) == whole["frozen"]  # a partition: nothing twice
    for r in rows:
        assert r["held"]["frozen"] <= whole["frozen"] // 2 + 4096  # at most half, plus padding
        assert r["held"]["trainable"] == whole["trainable"]  # LoRA factors whole on every rank
