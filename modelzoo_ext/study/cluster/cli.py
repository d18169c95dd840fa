"""`sparse-lora sweep submit | cancel`: a planned sweep on a SLURM or PBS cluster.

    sparse-lora sweep submit DIR --scheduler slurm --account A --partition gpu --time 12:00:00 \\
        --gpus-per-run 4 --max-concurrent 16 [--dry-run] [--skip-preflight]
    sparse-lora sweep status DIR      # each run's record, beside its latest tasks' scheduler state
    sparse-lora sweep cancel DIR      # scancel / qdel what is still queued or running

Which runs a sweep directory holds, which stages are done and which shared assets are missing
are read from the runs' plans and records (`planned_work`, `done_by_records`, `missing_assets`:
the study's own definitions, `executor.stage_done` and `assets.missing`); nothing here opens the
registry database.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from modelzoo_ext.study.cluster.arrays import ASSETS
from modelzoo_ext.study.preflight.cli import add_skip_preflight_argument, preflight_before_submit

if TYPE_CHECKING:
    from modelzoo_ext.study.cluster.arrays import RunWork
    from modelzoo_ext.study.cluster.spec import Submission
    from modelzoo_ext.study.cluster.submit import SubmitResult
    from modelzoo_ext.study.sweep.plan import RunPlan
    from modelzoo_ext.study.sweep_spec import SweepSpec


def register(subparsers: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    """Add `submit` and `cancel` to the `sweep` group (registered by the study's CLI, whose `sweep
    status` shows the scheduler's state of each run's tasks)."""
    sweep = groups["sweep"]
    _add_submit(sweep)
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
        "training array). When a shared asset (data, masks, pruned model) of those runs is missing, an assets "
        "job (one CPU task, `sweep assets`) builds them all first and the arrays wait for it to succeed. Runs "
        "with a task still queued or running are left alone; running submit again picks up exactly the runs "
        "that are not done. Job ids are recorded in DIR/scheduler/jobs.json; `sweep status` shows the "
        "scheduler's state beside each run's record. See docs/cluster.md.",
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
    p.add_argument("--assets-time", help="time limit of the assets job [--time]")
    p.add_argument("--assets-cpus", type=int, help="CPUs of the assets job [--cpus-per-node]")
    p.add_argument("--assets-mem", help="memory of the assets job [--mem-per-node]")
    p.add_argument("--assets-partition", help="partition / queue of the assets job [--partition]")
    p.add_argument("--python", help="interpreter the tasks run, on a shared filesystem [this one]")
    p.add_argument("--pbs-gpu-resource", default="ngpus",
                   help="PBS chunk resource counting GPUs; `none` where nodes come whole (Polaris) [ngpus]")  # fmt: skip
    p.add_argument("--pbs-select", action="append", default=[], metavar="KEY=VALUE",
                   help="more items of the PBS select chunk, e.g. system=polaris (repeatable)")  # fmt: skip
    p.add_argument("--max-array-size", type=int, help="most tasks per array [SLURM 1001, PBS 10000]")
    add_skip_preflight_argument(p)
    p.set_defaults(func=_run_submit)


# -- the sweep's plans and records -----------------------------------------------------------------
def planned_work(plans: list[RunPlan], backend: str) -> list[RunWork]:
    """Each planned run's needs: trains here when its backend is `backend`; evaluation-only for mode none."""
    from modelzoo_ext.study.cluster.arrays import RunWork

    return [
        RunWork(p.run_id, trains_here=p.trains and p.backend == backend, needs_training=p.trains)
        for p in plans
    ]


def done_by_records(plans: list[RunPlan]) -> Callable[[str, str], bool]:
    """`is_done(run_id, stage)` from the runs' own records, as the local runner and the task entry
    point decide what to skip (`executor.stage_done`)."""
    from modelzoo_ext.study.sweep.executor import stage_done
    from modelzoo_ext.study.sweep.records import read_record

    by_id = {p.run_id: p for p in plans}
    return lambda run_id, stage: stage_done(by_id[run_id], read_record(by_id[run_id].run_dir), stage)


def missing_assets(plans: list[RunPlan]) -> Callable[[tuple[str, ...]], list[str]]:
    """`missing(run_ids)`: the shared assets of those runs that do not exist yet (`assets.missing`)."""
    from modelzoo_ext.study.sweep.assets import missing

    by_id = {p.run_id: p for p in plans}
    return lambda run_ids: missing([by_id[r] for r in dict.fromkeys(run_ids)])


# -- handlers -------------------------------------------------------------------------------------
def _submission(args, spec: SweepSpec) -> Submission:
    """The submission the options ask for (defaults from the sweep's settings), checked."""
    import sys

    from modelzoo_ext.study.cluster.spec import JOB_NAME, build_submission

    gpus = args.gpus_per_run
    if gpus is None:
        gpus = spec.gpu.nproc_per_node * args.nodes_per_run if args.backend == "gpu" else 0
    eval_gpus = args.eval_gpus
    if eval_gpus is None:
        eval_gpus = 1 if spec.eval.device.startswith("cuda") else 0
    name = args.job_name or (spec.name if JOB_NAME.match(spec.name) else "sparse-lora")
    train = dict(time=args.time, gpus_per_run=gpus, nodes_per_run=args.nodes_per_run,
                 cpus_per_node=args.cpus_per_node, mem_per_node=args.mem_per_node)  # fmt: skip
    evaluation = dict(time=args.eval_time or args.time, gpus_per_run=eval_gpus,
                      cpus_per_node=args.eval_cpus or args.cpus_per_node,
                      mem_per_node=args.eval_mem or args.mem_per_node)  # fmt: skip
    assets = dict(time=args.assets_time or args.time, cpus_per_node=args.assets_cpus or args.cpus_per_node,
                  mem_per_node=args.assets_mem or args.mem_per_node)  # fmt: skip
    return build_submission(
        scheduler=args.scheduler, job_name=name, account=args.account, partition=args.partition,
        max_concurrent=args.max_concurrent, extra_directives=tuple(args.directive),
        train=train, eval=evaluation, assets=assets, assets_partition=args.assets_partition,
        python=args.python or sys.executable,
        pbs_gpu_resource=None if args.pbs_gpu_resource == "none" else args.pbs_gpu_resource,
        pbs_select=tuple(args.pbs_select), max_array_size=args.max_array_size,
    )  # fmt: skip


def _run_submit(args) -> int:
    from modelzoo_ext.study.cluster.launch import check_entry_point
    from modelzoo_ext.study.cluster.submit import submit
    from modelzoo_ext.study.sweep.plan import load_plans

    sweep_dir = Path(args.sweep_dir).resolve()
    spec, plans = load_plans(sweep_dir)
    submission = _submission(args, spec)
    if not args.dry_run:
        check_entry_point(submission.python)
    preflight_before_submit(args, sweep_dir)  # exit 2 with the reasons, nothing submitted, when a check fails
    result = submit(sweep_dir, planned_work(plans, args.backend), done_by_records(plans), submission,
                    dry_run=args.dry_run, missing_assets=missing_assets(plans))  # fmt: skip
    _print_round(result)
    return 0


def _print_round(result: SubmitResult) -> None:
    sel = result.selection
    print(f"done: {len(sel.done)}, queued or running: {len(sel.active)}, "
          f"waiting for training elsewhere: {len(sel.waiting)}, to submit: {sel.run_count}")  # fmt: skip
    if sel.arrays and not result.missing_assets:
        print("shared assets: all present (no assets job)")
    for array in sel.arrays:
        job = result.job_ids.get(array.name, "(dry run)" if result.dry_run else "")
        after = f" after {array.after}" if array.after else ""
        what = f"{len(result.missing_assets)} assets" if array.name == ASSETS else f"{array.tasks} tasks"
        print(f"  {array.name:<14} {array.stage:<6} {what:>11}{after:<20} {job}")
    if sel.arrays:
        print(f"scripts: {result.round_dir}")


def _run_cancel(args) -> int:
    from modelzoo_ext.study.cluster.submit import cancel
    from modelzoo_ext.study.sweep.plan import load_spec

    load_spec(Path(args.sweep_dir))  # a planned sweep directory, or a clear error
    cancelled = cancel(args.sweep_dir)
    print(f"cancelled {', '.join(cancelled)}" if cancelled else "nothing queued or running")
    return 0
