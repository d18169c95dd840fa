"""SLURM: job-array scripts, `sbatch`, task states from `squeue` (and `sacct`), `scancel`.

    #SBATCH --array=0-N%M                      one task per run; %M = max_concurrent
    sbatch --parsable SCRIPT                   -> job id (recorded by `submit`)
    sbatch --parsable --dependency=aftercorr:TRAIN --kill-on-invalid-dep=yes EVAL
                                               task i of EVAL starts when task i of TRAIN succeeded,
                                               and is cancelled (DependencyNeverSatisfied) when
                                               that one failed (checked on slurm 22.05)
    sbatch --parsable --dependency=afterok:ASSETS --kill-on-invalid-dep=yes TRAIN
                                               the arrays wait for the assets job to succeed (and
                                               are cancelled when it fails); an assets job waits
                                               for an earlier one still queued or running
                                               (afterany): one builder at a time
    squeue -h -t all -r -j IDS -O ArrayJobID,ArrayTaskID,State,exit_code,Reason
                                               one line per task, pending ones included; kept for
                                               MinJobAge seconds after a job ends
    sacct -n -P -X -j IDS --format=JobID,State,ExitCode
                                               what squeue has forgotten, where accounting is on
    scancel IDS

`sbatch` runs in the submission's round directory, so `--output=logs/...` needs no user path.
"""

from __future__ import annotations

import subprocess

from modelzoo_ext.errors import UserError
from modelzoo_ext.study.cluster.arrays import ASSETS, ArrayPlan
from modelzoo_ext.study.cluster.launch import script_body
from modelzoo_ext.study.cluster.spec import StageResources, Submission
from modelzoo_ext.study.cluster.states import TaskState

NAME = "slurm"
EXTENSION = ".sbatch"
INDEX_VAR = "SLURM_ARRAY_TASK_ID"
SQUEUE_FIELDS = "ArrayJobID:|,ArrayTaskID:|,State:|,exit_code:|,Reason:|"
STATE_OF = {
    **dict.fromkeys(("PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESV_DEL_HOLD"), "PENDING"),
    **dict.fromkeys(
        (
            "RUNNING",
            "CONFIGURING",
            "COMPLETING",
            "SUSPENDED",
            "STOPPED",
            "SIGNALING",
            "STAGE_OUT",
            "RESIZING",
            "POWER_UP_NODE",
        ),
        "RUNNING",
    ),  # fmt: skip
    "COMPLETED": "COMPLETED",
    **dict.fromkeys(("FAILED", "SPECIAL_EXIT"), "FAILED"),
    **dict.fromkeys(("CANCELLED", "PREEMPTED", "REVOKED"), "CANCELLED"),
    **dict.fromkeys(("TIMEOUT", "DEADLINE"), "TIMEOUT"),
    "OUT_OF_MEMORY": "OUT_OF_MEMORY",
    **dict.fromkeys(("NODE_FAIL", "BOOT_FAIL"), "NODE_FAIL"),
}


def check_sweep_dir(sweep_dir: str) -> None:
    """SLURM reads `\\` and `%` in a job's output path (the round directory's logs/) as its own
    pattern syntax, and the task fails before it starts (seen on 22.05): refuse them up front."""
    bad = sorted({c for c in sweep_dir if c in "\\%"})
    if bad:
        raise UserError(
            f"SLURM cannot write job logs under a path containing {' or '.join(map(repr, bad))}",
            where=sweep_dir,
            fix="move or rename the sweep directory",
        )


def _time(seconds: int) -> str:
    minutes, s = divmod(seconds, 60)
    hours, m = divmod(minutes, 60)
    days, h = divmod(hours, 24)
    return f"{days}-{h:02d}:{m:02d}:{s:02d}"


def _resource_directives(res: StageResources) -> list[str]:
    lines = [f"--nodes={res.nodes_per_run}", "--ntasks-per-node=1"]
    lines += [f"--gpus-per-node={res.gpus_per_node}"] if res.gpus_per_node else []
    lines += [f"--cpus-per-task={res.cpus_per_node}"] if res.cpus_per_node else []
    lines += [f"--mem={res.mem_mib}M"] if res.mem_mib else []
    lines += [f"--time={_time(res.time_s)}"] if res.time_s is not None else []
    return lines


def render_script(array: ArrayPlan, sub: Submission, run_list: str, sweep_dir: str, entry: list[str]) -> str:
    """The sbatch script of `array`: directives, then the body (`launch.script_body`)."""
    throttle = f"%{sub.max_concurrent}" if sub.max_concurrent and array.stage != ASSETS else ""
    options = [
        f"--job-name={sub.job_name}-{array.name}",
        f"--array=0-{array.tasks - 1}{throttle}",
        f"--output=logs/{array.name}_%A_%a.out",
        *_resource_directives(sub.resources(array.stage)),
    ]
    options += [f"--account={sub.account}"] if sub.account else []
    partition = sub.partition_for(array.stage)
    options += [f"--partition={partition}"] if partition else []
    lines = ["#!/bin/bash", *(f"#SBATCH {o}" for o in options), *sub.extra_directives]
    lines += script_body(NAME, INDEX_VAR, array, sub, run_list, sweep_dir, entry)
    return "\n".join(lines) + "\n"


DEPENDENCY = {"per_task": "aftercorr", "ok": "afterok", "any": "afterany"}


def submit_argv(script: str, after_job: str | None, *, kind: str = "per_task") -> list[str]:
    """sbatch's argv (run in the round directory). `after_job` (ids joined by `:`): what this array
    waits for; `kind`: `per_task`, task i after task i succeeded (an evaluation array after its
    training array), `ok`, after the whole job succeeded (the assets job), `any`, after it ended."""
    depend = (
        [f"--dependency={DEPENDENCY[kind]}:{after_job}", "--kill-on-invalid-dep=yes"] if after_job else []
    )
    return ["sbatch", "--parsable", *depend, script]


def parse_job_id(stdout: str) -> str:
    """`123` or `123;cluster` -> `123`."""
    job_id = stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise UserError(f"sbatch answered {stdout.strip()!r}, not a job id")
    return job_id


def job_key(job_id: str) -> str:
    """The id squeue reports as ArrayJobID: sbatch's answer itself."""
    return job_id


def cancel_argv(job_ids: list[str]) -> list[str]:
    return ["scancel", *job_ids]


def _decode_wait_status(raw: str) -> tuple[int | None, int | None]:
    """squeue's exit_code is the raw wait status: 768 -> exit 3; 15 -> signal 15."""
    if not raw.strip().lstrip("-").isdigit():
        return None, None
    status = int(raw)
    if status & 0x7F:
        return None, status & 0x7F
    return status >> 8, None


def parse_squeue(text: str) -> dict[tuple[str, int], TaskState]:
    """`squeue -h -r -O SQUEUE_FIELDS` lines -> {(array job id, task index): state}."""
    states = {}
    for line in text.splitlines():
        fields = line.split("|")
        if len(fields) < 5 or not fields[1].strip().isdigit():
            continue  # not an array task (ArrayTaskID N/A)
        job, index, raw, code, reason = (f.strip() for f in fields[:5])
        exit_code, signal = _decode_wait_status(code)
        states[(job, int(index))] = TaskState(STATE_OF.get(raw, "UNKNOWN"), raw, exit_code, signal, reason)
    return states


def parse_sacct(text: str) -> dict[tuple[str, int], TaskState]:
    """`sacct -n -P -X --format=JobID,State,ExitCode` lines (`123_4|CANCELLED by 0|0:15`)."""
    states = {}
    for line in text.splitlines():
        fields = line.split("|")
        if len(fields) < 3 or "_" not in fields[0]:
            continue
        job, index = fields[0].split("_", 1)
        if not index.isdigit():
            continue  # `123_[5-7]`: still pending, squeue shows those
        raw = fields[1].split()[0] if fields[1].strip() else ""
        code, _, sig = fields[2].partition(":")
        exit_code = int(code) if code.isdigit() else None
        signal = int(sig) if sig.isdigit() and int(sig) else None
        states[(job, int(index))] = TaskState(STATE_OF.get(raw, "UNKNOWN"), raw, exit_code, signal, fields[1])
    return states


def _run(argv: list[str]) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        return None


def query(job_ids: list[str]) -> dict[tuple[str, int], TaskState]:
    """Every task of the array jobs `job_ids` the controller (or the accounting database) knows."""
    if not job_ids:
        return {}
    listed = ",".join(job_ids)
    done = _run(["squeue", "-h", "-t", "all", "-r", "-j", listed, "-O", SQUEUE_FIELDS])
    if done is None:
        raise UserError("`squeue` is not installed here", fix="run this where SLURM's commands are")
    if done.returncode != 0 and "Invalid job id" not in done.stderr:
        raise UserError(f"squeue failed: {done.stderr.strip()}", fix="check `scontrol ping` and SLURM_CONF")
    states = parse_squeue(done.stdout) if done.returncode == 0 else {}
    accounted = _run(["sacct", "-n", "-P", "-X", "-j", listed, "--format=JobID,State,ExitCode"])
    if (
        accounted is not None and accounted.returncode == 0
    ):  # accounting disabled: exit 1, "accounting storage is disabled"
        states = {**parse_sacct(accounted.stdout), **states}
    return states
