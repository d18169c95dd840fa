"""The local runner: `sweep run|eval` on one machine, `sweep assets`, and `sweep status`.

It selects the planned runs (by backend, or by id) whose stage still has work (from their
records, `executor.has_work`), builds their shared assets one at a time, runs the caller's check
(`before_runs`: the preflight, for `--backend cs3`), then executes each run's stage
(`executor.execute_stage`, the same call a cluster task makes) on a thread pool of `--parallel`
workers, with a progress bar. After a `stopped` run (disk full, quota) no further run starts.
Being one process, it rebuilds the registry index from the records at its end (and `sweep
status` before it reads). Returns counts per result.

`build_assets` is the first half alone: the missing shared assets of the runs not done, built in
one process (`sweep assets`, which a cluster's assets job runs before the job arrays).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from modelzoo_ext.errors import UserError
from modelzoo_ext.study.steps import StepPolicy, SweepStopped
from modelzoo_ext.study.sweep.assets import AssetBuilder, missing
from modelzoo_ext.study.sweep.executor import STAGES, StageOutcome, execute_stage, has_work, stage_done
from modelzoo_ext.study.sweep.index import rebuild_index
from modelzoo_ext.study.sweep.plan import RunPlan, load_plans
from modelzoo_ext.study.sweep.records import read_record


def _selected(
    plans: list[RunPlan], backend: str | None, only: list[str] | None, sweep_dir: Path
) -> list[RunPlan]:
    """The runs of `backend` (evaluation-only runs go with every backend), or those named in `only`."""
    selected = [
        p for p in plans
        if (backend is None or p.backend in (backend, "eval")) and (only is None or p.run_id in only)
    ]  # fmt: skip
    if only and len(selected) != len(set(only)):
        unknown = sorted(set(only) - {p.run_id for p in selected})
        raise UserError(f"unknown run id(s) {unknown}", where=str(sweep_dir))
    return selected


def run_sweep(
    sweep_dir: str | Path,
    *,
    backend: str | None = None,
    parallel: int = 1,
    max_attempts: int = 4,
    backoff_s: float = 30.0,
    only: list[str] | None = None,
    stage: str = "all",
    before_runs: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Run the unfinished work of `stage` (for runs of `backend`, or of `only`); counts and any stop reason.

    `before_runs` runs once the shared assets are built and before any run starts (`sweep run
    --backend cs3`: the preflight, which raises to start nothing)."""
    if stage not in STAGES:
        raise UserError(f"unknown stage {stage!r}", fix=f"use one of {STAGES}")
    sweep_dir = Path(sweep_dir).resolve()
    _, plans = load_plans(sweep_dir)
    selected = _selected(plans, backend, only, sweep_dir)
    todo = [p for p in selected if has_work(p, read_record(p.run_dir), stage)]
    summary: dict[str, Any] = {
        "selected": len(selected),
        "stage": stage,
        "skipped_finished": len(selected) - len(todo),
    }
    policy = StepPolicy(max_attempts, backoff_s)
    assets = AssetBuilder(sweep_dir, policy)
    stopped = threading.Event()
    stop_reason: list[str] = []

    def one(plan: RunPlan) -> str:
        if stopped.is_set():
            return "not_started"
        outcome: StageOutcome = execute_stage(plan, stage, policy=policy, assets=assets)
        if outcome.result == "stopped":
            stop_reason.append(outcome.error or "stopped")
            stopped.set()
        return outcome.result

    from tqdm import tqdm

    with tqdm(total=len(todo), desc=f"sweep run ({stage})", unit="run") as bar:
        try:
            assets.build_for(todo)
            if before_runs is not None and todo:
                before_runs()
            with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
                for result in pool.map(one, todo):
                    summary[result] = summary.get(result, 0) + 1
                    bar.update(1)
        except SweepStopped as exc:
            summary["stopped_reason"] = str(exc)
        finally:
            rebuild_index(sweep_dir)
    if stop_reason:
        summary["stopped_reason"] = stop_reason[0]
    return summary


def build_assets(
    sweep_dir: str | Path,
    *,
    backend: str | None = None,
    only: list[str] | None = None,
    max_attempts: int = 4,
    backoff_s: float = 30.0,
) -> dict[str, Any]:
    """Build the missing shared assets of the runs not done yet (of `backend`, or of `only`), in
    this one process: what `sweep assets` and a cluster's assets job run. Opens no database.
    Returns the selected runs, the assets built and the assets that failed with why."""
    sweep_dir = Path(sweep_dir).resolve()
    _, plans = load_plans(sweep_dir)
    todo = [
        p
        for p in _selected(plans, backend, only, sweep_dir)
        if not stage_done(p, read_record(p.run_dir), "all")
    ]
    absent = missing(todo)
    failed = AssetBuilder(sweep_dir, StepPolicy(max_attempts, backoff_s)).build_for(todo)
    return {"runs": len(todo), "built": [a for a in absent if a not in failed], "failed": failed}


def sweep_status(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Each planned run's record (run id, status, attempts, error, main metrics), after rebuilding the
    registry index from the records."""
    return [
        {"run_id": rec.run_id, "status": rec.status, "attempts": rec.attempts, "error": rec.error, "metrics": rec.metrics}
        for rec in rebuild_index(sweep_dir).runs()
    ]  # fmt: skip
