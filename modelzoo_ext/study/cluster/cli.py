"""`sparse-lora sweep submit | jobs | cancel`: a planned sweep on a SLURM or PBS cluster.

    sparse-lora sweep submit DIR --scheduler slurm --account A --partition gpu --time 12:00:00 \\
        --gpus-per-run 4 --max-concurrent 16 [--dry-run] [--skip-preflight]
    sparse-lora sweep jobs DIR        # each submitted run's latest train / eval task, as the scheduler says
    sparse-lora sweep cancel DIR      # scancel / qdel what is still queued or running

Which runs a sweep directory holds and which are done is read by `planned_work` and
`registry_done` below: the one place that knows the sweep's plan and record layout.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from modelzoo_ext.errors import UserError
from modelzoo_ext.study.preflight.cli import add_skip_preflight_argument, preflight_before_submit

if TYPE_CHECKING:
    from modelzoo_ext.study.cluster.arrays import RunWork


def register(subparsers: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    """Add `submit`, `jobs` and `cancel` to the `sweep` group (registered by the study's CLI)."""
    sweep = groups["sweep"]
    _add_submit(sweep)
    jobs = sweep.add_parser(
        "jobs", help="each submitted run's latest train/eval task as the scheduler reports it"
    )
    jobs.add_argument("sweep_dir")
    jobs.add_argument("--json", action="store_true", help="print JSON instead of a table")
    jobs.set_defaults(func=_run_jobs)
    cancel = sweep.add_parser(
        "cancel", help="cancel the sweep's arrays that still have tasks queued or running"
    )
    cancel.add_argument("sweep_dir")
    cancel.set_defaults(func=_run_cancel)


def _add_submit(sweep) -> None:
    p = sweep.add_parser(
        "submit",
        help="submit the unfinished runs as SLURM / PBS job arrays (train, then eval task-wise)",
        description="Each stage of the planned runs that are not done becomes a job array, one task per run; "
        "a run's evaluation task waits for its training task (SLURM: task-wise, aftercorr; PBS: after the whole "
        "training array). Runs with a task still queued or running are left alone; running submit again picks "
        "up exactly the runs that are not done. Job ids are recorded in DIR/scheduler/jobs.json. "
        "See docs/cluster.md.",
    )
    p.add_argument("sweep_dir")
    p.add_argument("--scheduler", choices=("slurm", "pbs"), required=True)
    p.add_argument(
        "--backend", choices=("gpu", "cpu"), default="gpu", help="train the runs of this backend [gpu]"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="write the scripts into DIR/scheduler/dry-run/, submit nothing"
    )
    p.add_argument("--job-name", help="job name prefix [the sweep's name]")
    p.add_argument("--account", help="account / project to charge (SLURM --account, PBS -A)")
    p.add_argument("--partition", "--queue", dest="partition", help="SLURM partition(s) or PBS queue")
    p.add_argument(
        "--max-concurrent", type=int, help="array tasks running at once (SLURM %%N, PBS max_run_subjobs)"
    )
    p.add_argument("--directive", action="append", default=[], metavar="LINE",
                   help="extra directive line passed through, e.g. '#SBATCH --qos=high' (repeatable)")  # fmt: skip
    p.add_argument("--time", help="training time limit per run, e.g. 12:00:00 or 1-00:00:00")
    p.add_argument(
        "--gpus-per-run", type=int, help="GPUs per training run [the sweep's gpu.nproc_per_node; cpu: 0]"
    )
    p.add_argument("--nodes-per-run", type=int, default=1, help="nodes per training run [1]")
    p.add_argument("--cpus-per-node", type=int, help="CPUs per node of a training run")
    p.add_argument("--mem-per-node", help="memory per node of a training run, e.g. 256G")
    p.add_argument("--eval-time", help="evaluation time limit per run [--time]")
    p.add_argument(
        "--eval-gpus", type=int, help="GPUs per evaluation [1 when the sweep's eval.device is cuda, else 0]"
    )
    p.add_argument("--eval-cpus", type=int, help="CPUs per evaluation [--cpus-per-node]")
    p.add_argument("--eval-mem", help="memory per evaluation [--mem-per-node]")
    p.add_argument("--python", help="interpreter the tasks run, on a shared filesystem [this one]")
    p.add_argument("--pbs-gpu-resource", default="ngpus",
                   help="PBS chunk resource counting GPUs; `none` where nodes come whole (Polaris) [ngpus]")  # fmt: skip
    p.add_argument("--pbs-select", action="append", default=[], metavar="KEY=VALUE",
                   help="more items of the PBS select chunk, e.g. system=polaris (repeatable)")  # fmt: skip
    p.add_argument("--max-array-size", type=int, help="most tasks per array [SLURM 1001, PBS 10000]")
    add_skip_preflight_argument(p)
    p.set_defaults(func=_run_submit)


# -- the sweep's plan and records -------------------------------------------------------------------
def _sweep_json(sweep_dir: Path) -> dict:
    path = sweep_dir / "sweep.json"
    if not path.is_file():
        raise UserError("not a planned sweep directory (no sweep.json)", where=str(sweep_dir),
                        fix="run `sweep plan` first")  # fmt: skip
    return json.loads(path.read_text())


def planned_work(sweep_dir: Path, backend: str) -> list[RunWork]:
    """Each planned run's needs: trains here when its backend is `backend`; evaluation-only for mode none."""
    from modelzoo_ext.study.cluster.arrays import RunWork

    work = []
    for path in sorted((sweep_dir / "runs").glob("*/run.json")):
        run = json.loads(path.read_text())
        trains = run["mode"] != "none"
        work.append(
            RunWork(run["run_id"], trains_here=trains and run["backend"] == backend, needs_training=trains)
        )
    return work


def registry_done(sweep_dir: Path) -> Callable[[str, str], bool]:
    """`is_done(run_id, stage)` from the sweep's records: train is done once the checked export is
    recorded (status trained), eval once the run succeeded (as `sweep run` decides what to skip)."""
    from modelzoo_ext.study.registry import Registry
    from modelzoo_ext.study.sweep import REGISTRY_FILE

    records = {r.run_id: r for r in Registry(sweep_dir / REGISTRY_FILE).runs()}

    def is_done(run_id: str, stage: str) -> bool:
        record = records.get(run_id)
        if record is None:
            return False
        return record.status == "succeeded" or (stage == "train" and "model" in record.artifacts)

    return is_done


# -- handlers -------------------------------------------------------------------------------------
def _submission(args, sweep: dict):
    import sys

    from modelzoo_ext.study.cluster.spec import JOB_NAME, build_submission

    gpus = args.gpus_per_run
    if gpus is None:
        gpus = (
            sweep.get("gpu", {}).get("nproc_per_node", 1) * args.nodes_per_run if args.backend == "gpu" else 0
        )
    eval_gpus = args.eval_gpus
    if eval_gpus is None:
        eval_gpus = 1 if str(sweep.get("eval", {}).get("device", "cpu")).startswith("cuda") else 0
    name = args.job_name or (sweep.get("name") if JOB_NAME.match(str(sweep.get("name"))) else "sparse-lora")
    train = dict(time=args.time, gpus_per_run=gpus, nodes_per_run=args.nodes_per_run,
                 cpus_per_node=args.cpus_per_node, mem_per_node=args.mem_per_node)  # fmt: skip
    evaluation = dict(time=args.eval_time or args.time, gpus_per_run=eval_gpus,
                      cpus_per_node=args.eval_cpus or args.cpus_per_node,
                      mem_per_node=args.eval_mem or args.mem_per_node)  # fmt: skip
    return build_submission(
        scheduler=args.scheduler, job_name=name, account=args.account, partition=args.partition,
        max_concurrent=args.max_concurrent, extra_directives=tuple(args.directive),
        train=train, eval=evaluation,
        python=args.python or sys.executable,
        pbs_gpu_resource=None if args.pbs_gpu_resource == "none" else args.pbs_gpu_resource,
        pbs_select=tuple(args.pbs_select), max_array_size=args.max_array_size,
    )  # fmt: skip


def _run_submit(args) -> int:
    from modelzoo_ext.study.cluster.launch import STAGE_ENTRY_MODULE
    from modelzoo_ext.study.cluster.submit import submit

    sweep_dir = Path(args.sweep_dir).resolve()
    sweep = _sweep_json(sweep_dir)
    submission = _submission(args, sweep)
    if importlib.util.find_spec(STAGE_ENTRY_MODULE) is None and not args.dry_run:
        raise UserError(
            f"the per-run entry point {STAGE_ENTRY_MODULE} is not installed here: every task would fail",
            fix="install the version of this package that has it (or use --dry-run to see the scripts)",
        )
    preflight_before_submit(args, sweep_dir)  # exit 2 with the reasons, nothing submitted, when a check fails
    result = submit(sweep_dir, planned_work(sweep_dir, args.backend), registry_done(sweep_dir), submission,
                    dry_run=args.dry_run)  # fmt: skip
    sel = result.selection
    print(f"done: {len(sel.done)}, queued or running: {len(sel.active)}, "
          f"waiting for training elsewhere: {len(sel.waiting)}, to submit: {sel.run_count}")  # fmt: skip
    for array in sel.arrays:
        job = result.job_ids.get(array.name, "(dry run)" if result.dry_run else "")
        after = f" after {array.after}" if array.after else ""
        print(f"  {array.name:<14} {array.stage:<5} {len(array.run_ids):>5} tasks{after:<20} {job}")
    if sel.arrays:
        print(f"scripts: {result.round_dir}")
    if args.dry_run and importlib.util.find_spec(STAGE_ENTRY_MODULE) is None:
        print(f"note: {STAGE_ENTRY_MODULE} is not installed here; a real submission is refused")
    return 0


def _run_jobs(args) -> int:
    from modelzoo_ext.study.cluster.submit import task_states

    _sweep_json(Path(args.sweep_dir))
    states = task_states(args.sweep_dir)
    if args.json:
        rows = {run: {stage: {"job_id": t.job_id, "index": t.index, "scheduler": t.scheduler, "round": t.round,
                              **t.state.to_dict()} for stage, t in stages.items()}
                for run, stages in states.items()}  # fmt: skip
        print(json.dumps(rows, indent=2, sort_keys=True))
        return 0
    for run_id, stages in sorted(states.items()):
        shown = "  ".join(
            f"{stage}: {stages[stage].describe()}" for stage in ("train", "eval") if stage in stages
        )
        print(f"{run_id:<60} {shown}")
    print(f"{len(states)} runs submitted" if states else "nothing submitted from this sweep directory")
    return 0


def _run_cancel(args) -> int:
    from modelzoo_ext.study.cluster.submit import cancel

    _sweep_json(Path(args.sweep_dir))
    cancelled = cancel(args.sweep_dir)
    print(f"cancelled {', '.join(cancelled)}" if cancelled else "nothing queued or running")
    return 0
