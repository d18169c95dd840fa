"""Submit a sweep's unfinished runs as job arrays, ask the scheduler how they fare, cancel them.

    submit(sweep_dir, runs, is_done, submission, missing_assets=...)
                                                   -> SubmitResult (arrays and their job ids)
    submit(..., dry_run=True)                      writes DIR/scheduler/dry-run/, submits nothing
    task_states(sweep_dir)                         -> {run_id: {stage: RunTask}} (latest task each)
    cancel(sweep_dir)                              scancel / qdel every array with a task not ended

Layout (one writer: the submitting process; tasks never touch it):

    DIR/scheduler/jobs.json           the ledger: every round, its arrays, job ids and run lists
    DIR/scheduler/round-001/          one submission: for each array (`assets`, `train-0`,
        train-0.sbatch, train-0.runs  `eval-after-0`, `eval-0`) its script and run list
        submit.sh, logs/              (`INDEX<TAB>RUN_ID`), the commands submit ran (submit.sh)
                                      and the tasks' logs
    DIR/scheduler/dry-run/            the same, from `--dry-run` (replaced each time)

A second `submit` picks up exactly the runs that are not done by their own records (failed,
cancelled, timed out, never started), leaving out those with a task still queued or running.
When a shared asset of the runs submitted is missing (`missing_assets`), the round starts with
the assets job, and the arrays without another dependency wait for it to succeed; it waits itself
for an earlier round's assets job still queued or running, so no two build at once.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from modelzoo_ext.atomic import atomic_dir, atomic_file
from modelzoo_ext.errors import UserError
from modelzoo_ext.study.cluster import pbs, slurm
from modelzoo_ext.study.cluster.arrays import (
    ASSETS,
    ArrayPlan,
    RunWork,
    Selection,
    plan_arrays,
    with_assets_job,
)
from modelzoo_ext.study.cluster.launch import entry_command
from modelzoo_ext.study.cluster.shell import Var, concat, join
from modelzoo_ext.study.cluster.spec import Submission
from modelzoo_ext.study.cluster.states import TaskState

SCHEDULERS: dict[str, ModuleType] = {"slurm": slurm, "pbs": pbs}
SCHEDULER_DIR = "scheduler"
LEDGER = "jobs.json"
_AFTER = "@@AFTER_JOB@@"


@dataclass(frozen=True)
class RunTask:
    """The latest task of one run's stage: where it was submitted and what the scheduler says."""

    scheduler: str
    job_id: str
    index: int
    array: str
    round: int
    state: TaskState

    def describe(self) -> str:
        """`FAILED (exit 3) [slurm 123_4]`."""
        task = (
            f"{self.job_id}_{self.index}"
            if self.scheduler == "slurm"
            else self.job_id.replace("[]", f"[{self.index}]")
        )
        return f"{self.state.describe()} [{self.scheduler} {task}]"

    def to_dict(self) -> dict[str, Any]:
        """Where the task was submitted, its state's fields and `describe()`'s text."""
        where = {"scheduler": self.scheduler, "job_id": self.job_id, "index": self.index, "array": self.array,
                 "round": self.round}  # fmt: skip
        return {**where, **self.state.to_dict(), "describe": self.describe()}


@dataclass
class SubmitResult:
    """What `submit` wrote and submitted: the round directory, each array's job id, the selection
    (with the assets job first when `missing_assets` lists what it builds)."""

    round_dir: Path
    selection: Selection
    job_ids: dict[str, str] = field(default_factory=dict)
    dry_run: bool = False
    missing_assets: list[str] = field(default_factory=list)


# -- the ledger -----------------------------------------------------------------------------------
def ledger_path(sweep_dir: Path) -> Path:
    return sweep_dir / SCHEDULER_DIR / LEDGER


def read_ledger(sweep_dir: Path) -> dict[str, Any]:
    """Every round submitted from this sweep directory (empty before the first)."""
    path = ledger_path(sweep_dir)
    return json.loads(path.read_text()) if path.is_file() else {"version": 1, "rounds": []}


def _write_ledger(sweep_dir: Path, ledger: dict[str, Any]) -> None:
    with atomic_file(ledger_path(sweep_dir)) as tmp:
        tmp.write_text(json.dumps(ledger, indent=2) + "\n")


# -- states ---------------------------------------------------------------------------------------
def _latest_tasks(ledger: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """(run, stage) -> where its latest task was submitted (later rounds win)."""
    latest = {}
    for rnd in ledger["rounds"]:
        for array in rnd["arrays"]:
            for index, run_id in enumerate(array["runs"]):
                index = 0 if array["stage"] == ASSETS else index  # one task builds for all its runs
                latest[(run_id, array["stage"])] = {
                    "scheduler": rnd["scheduler"], "job_id": array["job_id"], "index": index,
                    "array": array["name"], "round": rnd["round"],
                }  # fmt: skip
    return latest


def task_states(sweep_dir: str | Path, *, unreachable_ok: bool = False) -> dict[str, dict[str, RunTask]]:
    """{run_id: {"train"|"eval"|"assets": RunTask}} for every run ever submitted from `sweep_dir`
    (`assets`: the latest assets job that built for the run).

    One query per scheduler. A task the scheduler no longer knows is UNKNOWN. With
    `unreachable_ok` (for `sweep status` on a machine without the scheduler), a failed query makes
    every task UNKNOWN with the reason, instead of an error.
    """
    latest = _latest_tasks(read_ledger(Path(sweep_dir).resolve()))
    known: dict[str, dict[tuple[str, int], TaskState]] = {}
    failure: dict[str, str] = {}
    for name in {t["scheduler"] for t in latest.values()}:
        module = SCHEDULERS[name]
        try:
            known[name] = module.query(
                sorted({t["job_id"] for t in latest.values() if t["scheduler"] == name})
            )
        except UserError as exc:
            if not unreachable_ok:
                raise
            known[name], failure[name] = {}, str(exc)
    result: dict[str, dict[str, RunTask]] = {}
    for (run_id, stage), task in latest.items():
        module = SCHEDULERS[task["scheduler"]]
        gone = TaskState(
            "UNKNOWN", reason=failure.get(task["scheduler"], "the scheduler no longer knows this task")
        )
        state = known[task["scheduler"]].get((module.job_key(task["job_id"]), task["index"]), gone)
        result.setdefault(run_id, {})[stage] = RunTask(state=state, **task)
    return result


def _active(sweep_dir: Path) -> tuple[set[str], tuple[str, ...]]:
    """The runs with a task queued or running, and the assets jobs queued or running."""
    states = task_states(sweep_dir)
    runs = {run for run, stages in states.items() if any(t.state.active for t in stages.values())}
    assets = {
        t.job_id for stages in states.values() for s, t in stages.items() if s == ASSETS and t.state.active
    }
    return runs, tuple(sorted(assets))


def _dependency(
    array: ArrayPlan, job_id: Callable[[str], str], earlier_assets: tuple[str, ...]
) -> tuple[str | None, str]:
    """(the job ids `array` waits for, joined by `:`; the kind of wait): an assets job waits for the
    earlier ones still queued or running to end (`any`: one builder of shared assets at a time, and
    it finds their assets built); an array after the assets job waits for it to succeed (`ok`); an
    evaluation array follows its training array (`per_task`)."""
    if array.stage == ASSETS:
        return (":".join(earlier_assets) or None), "any"
    if array.after:
        return job_id(array.after), "ok" if array.after == ASSETS else "per_task"
    return None, "per_task"


# -- writing a round ------------------------------------------------------------------------------
def _var(array_name: str) -> str:
    return array_name.replace("-", "_")


def _submit_sh(module: ModuleType, arrays: tuple[ArrayPlan, ...], earlier_assets: tuple[str, ...]) -> str:
    """The commands `submit` runs, as a script a user could run by hand from the round directory."""
    lines = ["#!/bin/bash", "# What `sparse-lora sweep submit` runs from this directory (job ids: ../jobs.json).",
             "set -euo pipefail", 'cd "$(dirname "$0")"']  # fmt: skip
    for array in arrays:
        after, kind = _dependency(array, lambda name: _AFTER, earlier_assets)
        argv = module.submit_argv(array.name + module.EXTENSION, after, kind=kind)
        words = [concat(*_split_after(w, _var(array.after))) if _AFTER in w else join([w]) for w in argv]
        lines.append(f"{_var(array.name)}=$({' '.join(words)})")
        if module is slurm:  # `--parsable` may answer `id;cluster`
            lines.append(f"{_var(array.name)}=${{{_var(array.name)}%%;*}}")
    return "\n".join(lines) + "\n"


def _split_after(word: str, var: str) -> list[str | Var]:
    before, _, after = word.partition(_AFTER)
    return [before, Var(var), after]


def _write_round(target: Path, module: ModuleType, sub: Submission, selection: Selection, sweep_dir: Path,
                 entry: list[str], earlier_assets: tuple[str, ...]) -> None:  # fmt: skip
    """Scripts, run lists, submit.sh and logs/ of one round, all appearing at once (in `target`)."""
    with atomic_dir(target) as tmp:
        (tmp / "logs").mkdir()
        for array in selection.arrays:
            run_list = target / f"{array.name}.runs"
            (tmp / run_list.name).write_text("".join(f"{i}\t{r}\n" for i, r in enumerate(array.run_ids)))
            script = module.render_script(array, sub, str(run_list), str(sweep_dir), entry)
            (tmp / f"{array.name}{module.EXTENSION}").write_text(script)
        (tmp / "submit.sh").write_text(_submit_sh(module, selection.arrays, earlier_assets))


# -- submit / cancel ------------------------------------------------------------------------------
def submit(
    sweep_dir: str | Path,
    runs: list[RunWork],
    is_done: Callable[[str, str], bool],
    submission: Submission,
    *,
    dry_run: bool = False,
    entry: list[str] | None = None,
    missing_assets: Callable[[tuple[str, ...]], list[str]] | None = None,
) -> SubmitResult:
    """Submit every run of `runs` that is not done (`is_done(run_id, stage)`) and not queued/running.

    `entry`: the words before `--sweep DIR --run ID --stage S` in each task (default: the study's
    executor entry point, `launch.entry_command`). `missing_assets(run_ids)`: the shared assets of
    those runs that do not exist yet; when there are some, the assets job builds them first. Job
    ids go into the ledger after each `sbatch`/`qsub`, so a failure part-way leaves what was
    submitted recorded.
    """
    sweep_dir = Path(sweep_dir).resolve()
    if not sweep_dir.is_dir():
        raise UserError("sweep directory not found", where=str(sweep_dir), fix="run `sweep plan` first")
    module = SCHEDULERS[submission.scheduler]
    module.check_sweep_dir(str(sweep_dir))
    ledger = read_ledger(sweep_dir)
    active, earlier_assets = _active(sweep_dir) if ledger["rounds"] else (set(), ())
    selection = plan_arrays(runs, is_done, active.__contains__, submission.array_limit)
    number = len(ledger["rounds"]) + 1
    round_dir = sweep_dir / SCHEDULER_DIR / ("dry-run" if dry_run else f"round-{number:03d}")
    result = SubmitResult(round_dir, selection, dry_run=dry_run)
    if not selection.arrays:
        return result
    if missing_assets is not None:
        result.missing_assets = missing_assets(tuple(r for a in selection.arrays for r in a.run_ids))
        if result.missing_assets:
            result.selection = selection = with_assets_job(selection)
    _write_round(round_dir, module, submission, selection, sweep_dir, entry or entry_command(submission.python),
                 earlier_assets)  # fmt: skip
    if dry_run:
        return result
    record = {"round": number, "scheduler": submission.scheduler, "dir": round_dir.name,
              "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "arrays": []}  # fmt: skip
    ledger["rounds"].append(record)
    for array in selection.arrays:
        after, kind = _dependency(array, result.job_ids.__getitem__, earlier_assets)
        argv = module.submit_argv(array.name + module.EXTENSION, after, kind=kind)
        done = subprocess.run(argv, cwd=round_dir, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            submitted = ", ".join(f"{k}={v}" for k, v in result.job_ids.items()) or "nothing"
            raise UserError(
                f"{argv[0]} refused {array.name}: {done.stderr.strip() or done.stdout.strip()}",
                where=str(round_dir / (array.name + module.EXTENSION)),
                fix=f"fix the submission and run submit again (already submitted and recorded: {submitted})",
            )
        result.job_ids[array.name] = module.parse_job_id(done.stdout)
        record["arrays"].append({"name": array.name, "stage": array.stage, "job_id": result.job_ids[array.name],
                                 "after": array.after, "runs": list(array.run_ids)})  # fmt: skip
        _write_ledger(sweep_dir, ledger)
    return result


def cancel(sweep_dir: str | Path) -> list[str]:
    """Cancel every recorded array that still has a task queued or running; the job ids cancelled."""
    states = task_states(sweep_dir)
    cancelled = []
    for name, module in SCHEDULERS.items():
        job_ids = sorted({t.job_id for stages in states.values() for t in stages.values()
                          if t.scheduler == name and t.state.active})  # fmt: skip
        if not job_ids:
            continue
        done = subprocess.run(module.cancel_argv(job_ids), capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise UserError(
                f"{module.cancel_argv([])[0]} failed: {done.stderr.strip()}", where=str(sweep_dir)
            )
        cancelled += job_ids
    return cancelled
