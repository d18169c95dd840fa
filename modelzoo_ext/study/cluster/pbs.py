"""PBS Pro / OpenPBS: job-array scripts, `qsub`, task states from `qstat -f -x -t -F json`, `qdel`.

    #PBS -J 0-N%M                  one subjob per run; %M sets max_run_subjobs (OpenPBS 20+,
                                   PBS Professional 2020+); a single run is `-J 0-1:2` (PBS wants
                                   X < Y, and step 2 leaves index 0 alone)
    qsub SCRIPT                    -> `1234[].server` (recorded by `submit`)
    qsub -W depend=afterany:TRAIN EVAL
                                   PBS has no task-wise array dependency: a dependency names a whole
                                   array (a subjob cannot be a dependency target), and an array is
                                   `afterok` only if every subjob exited 0. So the evaluation array
                                   starts when the whole training array has ended, whatever each
                                   subjob's outcome, and each evaluation task finds its run's
                                   training record (or refuses, and the run stays not done)
    qsub -W depend=afterok:ASSETS TRAIN
                                   the arrays wait for the assets job (one subjob) to succeed; an
                                   assets job waits for an earlier one still queued or running
    qstat -f -x -t -F json IDS     subjobs with job_state Q/H/W (pending), R/E (running),
                                   X/F (ended: substate 92 finished, 93 failed, 91 terminated)
                                   and Exit_status (-29 walltime, -27/-26 memory, >256: signal)
    qdel IDS

The job starts in $HOME; `-V` passes the submitting shell's environment (the venv, PYTHONPATH)
as SLURM does by default. `qsub` runs in the round directory: `-o logs/...` is relative to it.
Multi-node runs ask for one chunk per node (`select=N:...`, `place=scatter`).
"""

from __future__ import annotations

import json
import subprocess

from modelzoo_ext.errors import UserError
from modelzoo_ext.study.cluster.arrays import ASSETS, ArrayPlan
from modelzoo_ext.study.cluster.launch import script_body
from modelzoo_ext.study.cluster.spec import StageResources, Submission
from modelzoo_ext.study.cluster.states import TaskState

NAME = "pbs"
EXTENSION = ".pbs"
INDEX_VAR = "PBS_ARRAY_INDEX"
PENDING, RUNNING, ENDED = set("QHWT"), set("RESUB"), set("XF")
SUBSTATE_TERMINATED, SUBSTATE_FINISHED, SUBSTATE_FAILED = 91, 92, 93
EXIT_WALLTIME, EXIT_MEMORY = -29, (-27, -26)


def check_sweep_dir(sweep_dir: str) -> None:
    """No character of a path is known to upset PBS: the script quotes it (untested on a PBS server)."""


def _walltime(seconds: int) -> str:
    minutes, s = divmod(seconds, 60)
    hours, m = divmod(minutes, 60)
    return f"{hours:02d}:{m:02d}:{s:02d}"


def _select(res: StageResources, sub: Submission) -> str:
    chunk = [str(res.nodes_per_run)]
    chunk += [f"ncpus={res.cpus_per_node}"] if res.cpus_per_node else []
    chunk += (
        [f"{sub.pbs_gpu_resource}={res.gpus_per_node}"] if res.gpus_per_node and sub.pbs_gpu_resource else []
    )
    chunk += [f"mem={res.mem_mib}mb"] if res.mem_mib else []
    return ":".join(chunk + list(sub.pbs_select))


def array_range(count: int, max_concurrent: int | None) -> str:
    """`-J` value for `count` subjobs indexed from 0."""
    indices = "0-1:2" if count == 1 else f"0-{count - 1}"
    return indices + (f"%{max_concurrent}" if max_concurrent else "")


def render_script(array: ArrayPlan, sub: Submission, run_list: str, sweep_dir: str, entry: list[str]) -> str:
    """The qsub script of `array`: directives, then the body (`launch.script_body`)."""
    res = sub.resources(array.stage)
    throttle = sub.max_concurrent if array.stage != ASSETS else None
    options = [
        f"-N {sub.job_name}-{array.name}",
        f"-J {array_range(array.tasks, throttle)}",
        f"-o logs/{array.name}.^array_index^.out",
        "-j oe",
        "-V",
        f"-l select={_select(res, sub)}",
    ]
    options += ["-l place=scatter"] if res.nodes_per_run > 1 else []
    options += [f"-l walltime={_walltime(res.time_s)}"] if res.time_s is not None else []
    options += [f"-A {sub.account}"] if sub.account else []
    queue = sub.partition_for(array.stage)
    options += [f"-q {queue}"] if queue else []
    lines = ["#!/bin/bash", *(f"#PBS {o}" for o in options), *sub.extra_directives]
    lines += script_body(NAME, INDEX_VAR, array, sub, run_list, sweep_dir, entry)
    return "\n".join(lines) + "\n"


DEPENDENCY = {"per_task": "afterany", "ok": "afterok", "any": "afterany"}  # no task-wise form


def submit_argv(script: str, after_job: str | None, *, kind: str = "per_task") -> list[str]:
    """qsub's argv (run in the round directory). `after_job` (ids joined by `:`): what this array
    waits for; `kind`: `per_task` (an evaluation array after its training array: PBS has no
    task-wise form, so after the whole array, whatever its outcome), `ok` (after the assets job
    succeeded), `any` (after it ended)."""
    return ["qsub", *(["-W", f"depend={DEPENDENCY[kind]}:{after_job}"] if after_job else []), script]


def parse_job_id(stdout: str) -> str:
    """`1234[].server` (the array's id, as qsub prints it)."""
    job_id = stdout.strip()
    if not job_id or not job_id.split(".")[0].split("[")[0].isdigit():
        raise UserError(f"qsub answered {stdout.strip()!r}, not a job id")
    return job_id


def job_key(job_id: str) -> str:
    """The sequence number that names a job on its server: `1234[].pbs01` -> `1234`."""
    return job_id.split(".")[0].split("[")[0]


def cancel_argv(job_ids: list[str]) -> list[str]:
    return ["qdel", *job_ids]


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def subjob_state(attrs: dict) -> TaskState:
    """One subjob's attributes (`qstat -f -F json`) -> its state."""
    raw = str(attrs.get("job_state", ""))
    substate, status = _int(attrs.get("substate")), _int(attrs.get("Exit_status"))
    comment = str(attrs.get("comment", ""))
    if raw in PENDING:
        return TaskState("PENDING", raw, reason=comment)
    if raw in RUNNING:
        return TaskState("RUNNING", raw, reason=comment)
    if raw not in ENDED:
        return TaskState("UNKNOWN", raw, reason=comment)
    # PBS reports a job killed by signal S as 256 + S
    exit_code, signal = (None, status - 256) if status is not None and status > 256 else (status, None)
    if substate == SUBSTATE_TERMINATED or status is None:
        state = "CANCELLED"
    elif status == 0:
        state = "COMPLETED"
    elif status == EXIT_WALLTIME:
        state = "TIMEOUT"
    elif status in EXIT_MEMORY:
        state = "OUT_OF_MEMORY"
    else:
        state = "FAILED"
    return TaskState(state, raw, exit_code, signal, comment)


def parse_qstat_json(text: str) -> dict[tuple[str, int], TaskState]:
    """`qstat -f -x -t -F json` -> {(job key, subjob index): state}; array parents are skipped."""
    if not text.strip():
        return {}
    jobs = json.loads(text, strict=False).get("Jobs", {})  # strict=False: raw control chars in values
    states = {}
    for job_id, attrs in jobs.items():
        inside = job_id.split("[", 1)[1].split("]", 1)[0] if "[" in job_id else ""
        if not inside.isdigit():
            continue  # a plain job, or the array parent `1234[]`
        states[(job_key(job_id), int(inside))] = subjob_state(attrs)
    return states


def query(job_ids: list[str]) -> dict[tuple[str, int], TaskState]:
    """Every subjob of the arrays `job_ids` the server still knows (finished ones: job history)."""
    if not job_ids:
        return {}
    try:
        done = subprocess.run(["qstat", "-f", "-x", "-t", "-F", "json", *job_ids], capture_output=True,
                              text=True, timeout=120)  # fmt: skip
    except FileNotFoundError as exc:
        raise UserError("`qstat` is not installed here", fix="run this where PBS's commands are") from exc
    if done.returncode != 0 and not done.stdout.strip() and "Unknown Job Id" not in done.stderr:
        raise UserError(f"qstat failed: {done.stderr.strip()}", fix="check the PBS server (qstat -B)")
    return parse_qstat_json(done.stdout)
