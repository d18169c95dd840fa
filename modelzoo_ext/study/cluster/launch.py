"""What an array task runs: the per-run entry point, and the torchrun launcher for its allocation.

A task runs ONE run's stage and writes only that run's directory:

    <python> -m <STAGE_ENTRY_MODULE> --sweep SWEEP_DIR --run RUN_ID --stage train|eval

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

from modelzoo_ext.study.cluster.shell import Var, concat, join, quote

# The one-process executor entry point (the study's plan/executor split): runs one run's stage.
STAGE_ENTRY_MODULE = "modelzoo_ext.study.run_stage"
LAUNCHER_ENV = "SPARSE_LORA_LAUNCHER"


def entry_command(python: str) -> list[str]:
    """The words before `--sweep DIR --run RUN_ID --stage S` of every task."""
    return [python, "-m", STAGE_ENTRY_MODULE]


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
