"""The experiment sweep: a grid in a YAML file -> run directories -> resumable runs -> run records -> the registry.

    sparse-lora sweep plan SWEEP_YAML --out DIR      # one directory per run, nothing executed
    sparse-lora sweep run DIR [--backend cs3|gpu|cpu] [--stage all|train|eval] [--parallel N]
    sparse-lora sweep eval DIR                       # = sweep run DIR --stage eval (where the GPU is)
    sparse-lora sweep assets DIR [--backend B] [--only ID,ID | --run-list FILE]   # shared assets, one process
    sparse-lora sweep status DIR
    python -m modelzoo_ext.study.sweep.task --sweep DIR --run RUN_ID --stage train|eval|all   # one task

The package, by concept:
    plan.py       `RunPlan`: one grid point, typed (fields, derived seeds, asset paths, run
                  directory, export, config hash, the sweep's settings); `run.json` read and written
    planning.py   `sweep plan`: run directories (run.json, params.yaml, command.sh, a planned record)
    commands.py   the command lines of the six kinds of step, pure functions of a plan
    assets.py     building the shared assets (data, masks, pruned checkpoints) once
    executor.py   `execute_stage(plan, stage)`: one grid point's stage, recorded in its own record
    records.py    a run's own record (`record.json`, written atomically by that run only)
    index.py      the registry (SQLite) rebuilt from the records by one process
    runner.py     the local runner (`sweep run`: selection, thread pool, progress), `sweep assets`
                  (`build_assets`) and `sweep status`
    task.py       one stage of one run in its own process (what a job-array task runs)

A sweep run locally and the same sweep run task by task write the same records, so they give the
same registry and report. Failures are classified from the step's log (`modelzoo_ext.study.steps`):
transient ones are retried with exponential backoff; disk-full or quota errors stop the sweep; the
rest fail the run. Finished work is skipped on rerun, and the trainer resumes from its last checkpoint.
"""

from modelzoo_ext.study.sweep.executor import STAGES, StageOutcome, execute_stage
from modelzoo_ext.study.sweep.index import REGISTRY_FILE, rebuild_index
from modelzoo_ext.study.sweep.plan import RunAssets, RunPlan, load_plan, load_plans
from modelzoo_ext.study.sweep.planning import plan_sweep
from modelzoo_ext.study.sweep.runner import build_assets, run_sweep, sweep_status

__all__ = [
    "REGISTRY_FILE",
    "STAGES",
    "RunAssets",
    "RunPlan",
    "StageOutcome",
    "build_assets",
    "execute_stage",
    "load_plan",
    "load_plans",
    "plan_sweep",
    "rebuild_index",
    "run_sweep",
    "sweep_status",
]
