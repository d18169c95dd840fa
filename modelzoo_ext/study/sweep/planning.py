"""`sweep plan`: a sweep YAML -> one run directory per grid point, nothing executed.

Per run (`DIR/runs/<run_id>/`): `run.json` (the `RunPlan`, plus its training command for reading),
`params.yaml` (the model's params file with this run's mode, masks, data, seeds, output folder,
checkpoint retention (`train.keep_checkpoints`, `train.checkpoint_steps`) and, for cs3, its base
checkpoint and loss-log callback: one file for every backend) and `command.sh`;
and `record.json` (the run's own record, `planned`). Per sweep: `sweep.json` (the checked spec
every later stage reads), `seeds.json` (what each derived seed controls) and the registry, rebuilt
from the records. Replanning keeps finished runs as they are: a run's record is replaced by a
`planned` one only where it has not succeeded and its config hash changed; that run's earlier
outputs (trainer folder, evaluation, logs) are moved to `superseded/<old config hash>/` first, so
that nothing trained under the old config (a complete `train/run.json`) is taken for the new one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from modelzoo_ext.atomic import atomic_file
from modelzoo_ext.run_config import load_yaml
from modelzoo_ext.run_config import trainer_yaml as rc
from modelzoo_ext.study.grid import DATA_DRIVEN, SEED_ROLES, grid
from modelzoo_ext.study.sweep.commands import command_script, train_command
from modelzoo_ext.study.sweep.index import REGISTRY_FILE, rebuild_index
from modelzoo_ext.study.sweep.plan import (
    SPEC_FILE,
    RunAssets,
    RunPlan,
    asset_paths,
    export_kind_of,
    write_plan,
)
from modelzoo_ext.study.sweep.records import planned_record, read_record, write_record
from modelzoo_ext.study.sweep_spec import SweepSpec, load_sweep, validation_schedule
from modelzoo_ext.versions import git_revision


def run_params(spec: SweepSpec, point: dict[str, Any], assets: RunAssets, run_dir: Path) -> dict[str, Any]:
    """The model's params file with this run's mode, masks, data, seeds and output folder."""
    model = spec.models[point["model"]]
    params = load_yaml(model.params)
    seeds = point["seeds"]
    rc.set_mode(params, point["mode"], assets.masks)
    rc.set_output(params, str(run_dir / "train"), seeds["trainer"])
    rc.set_training_data(params, assets.data, spec.train.batch_size)  # evaluation: lm-eval, every backend
    rc.set_seeds(params, lora_init=seeds["lora_init"], data_order=seeds["data_order"])
    validation = validation_schedule(spec)
    if validation:  # the held-out loss during training, on the final held-out loss's examples
        rc.set_validation_data(params, assets.heldout, validation["batch_size"], validation["every"],
                               validation["batches"])  # fmt: skip
    length = spec.train.length_for(point["task"])
    if length.max_steps:
        rc.set_max_steps(params, length.max_steps)
    # Keep only what the study needs: `train.keep_checkpoints` checkpoints, every `train.checkpoint_steps`.
    rc.set_checkpoint_retention(params, spec.train.kept_while_training, spec.train.checkpoint_steps)
    if point["backend"] == "cs3":
        rc.set_base_checkpoint(params, model.cs_checkpoint)
        rc.ensure_callback(params, "SparseLoRALossLog")  # per-step losses and times: parity and throughput
    return params


def config_hash(params: dict[str, Any], spec: SweepSpec, point: dict[str, Any]) -> str:
    """sha256 (16 hex) of what determines a run's numbers: its params, the protocol, training length,
    calibration and evaluation settings."""
    protocol = {
        "params": params,
        "data": spec.data.model_dump(),
        "train_length": spec.train.length_for(point["task"]).model_dump(),
        "calibration": spec.calibration.model_dump() if point["method"] in DATA_DRIVEN else None,
        "eval": spec.eval.model_dump(),
        "seeds": point["seeds"],
    }
    return hashlib.sha256(json.dumps(protocol, sort_keys=True, default=str).encode()).hexdigest()[:16]


def plan_run(
    spec: SweepSpec, point: dict[str, Any], sweep_dir: Path
) -> tuple[RunPlan, dict[str, Any] | None]:
    """The plan of a grid point (from `grid.grid`) and its params (None for evaluation-only runs)."""
    run_dir = sweep_dir / "runs" / point["run_id"]
    assets = asset_paths(spec, sweep_dir, point)
    params = run_params(spec, point, assets, run_dir) if point["mode"] != "none" else None
    plan = RunPlan(
        run_id=point["run_id"], **{k: point[k] for k in ("model", "task", "method", "structure", "sparsity", "mode",
        "backend", "seed")}, seeds=point["seeds"], protocol=spec.data.protocol, run_dir=run_dir,
        hf_dir=spec.models[point["model"]].hf_dir, assets=assets,
        export_kind=export_kind_of(params) if params else None,
        config_hash=config_hash(params or {"mode": "none", **point}, spec, point), spec=spec,
    )  # fmt: skip
    return plan, params


def plan_sweep(sweep_yaml: str | Path, out: str | Path) -> list[dict[str, Any]]:
    """Write one run directory per run, with a `planned` record; keep finished runs as they are.

    The whole sweep file is checked first (`load_sweep`): a bad grid writes nothing. Returns the
    grid points (`grid.grid`).
    """
    spec = load_sweep(sweep_yaml)
    points = grid(spec)
    sweep_dir = Path(out).resolve()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with atomic_file(sweep_dir / SPEC_FILE) as tmp:
        tmp.write_text(spec.model_dump_json(indent=2))
    with atomic_file(sweep_dir / "seeds.json") as tmp:  # what each derived seed controls
        tmp.write_text(
            json.dumps({"roles": SEED_ROLES, "seeds": {p["seed"]: p["seeds"] for p in points}}, indent=2)
        )
    if (sweep_dir / REGISTRY_FILE).is_file():
        rebuild_index(sweep_dir)  # a directory planned before runs kept records: their rows become records
    rev = git_revision()
    from tqdm import tqdm

    for point in tqdm(points, desc="sweep plan", unit="run"):
        plan, params = plan_run(spec, point, sweep_dir)
        _write_run_dir(plan, params)
        _record_planned(plan, rev)
    rebuild_index(sweep_dir)
    return points


def _write_run_dir(plan: RunPlan, params: dict[str, Any] | None) -> None:
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    if params is not None:
        rc.write_yaml(plan.params_path, params)
        with atomic_file(plan.run_dir / "command.sh") as tmp:
            tmp.write_text(command_script(plan))
    write_plan(plan, train_command=train_command(plan))


def _record_planned(plan: RunPlan, rev: str) -> None:
    """A `planned` record, unless the run has one with the same config or has succeeded."""
    existing = read_record(plan.run_dir)
    if existing is None or (existing.status != "succeeded" and existing.config_hash != plan.config_hash):
        if existing is not None:
            _supersede_outputs(plan.run_dir, existing.config_hash or "unknown")
        write_record(plan.run_dir, planned_record(plan, rev))


# What a run's stages write into its directory (the plan's own files stay).
RUN_OUTPUTS = ("train", "eval.json", "eval_samples", "sparsity_check.json", "train.log", "eval.log")


def _supersede_outputs(run_dir: Path, old_hash: str) -> None:
    """Move what the run wrote under its old config to `superseded/<old_hash>/` (kept, not deleted)."""
    outputs = [run_dir / name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if not outputs:
        return
    target = run_dir / "superseded" / old_hash
    target.mkdir(parents=True, exist_ok=True)
    for path in outputs:
        path.rename(target / path.name)
