"""One grid point's stage in its own process: what a job-array task runs.

    python -m modelzoo_ext.study.sweep.task --sweep DIR --run RUN_ID --stage train|eval|all \\
        [--max-attempts 4] [--backoff-s 30]

It loads the run's plan (`DIR/sweep.json`, `DIR/runs/RUN_ID/run.json`), calls
`executor.execute_stage` once, prints the outcome as one JSON line, and writes nothing but the
run's own directory. It never opens the registry database: `sweep status` or `report` rebuild
that index from the records afterwards.

It builds no shared asset (data, masks, pruned checkpoints): many tasks run at once, and two
building one asset would race. A stage with work whose assets are missing is refused before it
starts (exit 2, the record untouched); `sparse-lora sweep assets DIR` builds them in one process
(on a cluster, `sweep submit`'s assets job runs it before the arrays).

Exit status: 0 the stage's work is done (now, or already before: `skipped`); 1 it failed, or
`eval` was asked of a run not trained yet; 2 bad input (no such sweep or run, missing shared
assets); 3 stopped (disk full or quota exceeded: every further task would fail too).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from modelzoo_ext.errors import UserError
from modelzoo_ext.study.steps import StepPolicy
from modelzoo_ext.study.sweep.assets import AssetBuilder, missing
from modelzoo_ext.study.sweep.executor import STAGES, execute_stage, has_work
from modelzoo_ext.study.sweep.plan import RunPlan, load_plan
from modelzoo_ext.study.sweep.records import read_record

EXIT_STATUS = {"trained": 0, "succeeded": 0, "skipped": 0, "failed": 1, "not_trained": 1, "stopped": 3}


def parser() -> argparse.ArgumentParser:
    """The task's command line."""
    p = argparse.ArgumentParser(
        prog="python -m modelzoo_ext.study.sweep.task", description=__doc__.split("\n")[0]
    )
    p.add_argument("--sweep", required=True, metavar="DIR", help="the planned sweep directory")
    p.add_argument(
        "--run", required=True, metavar="RUN_ID", help="the run (its directory name under DIR/runs)"
    )
    p.add_argument(
        "--stage", required=True, choices=STAGES, help="train: up to checked exports; eval; all: both"
    )
    p.add_argument("--max-attempts", type=int, default=4, help="tries per step for transient failures")
    p.add_argument("--backoff-s", type=float, default=30.0, help="first retry delay, doubled each retry")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the stage; the exit status says how it ended (see the module doc)."""
    args = parser().parse_args(argv)
    policy = StepPolicy(args.max_attempts, args.backoff_s)
    try:
        plan = load_plan(args.sweep, args.run)
        check_assets(plan, args.stage)
        outcome = execute_stage(
            plan, args.stage, policy=policy, assets=AssetBuilder(plan.sweep_dir, policy, build=False)
        )
    except UserError as exc:
        print(f"sweep task: error: {exc}", file=sys.stderr)
        return exc.exit_status
    if outcome.error:
        print(f"sweep task: {args.run} {args.stage}: {outcome.result}: {outcome.error}", file=sys.stderr)
    print(json.dumps(asdict(outcome), sort_keys=True), flush=True)
    return EXIT_STATUS[outcome.result]


def check_assets(plan: RunPlan, stage: str) -> None:
    """`UserError` if `stage` has work on the run and a shared asset it uses is missing."""
    absent = missing([plan]) if has_work(plan, read_record(plan.run_dir), stage) else []
    if absent:
        raise UserError(
            f"{len(absent)} shared asset(s) of run {plan.run_id} missing, first {absent[0]}; a task builds no "
            "shared asset (tasks running at once would race)",
            where=str(plan.sweep_dir),
            fix=f"build them first: sparse-lora sweep assets {plan.sweep_dir} --only {plan.run_id} "
            "(`sweep submit` does it in its assets job)",
        )


if __name__ == "__main__":
    sys.exit(main())
