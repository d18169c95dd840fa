"""What a job runs: the per-run entry point, the assets job's command, and the torchrun launcher.

A task runs ONE run's stage and writes only that run's directory:

    <python> -m modelzoo_ext.study.sweep.task --sweep SWEEP_DIR --run RUN_ID --stage train|eval

The assets job, before the arrays, builds the shared assets of the runs in its run list:

    <python> -m modelzoo_ext.cli sweep assets SWEEP_DIR --run-list LIST

A task that holds GPUs exports `SPARSE_LORA_LAUNCHER`: the words that start the trainer's
processes inside the allocation; the executor puts them before `-m gpu_reference.train ...` in
place of its own `torch.distributed.run --nproc-per-node=N` (`launcher_from_env`):

    one node     python -m torch.distributed.run --standalone --nproc-per-node=G
    SLURM, N>1   srun --nodes=N --ntasks-per-node=1 --kill-on-bad-exit=1 python -m torch.distributed.run
                 --nnodes=N --nproc-per-node=G --rdzv-backend=c10d --rdzv-endpoint=HEAD:PORT --rdzv-id=JOB
                 (HEAD = first host of `scontrol show hostnames "$SLURM_JOB_NODELIST"`)
    PBS, N>1     mpiexec -n N --ppn 1 python -m torch.distributed.run ... (the same rendezvous;
                 HEAD = first line of $PBS_NODEFILE; ALCF's way on Polaris: one torchrun agent per
                 node started by the PALS mpiexec)

PORT is the submission's `rdzv_port` plus the task's array index modulo 1000, so two tasks whose
first nodes coincide do not meet at one rendezvous.
"""

from __future__ import annotations

import os
import shlex
import subprocess

from modelzoo_ext.errors import UserError
from modelzoo_ext.study.cluster.arrays import ASSETS, ArrayPlan
from modelzoo_ext.study.cluster.shell import Var, concat, join, quote
from modelzoo_ext.study.cluster.spec import Submission

# The one-process executor entry point (the study's plan/executor split): runs one run's stage.
STAGE_ENTRY_MODULE = "modelzoo_ext.study.sweep.task"
LAUNCHER_ENV = "SPARSE_LORA_LAUNCHER"


def entry_command(python: str) -> list[str]:
    """The words before `--sweep DIR --run RUN_ID --stage S` of every task."""
    return [python, "-m", STAGE_ENTRY_MODULE]


def assets_command(python: str, sweep_dir: str, run_list: str) -> list[str]:
    """The assets job's command: `sweep assets` for the runs of `run_list`, in one process."""
    return [python, "-m", "modelzoo_ext.cli", "sweep", "assets", sweep_dir, "--run-list", run_list]


def check_entry_point(python: str) -> None:
    """`UserError` unless `python`, in this environment (which the tasks inherit), imports the
    entry point: otherwise every task would fail."""
    probe = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({STAGE_ENTRY_MODULE!r}) is None)"
    try:
        found = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=300)
    except OSError as exc:
        raise UserError(f"the tasks' interpreter cannot run: {exc}", where=python,
                        fix="pass --python with an interpreter the compute nodes can run") from exc  # fmt: skip
    if found.returncode != 0:
        raise UserError(
            f"the tasks' interpreter cannot import {STAGE_ENTRY_MODULE}: every task would fail "
            f"({(found.stderr.strip().splitlines() or ['not found'])[-1]})",
            where=python,
            fix="submit from the environment the runs need (PYTHONPATH, venv), or pass --python",
        )


def launcher_lines(scheduler: str, python: str, nodes: int, gpus_per_node: int, rdzv_port: int) -> list[str]:
    """Shell lines that export `SPARSE_LORA_LAUNCHER` for a task with `gpus_per_node` GPUs on `nodes` nodes
    (none for a CPU task: the executor then runs its trainer as it does locally)."""
    if gpus_per_node == 0:
        return []
    torchrun = [python, "-m", "torch.distributed.run"]
    if nodes == 1:
        words = [*torchrun, "--standalone", f"--nproc-per-node={gpus_per_node}"]
        return [f"export {LAUNCHER_ENV}={join([join(words)])}"]
    if scheduler == "slurm":
        head = 'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'
        per_node = ["srun", f"--nodes={nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
        index, job = "SLURM_ARRAY_TASK_ID", "SLURM_JOB_ID"
    else:
        head = 'head_node=$(head -n 1 "$PBS_NODEFILE")'
        per_node = ["mpiexec", "-n", str(nodes), "--ppn", "1"]
        index, job = "PBS_ARRAY_INDEX", "PBS_JOBID"
    words = [*per_node, *torchrun, f"--nnodes={nodes}", f"--nproc-per-node={gpus_per_node}",
             "--rdzv-backend=c10d"]  # fmt: skip
    value = concat(join(words) + " --rdzv-endpoint=", Var("head_node"), ":", Var("rdzv_port"),
                   " --rdzv-id=", Var(job))  # fmt: skip
    return [head, f"rdzv_port=$(({rdzv_port} + {index} % 1000))", f"export {LAUNCHER_ENV}={value}"]


def assets_lines(sweep_dir: str, command: list[str]) -> list[str]:
    """The body of the assets job's script: build the shared assets in one process."""
    return [
        "set -euo pipefail",
        'echo "sparse-lora: building the shared assets of the runs submitted, on $(hostname)"',
        f"cd {quote(sweep_dir)}",
        f"exec {join(command)}",
    ]


def script_body(scheduler: str, index_var: str, array: ArrayPlan, sub: Submission, run_list: str,
                sweep_dir: str, entry: list[str]) -> list[str]:  # fmt: skip
    """What a job script of `array` runs after its directives: for the assets job `assets_lines`,
    for a train / eval array `task_lines` (a train task with GPUs also exports the launcher)."""
    if array.stage == ASSETS:
        return [
            f"# sparse-lora sweep submit: the missing shared assets of {len(array.run_ids)} run(s), in one task",
            *assets_lines(sweep_dir, assets_command(sub.python, sweep_dir, run_list)),
        ]
    res = sub.resources(array.stage)
    launcher = (
        launcher_lines(scheduler, sub.python, res.nodes_per_run, res.gpus_per_node, sub.rdzv_port)
        if array.stage == "train"
        else []
    )
    return [
        f"# sparse-lora sweep submit: the {array.stage} stage of {len(array.run_ids)} run(s), one per array index",
        *task_lines(index_var, run_list, sweep_dir, array.stage, entry, launcher),
    ]


def task_lines(index_var: str, run_list: str, sweep_dir: str, stage: str, entry: list[str],
               launcher: list[str]) -> list[str]:  # fmt: skip
    """The body of a job script: the task's array index picks its run from the run list
    (`INDEX<TAB>RUN_ID` lines), then the entry point runs that run's `stage`."""
    return [
        "set -euo pipefail",
        f"RUN_LIST={quote(run_list)}",
        f'index="${{{index_var}:?this script runs as a job array task}}"',
        """run_id=$(awk -F '\\t' -v i="$index" '$1 == i {print $2; exit}' "$RUN_LIST")""",
        'if [ -z "$run_id" ]; then echo "sparse-lora: no run for array index $index in $RUN_LIST" >&2; exit 2; fi',
        f'echo "sparse-lora: run $run_id, stage {stage}, array index $index, on $(hostname)"',
        f"cd {quote(sweep_dir)}",
        *launcher,
        f'exec {join(entry)} --sweep {quote(sweep_dir)} --run "$run_id" --stage {quote(stage)}',
    ]


def launcher_from_env(environ: dict[str, str] | None = None) -> list[str] | None:
    """The launcher words a job script exported (None outside such a task): the executor's prefix
    for `-m gpu_reference.train ...`."""
    value = (os.environ if environ is None else environ).get(LAUNCHER_ENV)
    return shlex.split(value) if value else None
