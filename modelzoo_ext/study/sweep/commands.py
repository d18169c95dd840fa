"""The command lines of a run's steps: pure functions of its plan, nothing executed here.

    data_prepare_command   `sparse-lora data prepare`  training or held-out data, under the sweep's protocol
    masks_compute_command  `sparse-lora masks compute` the run's masks (data-aware ones calibrated on
                                                       the task's training data, never on evaluated examples)
    masks_apply_command    `sparse-lora masks apply`   the pruned base model
    train_command          cpu: `python -m gpu_reference.train`; gpu: torchrun (`python -m
                           torch.distributed.run`) of the same, or the launcher a job script
                           exported for its allocation; cs3: `cszoo fit` with the appliance flags
    cs_export_command      cs3: `sparse-lora convert cs-to-hf` of the last CS checkpoint into the
                           export the reference trainer writes (train/merged or train/adapter)
    eval_command           `sparse-lora eval` (lm-eval, and the held-out loss) of the model to evaluate

Python steps run with the interpreter that builds the command (`sys.executable`): the executor
builds them where it runs. `command_script` is the text of `command.sh`, the training steps for
a person to read or rerun by hand; every word in it is shell-quoted.
"""

from __future__ import annotations

import shlex
import sys

from modelzoo_ext.study.grid import DATA_DRIVEN
from modelzoo_ext.study.sweep.plan import RunPlan

LAST_CHECKPOINT = "LAST_CHECKPOINT"  # cs_export_command's placeholder for the checkpoint chosen at run time


def cli(*args: str) -> list[str]:
    """`sparse-lora ARGS` through this interpreter."""
    return [sys.executable, "-m", "modelzoo_ext.cli", *args]


def _offline_split(plan: RunPlan) -> list[str]:
    data = plan.spec.data
    return ["--held-out-fraction", str(data.held_out_fraction), "--split-salt", data.split_salt] if data.protocol == "offline" else []  # fmt: skip


def data_prepare_command(plan: RunPlan, split: str) -> list[str]:
    """Tokenise the run's task (`split`: `train` or `heldout`) into its asset directory."""
    data = plan.spec.data
    out = plan.assets.data if split == "train" else plan.assets.heldout
    return cli("data", "prepare", "--task", plan.task, "--protocol", data.protocol, "--source", data.source,
               "--tokenizer", plan.hf_dir, "--max-seq-length", str(data.max_seq_length), "--split", split,
               "--out", str(out), *_offline_split(plan))  # fmt: skip


def masks_compute_command(plan: RunPlan) -> list[str]:
    """The run's masks; data-aware methods calibrated on the task's training data."""
    command = cli("masks", "compute", "--model", plan.hf_dir, "--method", plan.method, "--structure", plan.structure,
                  "--scope", plan.spec.scope, "--sparsity", str(plan.sparsity), "--seed", str(plan.seeds["masks"]),
                  "--no-plot", "--out", str(plan.assets.masks))  # fmt: skip
    if plan.method in DATA_DRIVEN:
        cal = plan.spec.calibration
        command += ["--calibration-data", str(plan.assets.data), "--calibration-tokens", str(cal.tokens),
                    "--calibration-seqlen", str(cal.seq_len)]  # fmt: skip
    return command


def masks_apply_command(plan: RunPlan) -> list[str]:
    """The base model with the run's masks applied."""
    return cli("masks", "apply", "--model", plan.hf_dir, "--masks", str(plan.assets.masks), "--out", str(plan.assets.pruned))  # fmt: skip


def train_command(plan: RunPlan, launcher: list[str] | None = None) -> list[str] | None:
    """The backend's training command (None for evaluation-only runs).

    gpu: `launcher` (the words a job script exported for its allocation, `cluster.launch.
    launcher_from_env`: torchrun with the allocation's GPUs, or srun / mpiexec + torchrun across
    its nodes) starts `-m gpu_reference.train ...` in place of this machine's
    `torch.distributed.run --nproc-per-node=<gpu.nproc_per_node>`.
    """
    if not plan.trains:
        return None
    reference = [
        str(plan.params_path),
        "--hf-model",
        plan.hf_dir,
        "--out",
        str(plan.train_dir),
        "--no-progress",
    ]
    if plan.backend == "cpu":
        return [sys.executable, "-m", "gpu_reference.train", *reference, "--device", "cpu"]
    if plan.backend == "gpu":
        # `python -m torch.distributed.run` is torchrun, from this very environment.
        launcher = launcher or [sys.executable, "-m", "torch.distributed.run",
                                f"--nproc-per-node={plan.spec.gpu.nproc_per_node}"]  # fmt: skip
        memory = plan.spec.gpu.memory_arguments()
        return [*launcher, "-m", "gpu_reference.train", *reference, "--device", "cuda", *memory]
    cs = plan.spec.cs3
    command = [cs.cszoo, "fit", str(plan.params_path), "--target_device", "CSX", "--num_csx", str(cs.num_csx),
               "--model_dir", str(plan.train_dir)]  # fmt: skip
    if cs.mount_dirs:
        command += ["--mount_dirs", *cs.mount_dirs]
    if cs.python_paths:
        command += ["--python_paths", *cs.python_paths]
    return command + list(cs.extra_args)


def cs_export_command(plan: RunPlan, checkpoint: str = LAST_CHECKPOINT) -> list[str]:
    """cs3: a CS checkpoint -> the export the reference trainer writes (s2d adapters sit on the pruned base)."""
    base = plan.assets.pruned if plan.mode == "s2d" else plan.hf_dir
    return cli("convert", "cs-to-hf", "--checkpoint", checkpoint, "--config", str(plan.params_path),
               "--base-model", str(base), "--as", str(plan.export_kind), "--out", str(plan.export_dir))  # fmt: skip


def eval_command(plan: RunPlan, model_dir: str, adapter_dir: str | None) -> list[str]:
    """Evaluate `model_dir` (plus `adapter_dir`) under the sweep's protocol into `run_dir/eval.json`."""
    ev, data = plan.spec.eval, plan.spec.data
    command = cli("eval", "--model", model_dir, "--tasks", ",".join(ev.tasks or [plan.task]), "--data", data.source,
                  "--protocol", data.protocol, "--batch-size", str(ev.batch_size), "--device", ev.device,
                  "--out", str(plan.run_dir / "eval.json"), *_offline_split(plan))  # fmt: skip
    command += ["--adapter", adapter_dir] if adapter_dir else []
    command += ["--limit", str(ev.limit)] if ev.limit else []
    command += ["--max-gen-toks", str(ev.max_gen_toks)] if ev.max_gen_toks else []
    if plan.assets.heldout:
        command += ["--loss-data", plan.assets.heldout]
        command += ["--loss-limit", str(ev.heldout_limit)] if ev.heldout_limit else []
    return command


def command_script(plan: RunPlan) -> str | None:
    """`command.sh`: the run's training steps as a POSIX shell script, every word quoted (None: no training).

    For cs3 the export reads the highest-step `checkpoint_<step>.mdl` that `cszoo fit` wrote.
    """
    command = train_command(plan)
    if command is None:
        return None
    lines = ["#!/bin/sh", "set -e", shlex.join(command)]
    if plan.backend == "cs3":
        export = cs_export_command(plan)
        at = export.index(LAST_CHECKPOINT)
        last = f'"$(ls -v {shlex.quote(str(plan.train_dir))}/checkpoint_*.mdl | tail -n 1)"'
        lines.append(f"{shlex.join(export[:at])} {last} {shlex.join(export[at + 1 :])}")
    return "\n".join(lines) + "\n"
