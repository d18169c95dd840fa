"""One grid point's run plan, typed: what `sweep plan` writes into `runs/<run_id>/run.json`.

A `RunPlan` holds the grid point (model, task, method, structure, sparsity, mode, backend, seed),
its derived seeds, its data protocol, its run directory, the base model, where the shared assets
it uses live (`RunAssets`), what its trainer exports, and the hash of everything that determines
its numbers. It carries the sweep's settings (`spec`, read from `DIR/sweep.json`), so the
commands (`commands.py`) and the executor (`executor.py`) need nothing else to run its stages.

Shared assets, one per distinct input, under `DIR/assets/`:
    data/<model>__<task>/train     training data (also calibrates data-aware masks)
    data/<model>__<task>/heldout   held-out data (the held-out loss)
    masks/<mask key>.safetensors   masks: by model, method, structure, sparsity; by task for
                                   data-aware methods, by seed for seeded ones
    pruned/<mask key>              the base model with its masks applied (s2d and no-fine-tune runs)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from modelzoo_ext.atomic import atomic_file
from modelzoo_ext.errors import UserError
from modelzoo_ext.study.grid import DATA_DRIVEN, SEEDED_METHODS, sparsity_tag
from modelzoo_ext.study.sweep_spec import SweepSpec

PLAN_FILE = "run.json"
SPEC_FILE = "sweep.json"
GRID_FIELDS = ("model", "task", "method", "structure", "sparsity", "mode", "backend", "seed")


@dataclass(frozen=True)
class RunAssets:
    """The shared inputs of a run (None where the run needs none)."""

    masks: str | None = None  # mask file (sparse runs)
    pruned: str | None = None  # pruned HF checkpoint (sparse runs; built for s2d and no-fine-tune)
    data: str | None = None  # training data (fine-tunes, and data-aware masks' calibration)
    heldout: str | None = None  # held-out data (when the sweep measures the held-out loss)

    def paths(self) -> list[str]:
        """Every asset path the run uses."""
        return [p for p in asdict(self).values() if p]


@dataclass(frozen=True)
class RunPlan:
    """One grid point, planned: everything its stages need, derived once at plan time."""

    run_id: str
    model: str
    task: str
    method: str
    structure: str
    sparsity: float
    mode: str  # s2s | s2d | lora | none (no fine-tune: evaluation only)
    backend: str  # cs3 | gpu | cpu | eval (no-fine-tune runs)
    seed: int
    seeds: dict[str, int]  # the sweep seed and the per-role seeds derived from it (`grid.derived_seeds`)
    protocol: str  # official | offline
    run_dir: Path
    hf_dir: str  # the base model (HF directory)
    assets: RunAssets
    export_kind: str | None  # what the trainer exports (`adapter` | `merged`); None: no training
    config_hash: str  # sha256 (16 hex) of what determines the run's numbers
    spec: SweepSpec = field(repr=False, compare=False)

    @property
    def trains(self) -> bool:
        """Does this run fine-tune (every mode but `none`)?"""
        return self.mode != "none"

    @property
    def sweep_dir(self) -> Path:
        """The sweep directory the run belongs to (`<sweep>/runs/<run_id>`)."""
        return self.run_dir.parents[1]

    @property
    def params_path(self) -> Path:
        return self.run_dir / "params.yaml"

    @property
    def train_dir(self) -> Path:
        """Where the trainer writes (checkpoints, logs, the export)."""
        return self.run_dir / "train"

    @property
    def export_dir(self) -> Path | None:
        """The trainer's export (`train/merged` or `train/adapter`); None for evaluation-only runs."""
        return self.train_dir / self.export_kind if self.export_kind else None

    def grid_point(self) -> dict[str, Any]:
        """The grid columns (as the registry and report name them)."""
        return {name: getattr(self, name) for name in GRID_FIELDS}

    def to_json(self) -> dict[str, Any]:
        """The plan as `run.json` holds it (without the sweep's settings, which `sweep.json` holds)."""
        return {
            **self.grid_point(), "run_id": self.run_id, "seeds": self.seeds, "protocol": self.protocol,
            "hf_dir": self.hf_dir, "assets": asdict(self.assets), "export_kind": self.export_kind,
            "config_hash": self.config_hash,
        }  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any], run_dir: Path, spec: SweepSpec) -> RunPlan:
        """A plan read back from its `run.json` in `run_dir` (other keys in the file are ignored)."""
        export = data["export_kind"] if "export_kind" in data else _planned_export_kind(data, run_dir)
        return cls(
            run_id=data["run_id"], **{name: data[name] for name in GRID_FIELDS}, seeds=data["seeds"],
            protocol=data["protocol"], run_dir=run_dir, hf_dir=data["hf_dir"], assets=RunAssets(**data["assets"]),
            export_kind=export, config_hash=data["config_hash"], spec=spec,
        )  # fmt: skip


def _planned_export_kind(data: dict[str, Any], run_dir: Path) -> str | None:
    """For a `run.json` written before plans recorded it: the export rule applied to its params."""
    return export_kind_of(load_params(run_dir)) if data["mode"] != "none" else None


def load_params(run_dir: Path) -> dict[str, Any]:
    """The run's `params.yaml`."""
    from modelzoo_ext.run_config import load_yaml

    return load_yaml(run_dir / "params.yaml")


def export_kind_of(params: dict[str, Any]) -> str:
    """`adapter` or `merged`: what a run config's trainer exports (`SparseLoRAConfig.export_kind`)."""
    from modelzoo_ext.run_config import SparseLoRAConfig, find_model_section

    return SparseLoRAConfig(**find_model_section(params, "params.yaml")["sparse_lora"]).export_kind


def mask_key(point: dict[str, Any]) -> str:
    """Masks differ by model, method, structure, sparsity; by task (data-aware) and seed (seeded)."""
    parts = [
        point["model"],
        point["method"],
        point["structure"].replace(":", "of"),
        sparsity_tag(point["sparsity"]),
    ]
    if point["method"] in DATA_DRIVEN:
        parts.append(point["task"])
    if point["method"] in SEEDED_METHODS:
        parts.append(f"seed{point['seed']}")
    return "__".join(parts)


def asset_paths(spec: SweepSpec, sweep_dir: Path, point: dict[str, Any]) -> RunAssets:
    """Where the shared inputs of a grid point live under `sweep_dir/assets`."""
    assets = sweep_dir / "assets"
    sparse = point["method"] != "dense"
    data = f"{point['model']}__{point['task']}"
    needs_data = point["mode"] != "none" or point["method"] in DATA_DRIVEN
    return RunAssets(
        masks=str(assets / "masks" / f"{mask_key(point)}.safetensors") if sparse else None,
        pruned=str(assets / "pruned" / mask_key(point)) if sparse else None,
        data=str(assets / "data" / data / "train") if needs_data else None,
        heldout=str(assets / "data" / data / "heldout") if spec.eval.heldout_loss else None,
    )


def write_plan(plan: RunPlan, **extra: Any) -> Path:
    """Write `run.json` atomically (the plan, plus `extra` keys for readers, e.g. the command)."""
    path = plan.run_dir / PLAN_FILE
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps({**plan.to_json(), **extra}, indent=2, sort_keys=True) + "\n")
    return path


def read_plan_file(run_dir: Path) -> dict[str, Any]:
    """The raw `run.json` of a run directory."""
    return json.loads((run_dir / PLAN_FILE).read_text())


def load_spec(sweep_dir: Path) -> SweepSpec:
    """The sweep's settings, as `sweep plan` froze them into `sweep.json`."""
    if not (sweep_dir / SPEC_FILE).is_file():
        raise UserError(
            f"not a planned sweep directory (no {SPEC_FILE})",
            where=str(sweep_dir),
            fix="run `sweep plan` first",
        )
    return SweepSpec.model_validate_json((sweep_dir / SPEC_FILE).read_text())


def load_plans(sweep_dir: str | Path) -> tuple[SweepSpec, list[RunPlan]]:
    """The sweep's settings and every planned run (ordered by run id)."""
    sweep_dir = Path(sweep_dir).resolve()
    spec = load_spec(sweep_dir)
    plans = [
        RunPlan.from_json(json.loads(path.read_text()), path.parent, spec)
        for path in sorted((sweep_dir / "runs").glob(f"*/{PLAN_FILE}"))
    ]
    return spec, plans


def load_plan(sweep_dir: str | Path, run_id: str) -> RunPlan:
    """One planned run of a sweep directory."""
    sweep_dir = Path(sweep_dir).resolve()
    spec = load_spec(sweep_dir)
    run_dir = sweep_dir / "runs" / run_id
    if "/" in run_id or run_id in (".", "..") or not (run_dir / PLAN_FILE).is_file():
        raise UserError(f"no planned run {run_id!r}", where=str(sweep_dir), fix="see `sweep status`")
    return RunPlan.from_json(read_plan_file(run_dir), run_dir, spec)
