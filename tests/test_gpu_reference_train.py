"""The reference trainer end to end on a tiny model (CPU, float32 unless stated).

- golden losses (tests/golden/gpu_reference_tiny_s2s.json, written once by an honest run of
  this file with GOLDEN_REGENERATE=1; the file records the command and versions),
- s2s exports with zero violations that compute what the trained model computes,
- the s2d adapter loaded by PEFT reproduces the trained model's logits,
- kill -9 mid-run, rerun: the same final weights as an uninterrupted run,
- torchrun with 2 gloo processes equals 1 process on the same global batch,
- gradient accumulation, bf16 autocast, and clean failures (exit 2, nothing written),
- TensorBoard events under ModelZoo's tags, equal to metrics.jsonl, each step once after a resume.
The parity test against `cszoo fit` lives in test_gpu_reference_parity.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from gpu_reference.metrics import read_metrics
from gpu_reference.train import train
from modelzoo_ext.hf_checkpoint import HFCheckpoint
from modelzoo_ext.masks.format import load_masks, save_masks
from modelzoo_ext.masks.provenance import source_record
from modelzoo_ext.run_config import hf_to_cs_model_config

GOLDEN = Path(__file__).parent / "golden" / "gpu_reference_tiny_s2s.json"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    """A tiny Llama with deterministic weights, pruned by 50% random masks, and prompt/answer samples.

    The weights are drawn from one seeded generator in sorted-name order (not transformers'
    initialisation), so the golden losses do not depend on how a transformers version initialises.
    The data is written directly in ModelZoo's layout (token ids, not text), so these tests do not
    depend on a tokenizer; `data prepare` has its own tests.
    """
    from modelzoo_ext.tiny_models import save_tiny_model

    root = tmp_path_factory.mktemp("gpu_reference")
    hf = save_tiny_model(root / "hf", "llama", seed=0, tokenizer_from=tokenizer_dir)
    state = load_file(hf / "model.safetensors")
    g = torch.Generator().manual_seed(1234)
    masks = {}
    for name in sorted(state):
        if "norm" in name:
            state[name] = torch.ones_like(state[name])
            continue
        state[name] = torch.randn(state[name].shape, generator=g) * 0.05
        if name.rsplit(".", 2)[-2] in TARGETS:
            masks[name] = torch.rand(state[name].shape, generator=g) >= 0.5
            state[name] = state[name] * masks[name]
    save_file(state, hf / "model.safetensors", metadata={"format": "pt"})
    source = source_record(HFCheckpoint(hf))  # the model is pruned by the masks: it is their source
    save_masks(
        root / "masks.safetensors",
        masks,
        {"method": "random", "sparsity": 0.5, "source_model": source},
        naming="hf",
    )
    write_samples_dir(root / "data", num_samples=24, max_seq_length=40, seed=5)
    return {"root": root, "hf": hf, "masks": root / "masks.safetensors", "data": root / "data"}


def write_samples_dir(out: Path, num_samples: int, max_seq_length: int, seed: int) -> None:
    """int32 [N, 3, msl] prompt/answer samples: prompts of 8..30 tokens, then an answer token and EOS
    under the loss (exactly 2 loss tokens per sample, like " yes"/" no" + EOS), then padding."""
    import numpy as np

    from modelzoo_ext.data.hdf5 import write_samples

    rng = np.random.default_rng(seed)
    samples = np.zeros((num_samples, 3, max_seq_length), dtype=np.int32)
    for i in range(num_samples):
        prompt = [1, *rng.integers(3, 32000, size=int(rng.integers(8, 31))).tolist()]
        tokens = [*prompt, int(rng.choice([4873, 708])), 2]  # answer, EOS
        n = len(tokens) - 1
        samples[i, 0, :n] = tokens[:-1]
        samples[i, 2, :n] = tokens[1:]
        samples[i, 1, n - 2 : n] = 1
    out.mkdir(parents=True)
    write_samples(out / "data-0.h5", samples)


def write_params(assets, name: str, *, mode="sparse_to_sparse", max_steps=4, batch_size=4, grad_accum=1,
                 checkpoint_steps=None, precision=None, shuffle=True) -> Path:  # fmt: skip
    """A params YAML in ModelZoo's trainer layout for the tiny assets."""
    init = {
        "backend": {"backend_type": "CPU"},
        "model_dir": str(assets["root"] / "model_dir"),
        "seed": 1,
        "model": {
            # The full architecture of the HF model, as `convert hf-to-cs` writes it: the reference
            # trainer checks every key that changes the computation (ModelZoo's defaults otherwise).
            **hf_to_cs_model_config(json.loads((assets["hf"] / "config.json").read_text()), "llama"),
            "name": "sparse_lora_llama",
            "loss_scaling": "num_tokens",
            "sparse_lora": {
                "mode": mode,
                "r": 4,
                "alpha": 8.0,
                "target_modules": list(TARGETS),
                "mask_path": str(assets["masks"]),
                "init_seed": 0,
            },
        },  # fmt: skip
        "optimizer": {
            "AdamW": {"learning_rate": 0.01, "weight_decay": 0.01, "betas": [0.9, 0.99], "eps": 1e-6}
        },
        "schedulers": [
            {
                "SequentialLR": {
                    "schedulers": [
                        {
                            "LinearLR": {
                                "initial_learning_rate": 0.002,
                                "end_learning_rate": 0.01,
                                "total_iters": 2,
                            }
                        },
                        {
                            "CosineDecayLR": {
                                "initial_learning_rate": 0.01,
                                "end_learning_rate": 0.001,
                                "total_iters": 20,
                            }
                        },
                    ]
                }
            }
        ],
        "precision": precision or {"enabled": False, "max_gradient_norm": 1.0},
        "loop": {"max_steps": max_steps, "grad_accum_steps": grad_accum},
        "callbacks": [{"SparseLoRAMasks": {}}, {"SparseLoRALossLog": {}}],
    }
    if checkpoint_steps:
        init["checkpoint"] = {"steps": checkpoint_steps}
    loader = {"data_processor": "GptHDF5MapDataProcessor", "data_dir": str(assets["data"]),
              "batch_size": batch_size, "shuffle": shuffle, "shuffle_seed": 7}  # fmt: skip
    path = assets["root"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"trainer": {"init": init, "fit": {"train_dataloader": loader}}}))
    return path


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r.get("split", "train") == "train"]


def trained_model(assets, run_dir: Path, mode: str):
    """The trained model rebuilt from the HF base, the masks and the run's lora.safetensors."""
    from gpu_reference.model import load_hf_model as _load_hf_model
    from modelzoo_ext.sparse_lora import SparseLoRAConfig, apply_sparse_lora_, load_lora_state_dict_

    model = _load_hf_model(assets["hf"])
    masks, _ = load_masks(assets["masks"])
    config = SparseLoRAConfig(
        mode=mode, r=4, alpha=8.0, target_modules=list(TARGETS), mask_path=str(assets["masks"])
    )
    apply_sparse_lora_(model, config, masks)
    load_lora_state_dict_(model, load_file(run_dir / "lora.safetensors"))
    return model.eval()


def sample_input(assets) -> torch.Tensor:
    from modelzoo_ext.data.hdf5 import SampleDataset

    data = SampleDataset(assets["data"])
    return torch.from_numpy(data[0][0][None]).long()


@pytest.fixture(scope="module")
def s2s_run(assets) -> Path:
    return train(write_params(assets, "s2s"), assets["hf"], assets["root"] / "run_s2s", "cpu", progress=False)


# ----------------------------------------------------------------------------- golden
def test_golden_losses(s2s_run):
    """4 steps, CPU float32, fixed seeds: the losses equal the stored ones within 1e-5 (relative)."""
    got = losses(s2s_run)
    if os.environ.get("GOLDEN_REGENERATE") == "1":
        import transformers

        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({
            "produced_by": "GOLDEN_REGENERATE=1 pytest tests/test_gpu_reference_train.py::test_golden_losses",
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "losses": got,
        }, indent=2) + "\n")  # fmt: skip
    golden = json.loads(GOLDEN.read_text())["losses"]
    assert len(got) == len(golden) == 4
    torch.testing.assert_close(torch.tensor(got), torch.tensor(golden), rtol=1e-5, atol=0)
    assert got[-1] < got[0]  # it learns


# ----------------------------------------------------------------------------- exports
def test_s2s_exports_have_zero_violations_and_match_the_trained_model(assets, s2s_run):
    from modelzoo_ext.hf_checkpoint import HFCheckpoint

    report = json.loads((s2s_run / "sparsity_report.json").read_text())
    assert report["ok"] is True
    masks, _ = load_masks(assets["masks"])
    merged = HFCheckpoint(s2s_run / "merged")
    for name, mask in masks.items():  # read back independently of check_sparsity
        assert int((merged.get(name)[~mask] != 0).sum()) == 0, name
    lora = load_file(s2s_run / "lora.safetensors")
    assert all(lora[k].abs().max() > 0 for k in lora if k.endswith("lora_B.weight"))  # B trained away from 0
    assert (s2s_run / "masks.safetensors").read_bytes() == assets["masks"].read_bytes()
    from transformers import AutoModelForCausalLM

    ids = sample_input(assets)
    with torch.no_grad():
        expected = trained_model(assets, s2s_run, "sparse_to_sparse")(input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(s2s_run / "merged").eval()(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    record = json.loads((s2s_run / "run.json").read_text())
    assert (
        record["complete"]
        and record["mode"] == "sparse_to_sparse"
        and record["final_loss"] == losses(s2s_run)[-1]
    )


def test_s2d_adapter_loads_in_peft_and_reproduces_outputs(assets):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = train(
        write_params(assets, "s2d", mode="sparse_to_dense", max_steps=3),
        assets["hf"],
        assets["root"] / "run_s2d",
        "cpu",
        progress=False,
    )
    lora = load_file(run / "lora.safetensors")
    assert all(lora[k].abs().max() > 0 for k in lora if k.endswith("lora_B.weight"))
    ids = sample_input(assets)
    base = AutoModelForCausalLM.from_pretrained(assets["hf"])  # already pruned with the masks
    with torch.no_grad():
        expected = trained_model(assets, run, "sparse_to_dense")(input_ids=ids).logits
        got = PeftModel.from_pretrained(base, run / "adapter").eval()(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- resume
@pytest.mark.slow
def test_resume_after_kill_gives_the_same_final_weights(assets):
    """SIGKILL after the step-4 checkpoint, rerun the same command: bit-identical LoRA factors and losses."""
    params = write_params(assets, "resume", max_steps=12, checkpoint_steps=2)
    reference = train(params, assets["hf"], assets["root"] / "run_uninterrupted", "cpu", progress=False)
    killed_dir = assets["root"] / "run_killed"
    cmd = [sys.executable, "-m", "gpu_reference.train", str(params), "--hf-model", str(assets["hf"]),
           "--out", str(killed_dir), "--device", "cpu", "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed_dir / "checkpoints" / "step_4.pt").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed_dir / "run.json").exists(), "the run finished before the kill: nothing was resumed"
    train(params, assets["hf"], killed_dir, "cpu", progress=False)
    ref, resumed = load_file(reference / "lora.safetensors"), load_file(killed_dir / "lora.safetensors")
    assert ref.keys() == resumed.keys()
    assert all(torch.equal(ref[k], resumed[k]) for k in ref)
    assert losses(killed_dir) == losses(reference)  # one row per step, none repeated
    assert scalars(killed_dir)["loss"] == scalars(reference)["loss"]  # TensorBoard too: each step once


# ----------------------------------------------------------------------------- DDP
@pytest.mark.slow
def test_ddp_two_gloo_processes_equal_one_process(assets):
    params = write_params(assets, "ddp", max_steps=3, batch_size=4)
    single = train(params, assets["hf"], assets["root"] / "run_single", "cpu", progress=False)
    ddp_dir = assets["root"] / "run_ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
           "-m", "gpu_reference.train", str(params), "--hf-model", str(assets["hf"]), "--out", str(ddp_dir),
           "--device", "cpu", "--no-progress"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.testing.assert_close(torch.tensor(losses(ddp_dir)), torch.tensor(losses(single)), rtol=1e-5, atol=0)
    a, b = load_file(single / "lora.safetensors"), load_file(ddp_dir / "lora.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
    assert json.loads((ddp_dir / "run.json").read_text())["world_size"] == 2


# ----------------------------------------------------------------------------- precision, accumulation
def test_grad_accumulation_equals_the_bigger_batch(assets):
    """batch 2 x 2 accumulation steps == batch 4 (every sample has the same number of loss tokens)."""
    big = train(
        write_params(assets, "acc1", max_steps=2, batch_size=4, shuffle=False),
        assets["hf"],
        assets["root"] / "run_acc1",
        "cpu",
        progress=False,
    )
    acc = train(
        write_params(assets, "acc2", max_steps=2, batch_size=2, grad_accum=2, shuffle=False),
        assets["hf"],
        assets["root"] / "run_acc2",
        "cpu",
        progress=False,
    )
    torch.testing.assert_close(torch.tensor(losses(acc)), torch.tensor(losses(big)), rtol=1e-5, atol=0)
    a, b = load_file(big / "lora.safetensors"), load_file(acc / "lora.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)


def test_bf16_autocast_follows_precision(assets):
    """precision.enabled runs the forward in bfloat16 (cbfloat16 -> bfloat16 off the wafer): close to fp32, not equal."""
    runs = {}
    for name, precision in (
        ("fp32", {"enabled": False}),
        ("bf16", {"enabled": True, "fp16_type": "cbfloat16"}),
    ):
        params = write_params(
            assets, f"prec_{name}", mode="sparse_to_dense", max_steps=1, precision=precision
        )
        runs[name] = losses(
            train(params, assets["hf"], assets["root"] / f"run_prec_{name}", "cpu", progress=False)
        )[0]
    assert runs["bf16"] != runs["fp32"]
    assert abs(runs["bf16"] - runs["fp32"]) / runs["fp32"] < 1e-2


def test_bad_config_exits_2_and_writes_nothing(assets):
    params = write_params(assets, "bad")
    config = yaml.safe_load(params.read_text())
    config["trainer"]["init"]["loop"]["max_stepz"] = 3
    params.write_text(yaml.safe_dump(config))
    out = assets["root"] / "run_bad"
    proc = subprocess.run(
        [sys.executable, "-m", "gpu_reference.train", str(params), "--hf-model", str(assets["hf"]), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "max_stepz" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()


# ----------------------------------------------------------------------------- TensorBoard
# The tags a ModelZoo 2.10 run writes for training steps (read from a tiny `cszoo fit`; the slow
# parity test compares them with a real one). Two decoder layers in the tiny model.
MODELZOO_TRAIN_TAGS = {
    "loss", "lr/0", "lr/1", "model_wise_params_norm", "model_wise_grad_norm",
    "per_layer_grad_norm/layer_0", "per_layer_grad_norm/layer_1",
    "local_samples_per_sec", "avg_samples_per_sec", "avg_steps_per_sec", "loop_time_remaining", "time_remaining",
}  # fmt: skip


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} of every event file in RUN_DIR/events, as TensorBoard shows them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "events"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def train_rows(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("split", "train") == "train"]


def test_tensorboard_events_carry_the_modelzoo_tags_and_the_metrics(s2s_run):
    got = scalars(s2s_run)
    assert set(got) == MODELZOO_TRAIN_TAGS
    rows = train_rows(s2s_run)
    assert got["loss"] == [
        (r["step"], float(np.float32(r["loss"]))) for r in rows
    ]  # TensorBoard keeps float32
    assert got["lr/0"] == got["lr/1"] == [(r["step"], float(np.float32(r["lr"]))) for r in rows]
    for (step, norm), row in zip(got["model_wise_grad_norm"], rows, strict=True):
        assert step == row["step"] and norm == pytest.approx(row["grad_norm"], rel=1e-6)
    assert all(len(values) == len(rows) for values in got.values())
    record = json.loads((s2s_run / "run.json").read_text())["tensorboard"]
    assert record == {
        "written": True,
        "dir": "events",
        "tags": sorted(MODELZOO_TRAIN_TAGS),
        "purge_step": None,
    }


def test_tensorboard_norms_are_read_before_clipping_and_before_the_update(assets):
    """ComputeNorm's semantics: gradient norms before clipping (here every step is clipped), the
    parameter norm before the step's update; and the evaluation under ModelZoo's `validate_0/`."""
    params = write_params(assets, "tb_norms", max_steps=3, checkpoint_steps=2,
                          precision={"enabled": False, "max_gradient_norm": 1e-4})  # fmt: skip
    config = yaml.safe_load(params.read_text())
    config["trainer"]["init"]["loop"].update(eval_frequency=2, eval_steps=1)
    config["trainer"]["fit"]["val_dataloader"] = {
        **config["trainer"]["fit"]["train_dataloader"],
        "shuffle": False,
    }
    params.write_text(yaml.safe_dump(config))
    run = train(params, assets["hf"], assets["root"] / "run_tb_norms", "cpu", progress=False)
    got = scalars(run)
    for i, (_, total) in enumerate(got["model_wise_grad_norm"]):
        layers = [got[f"per_layer_grad_norm/layer_{layer}"][i][1] for layer in (0, 1)]
        assert total > 1e-3  # far above max_gradient_norm: the norms were read before clipping
        assert total == pytest.approx(float(np.hypot(*layers)), rel=1e-5)  # every LoRA factor is in a layer
    after_step_2 = torch.load(run / "checkpoints" / "step_2.pt", weights_only=False)["lora"]
    norm = float(torch.linalg.vector_norm(torch.stack([t.float().norm() for t in after_step_2.values()])))
    assert dict(got["model_wise_params_norm"])[3] == pytest.approx(norm, rel=1e-6)
    evals = [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if r.get("split") == "eval"]
    assert evals and got["validate_0/loss"] == [(s, pytest.approx(v, rel=1e-7)) for s, v in evals]


def test_tensorboard_after_a_resume_shows_each_step_once(assets):
    """An interrupted run's steps after its last checkpoint are written again on resume; TensorBoard
    shows each step once (the resumed writer's purge_step hides the earlier ones)."""
    params = write_params(assets, "tb_resume", max_steps=4, checkpoint_steps=2)
    run = train(params, assets["hf"], assets["root"] / "run_tb_resume", "cpu", progress=False)
    first = scalars(run)
    # what a kill right after step 4's metrics and events (before its checkpoint) leaves behind
    (run / "run.json").unlink()
    (run / "checkpoints" / "step_4.pt").unlink()
    # TensorBoard orders event files by name, whose first field is the second the writer opened; a
    # real resume is another process, seconds later at least. In one process, within one second, the
    # names' last field (a per-process counter, compared as text: "10" < "9") could decide the order.
    time.sleep(1.1)
    train(params, assets["hf"], run, "cpu", progress=False)
    assert len(list((run / "events").glob("events.out.tfevents.*"))) == 2
    again = scalars(run)
    assert [step for step, _ in again["loss"]] == [1, 2, 3, 4]
    assert again["loss"] == first["loss"]
    assert [r["step"] for r in train_rows(run)] == [1, 2, 3, 4]
    assert json.loads((run / "run.json").read_text())["tensorboard"]["purge_step"] == 3


def test_without_the_tensorboard_package_the_run_goes_on_and_says_why(assets, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` raises ImportError
    run = train(write_params(assets, "tb_none", max_steps=2), assets["hf"], assets["root"] / "run_tb_none",
                "cpu", progress=False)  # fmt: skip
    assert len(train_rows(run)) == 2 and not (run / "events").exists()
    record = json.loads((run / "run.json").read_text())["tensorboard"]
    assert record == {
        "written": False,
        "reason": "the tensorboard package is not installed (pip install tensorboard)",
    }
    assert "TensorBoard events not written" in capsys.readouterr().err
