"""The experiment sweep: a grid in a YAML file -> run directories -> resumable runs -> the registry.

    sparse-lora sweep plan SWEEP_YAML --out DIR      # one directory per run, nothing executed
    sparse-lora sweep run DIR [--backend cs3|gpu|cpu] [--stage all|train|eval] [--parallel N]
    sparse-lora sweep eval DIR                       # = sweep run DIR --stage eval (where the GPU is)
    sparse-lora sweep status DIR

Lifecycle of one run (`DIR/runs/<run_id>/`):
    plan    run.json (grid point, derived seeds, asset references, commands), params.yaml (the
            model's params file with this run's mode, masks, data, seeds, output folder and, for
            cs3, its base checkpoint: one file for every backend), command.sh; a `planned` row
    assets  shared per sweep, built once before the runs that need them: training and held-out
            data (`data prepare`, the sweep's protocol), masks (`masks compute`, calibrated on the
            task's training data for data-aware methods), the pruned checkpoint (`masks apply`)
    length  `train.epochs` becomes `max_steps` from the prepared training data, written into
            params.yaml once, so every backend trains the same examples in the same order
    train   cpu: `python -m gpu_reference.train`; gpu: `torchrun -m gpu_reference.train`; cs3:
            `cszoo fit` (appliance flags) then `convert cs-to-hf`; all read the same params.yaml
    check   the model to be evaluated must match its mask with zero violations: a dense checkpoint
            is never evaluated in place of a sparse one -> status `trained`
    eval    `sparse-lora eval` (lm-eval with every example logged, and the held-out loss) under
            the sweep's protocol, on `eval.device` (cpu is fine) -> status `succeeded`

`--stage train` stops at `trained` (e.g. on the CS-3 user node, which has no GPU); `--stage eval`
(or `sweep eval`) evaluates the trained runs of a registry on another machine.

Failures are classified from the step's log (`modelzoo_ext.study.steps`): transient ones are
retried with exponential backoff; disk-full or quota errors stop the sweep; the rest fail the run.
Finished work is skipped on rerun, and the trainer resumes from its last checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from modelzoo_ext.atomic import atomic_file
from modelzoo_ext.errors import UserError
from modelzoo_ext.run_config import load_yaml
from modelzoo_ext.run_config import params as rc
from modelzoo_ext.study.grid import DATA_DRIVEN, SEED_ROLES, SEEDED_METHODS, grid, sparsity_tag
from modelzoo_ext.study.heldout_loss import CURVE_KEY, heldout_curve
from modelzoo_ext.study.registry import Registry, RunRecord
from modelzoo_ext.study.steps import StepFailed, SweepStopped, run_with_retries
from modelzoo_ext.study.sweep_spec import SweepSpec, load_sweep, validation_schedule
from modelzoo_ext.study.throughput import cs_throughput, reference_throughput

REGISTRY_FILE = "registry.sqlite"
STAGES = ("all", "train", "eval")


# -- planning -------------------------------------------------------------------------------------
def _mask_key(run: dict[str, Any]) -> str:
    """Masks differ by model, method, structure, sparsity; by task (data-aware) and seed (seeded)."""
    parts = [run["model"], run["method"], run["structure"].replace(":", "of"), sparsity_tag(run["sparsity"])]
    if run["method"] in DATA_DRIVEN:
        parts.append(run["task"])
    if run["method"] in SEEDED_METHODS:
        parts.append(f"seed{run['seed']}")
    return "__".join(parts)


def _asset_paths(spec: SweepSpec, sweep_dir: Path, run: dict[str, Any]) -> dict[str, str | None]:
    """Shared inputs of a run: its mask file, pruned checkpoint, training and held-out data."""
    assets = sweep_dir / "assets"
    sparse = run["method"] != "dense"
    data = f"{run['model']}__{run['task']}"
    return {
        "masks": str(assets / "masks" / f"{_mask_key(run)}.safetensors") if sparse else None,
        "pruned": str(assets / "pruned" / _mask_key(run)) if sparse else None,
        "data": str(assets / "data" / data / "train")
        if run["mode"] != "none" or run["method"] in DATA_DRIVEN
        else None,
        "heldout": str(assets / "data" / data / "heldout") if spec.eval.heldout_loss else None,
    }


def _params_for(spec: SweepSpec, run: dict[str, Any], assets: dict, run_dir: Path) -> dict[str, Any]:
    """The model's params file with this run's mode, masks, data, seeds and output folder."""
    model = spec.models[run["model"]]
    params = load_yaml(model.params)
    seeds = run["seeds"]
    rc.set_mode(params, run["mode"], assets["masks"])
    rc.set_output(params, str(run_dir / "train"), seeds["trainer"])
    rc.set_training_data(params, assets["data"], spec.train.batch_size)  # evaluation: lm-eval, every backend
    rc.set_seeds(params, lora_init=seeds["lora_init"], data_order=seeds["data_order"])
    validation = validation_schedule(spec)
    if validation:  # the held-out loss during training, on the final held-out loss's examples
        rc.set_validation_data(params, assets["heldout"], validation["batch_size"], validation["every"],
                               validation["batches"])  # fmt: skip
    length = spec.train.length_for(run["task"])
    if length.max_steps:
        rc.set_max_steps(params, length.max_steps)
    if run["backend"] == "cs3":
        rc.set_base_checkpoint(params, model.cs_checkpoint)
        rc.ensure_callback(params, "SparseLoRALossLog")  # per-step losses and times: parity and throughput
    return params


def train_command(spec: SweepSpec, run: dict[str, Any], run_dir: Path) -> list[str] | None:
    """The backend's training command for a run (None for evaluation-only runs)."""
    params, out, hf = str(run_dir / "params.yaml"), str(run_dir / "train"), spec.models[run["model"]].hf_dir
    if run["mode"] == "none":
        return None
    reference = [params, "--hf-model", hf, "--out", out, "--no-progress"]
    if run["backend"] == "cpu":
        return [sys.executable, "-m", "gpu_reference.train", *reference, "--device", "cpu"]
    if run["backend"] == "gpu":
        # `python -m torch.distributed.run` is torchrun, from this very environment.
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={spec.gpu.nproc_per_node}",
                    "-m", "gpu_reference.train"]  # fmt: skip
        return [*launcher, *reference, "--device", "cuda"]
    cs = spec.cs3
    command = [
        cs.cszoo,
        "fit",
        params,
        "--target_device",
        "CSX",
        "--num_csx",
        str(cs.num_csx),
        "--model_dir",
        out,
    ]
    if cs.mount_dirs:
        command += ["--mount_dirs", *cs.mount_dirs]
    if cs.python_paths:
        command += ["--python_paths", *cs.python_paths]
    return command + list(cs.extra_args)


def _export_kind(run_dir: Path) -> str:
    """ "adapter" or "merged": what the run's trainer exports (the one rule, `SparseLoRAConfig.export_kind`)."""
    from modelzoo_ext.run_config import SparseLoRAConfig, find_model_section

    params = load_yaml(run_dir / "params.yaml")
    return SparseLoRAConfig(**find_model_section(params, str(run_dir))["sparse_lora"]).export_kind


def cs_export_command(spec: SweepSpec, run: dict[str, Any], run_dir: Path) -> list[str]:
    """cs3 only: the last CS checkpoint -> the export the trainer writes (train/merged or train/adapter).

    `LAST_CHECKPOINT` is resolved when the step runs (`latest_cs_checkpoint`); s2d adapters point
    at the pruned base, like the trainer's.
    """
    kind = _export_kind(run_dir)
    base = run["assets"]["pruned"] if run["mode"] == "s2d" else spec.models[run["model"]].hf_dir
    return [
        sys.executable, "-m", "modelzoo_ext.cli", "convert", "cs-to-hf",
        "--checkpoint", "LAST_CHECKPOINT", "--config", str(run_dir / "params.yaml"),
        "--base-model", str(base), "--as", kind, "--out", str(run_dir / "train" / kind),
    ]  # fmt: skip


def latest_cs_checkpoint(model_dir: Path) -> Path:
    """The highest-step `checkpoint_<step>.mdl` ModelZoo wrote into `model_dir`."""
    found = sorted(model_dir.glob("checkpoint_*.mdl"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))
    if not found:
        raise StepFailed(f"cszoo fit wrote no checkpoint_<step>.mdl in {model_dir}")
    return found[-1]


def config_hash(params: dict[str, Any], spec: SweepSpec, run: dict[str, Any]) -> str:
    """sha256 (16 hex) of what determines a run's numbers: its params, the protocol, training length,
    calibration and evaluation settings."""
    protocol = {
        "params": params,
        "data": spec.data.model_dump(),
        "train_length": spec.train.length_for(run["task"]).model_dump(),
        "calibration": spec.calibration.model_dump() if run["method"] in DATA_DRIVEN else None,
        "eval": spec.eval.model_dump(),
        "seeds": run["seeds"],
    }
    return hashlib.sha256(json.dumps(protocol, sort_keys=True, default=str).encode()).hexdigest()[:16]


def git_revision() -> str:
    """The project's git revision (with `-dirty` when the tree has changes), or `unknown`."""
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, check=True)  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True)  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def plan_sweep(sweep_yaml: str | Path, out: str | Path) -> list[dict[str, Any]]:
    """Write one run directory per run and a `planned` registry row; keep finished runs as they are.

    The whole sweep file is checked first (`load_sweep`): a bad grid writes nothing.
    """
    spec = load_sweep(sweep_yaml)
    runs = grid(spec)
    sweep_dir = Path(out).resolve()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with atomic_file(sweep_dir / "sweep.json") as tmp:
        tmp.write_text(spec.model_dump_json(indent=2))
    with atomic_file(sweep_dir / "seeds.json") as tmp:  # what each derived seed controls
        tmp.write_text(
            json.dumps({"roles": SEED_ROLES, "seeds": {r["seed"]: r["seeds"] for r in runs}}, indent=2)
        )
    registry = Registry(sweep_dir / REGISTRY_FILE)
    rev = git_revision()
    from tqdm import tqdm

    for run in tqdm(runs, desc="sweep plan", unit="run"):
        _plan_run(spec, run, sweep_dir, registry, rev)
    return runs


def _plan_run(spec: SweepSpec, run: dict[str, Any], sweep_dir: Path, registry: Registry, rev: str) -> None:
    run_dir = sweep_dir / "runs" / run["run_id"]
    run_dir.mkdir(parents=True, exist_ok=True)
    assets = _asset_paths(spec, sweep_dir, run)
    command = train_command(spec, run, run_dir)
    record = {**run, "assets": assets, "train_command": command, "hf_dir": spec.models[run["model"]].hf_dir}
    record["protocol"] = spec.data.protocol
    params = None
    if run["mode"] != "none":
        params = _params_for(spec, run, assets, run_dir)
        rc.write_yaml(run_dir / "params.yaml", params)
        lines = ["#!/bin/sh", "set -e", shlex.join(command)]
        if run["backend"] == "cs3":
            last = f'"$(ls -v {shlex.quote(str(run_dir / "train"))}/checkpoint_*.mdl | tail -n 1)"'
            lines.append(
                shlex.join(cs_export_command(spec, record, run_dir)).replace("LAST_CHECKPOINT", last)
            )
        with atomic_file(run_dir / "command.sh") as tmp:
            tmp.write_text("\n".join(lines) + "\n")
    record["config_hash"] = config_hash(params or {"mode": "none", **run}, spec, run)
    with atomic_file(run_dir / "run.json") as tmp:
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    existing = registry.get(run["run_id"])
    if existing is None or (existing.status != "succeeded" and existing.config_hash != record["config_hash"]):
        grid_fields = {
            k: run[k] for k in ("model", "task", "method", "structure", "sparsity", "mode", "backend", "seed")
        }
        registry.put(
            RunRecord(run["run_id"], status="planned", config_hash=record["config_hash"], git_rev=rev,
                      protocol=spec.data.protocol, seeds=run["seeds"], artifacts={"run_dir": str(run_dir)},
                      **grid_fields)
        )  # fmt: skip


# -- running --------------------------------------------------------------------------------------
def _load_plan(sweep_dir: Path) -> tuple[SweepSpec, list[dict[str, Any]]]:
    if not (sweep_dir / "sweep.json").is_file():
        raise UserError(
            "not a planned sweep directory (no sweep.json)",
            where=str(sweep_dir),
            fix="run `sweep plan` first",
        )
    spec = SweepSpec.model_validate_json((sweep_dir / "sweep.json").read_text())
    runs = [json.loads(p.read_text()) for p in sorted((sweep_dir / "runs").glob("*/run.json"))]
    return spec, runs


def _trained(record: RunRecord) -> bool:
    """Has the run's train stage finished (its model to evaluate recorded and checked)?"""
    return "model" in record.artifacts


def _wanted(run: dict[str, Any], record: RunRecord, stage: str) -> bool:
    """Does `stage` still have work on this run?"""
    if record.status == "succeeded":
        return False
    if stage == "train":
        return run["mode"] != "none" and not _trained(record)
    if stage == "eval":
        return _trained(record) or run["mode"] == "none"
    return True


def run_sweep(
    sweep_dir: str | Path,
    *,
    backend: str | None = None,
    parallel: int = 1,
    max_attempts: int = 4,
    backoff_s: float = 30.0,
    only: list[str] | None = None,
    stage: str = "all",
) -> dict[str, Any]:
    """Run the unfinished work of `stage` (for runs of `backend`, or of `only`); counts and any stop reason."""
    if stage not in STAGES:
        raise UserError(f"unknown stage {stage!r}", fix=f"use one of {STAGES}")
    sweep_dir = Path(sweep_dir).resolve()
    spec, runs = _load_plan(sweep_dir)
    registry = Registry(sweep_dir / REGISTRY_FILE)
    selected = [
        r for r in runs
        if (backend is None or r["backend"] in (backend, "eval")) and (only is None or r["run_id"] in only)
    ]  # fmt: skip
    if only and len(selected) != len(set(only)):
        raise UserError(
            f"unknown run id(s) {sorted(set(only) - {r['run_id'] for r in selected})}", where=str(sweep_dir)
        )
    records = {r["run_id"]: registry.get(r["run_id"]) or RunRecord(r["run_id"]) for r in selected}
    todo = [r for r in selected if _wanted(r, records[r["run_id"]], stage)]
    summary: dict[str, Any] = {
        "selected": len(selected),
        "stage": stage,
        "skipped_finished": len(selected) - len(todo),
    }
    executor = _RunExecutor(spec, sweep_dir, registry, max_attempts, backoff_s)
    from tqdm import tqdm

    with tqdm(total=len(todo), desc=f"sweep run ({stage})", unit="run") as bar:
        try:
            executor.build_assets(todo)
            with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
                for result in pool.map(lambda r: executor.run_one(r, stage), todo):
                    summary[result] = summary.get(result, 0) + 1
                    bar.update(1)
        except SweepStopped as exc:
            summary["stopped_reason"] = str(exc)
    if executor.stop_reason:
        summary["stopped_reason"] = executor.stop_reason
    return summary


class _RunExecutor:
    """Builds shared assets and executes runs; one instance per `sweep run`."""

    def __init__(
        self, spec: SweepSpec, sweep_dir: Path, registry: Registry, max_attempts: int, backoff_s: float
    ):
        self.spec, self.sweep_dir, self.registry = spec, sweep_dir, registry
        self.max_attempts, self.backoff_s = max_attempts, backoff_s
        self.stop_reason: str | None = None
        self.failed_assets: dict[str, str] = {}
        self._stop = threading.Event()

    def _cli(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "modelzoo_ext.cli", *args]

    def _step(self, command: list[str], log: Path) -> int:
        """One logged, retried step; says what runs where (each step's own progress bar is in its log)."""
        from tqdm import tqdm

        started = time.time()
        tqdm.write(f"[{time.strftime('%H:%M:%S')}] {_step_name(command)} -> {log}")
        attempts = run_with_retries(command, log, max_attempts=self.max_attempts, backoff_s=self.backoff_s)
        tqdm.write(f"[{time.strftime('%H:%M:%S')}]   done in {time.time() - started:.0f} s")
        return attempts

    # -- shared assets (sequential: runs share them) ---------------------------------------------
    def _data_command(self, run: dict[str, Any], split: str, out: str) -> list[str]:
        data = self.spec.data
        command = self._cli("data", "prepare", "--task", run["task"], "--protocol", data.protocol, "--source",
                            data.source, "--tokenizer", self.spec.models[run["model"]].hf_dir, "--max-seq-length",
                            str(data.max_seq_length), "--split", split, "--out", out)  # fmt: skip
        if data.protocol == "offline":
            command += ["--held-out-fraction", str(data.held_out_fraction), "--split-salt", data.split_salt]
        return command

    def _masks_command(self, run: dict[str, Any]) -> list[str]:
        model = self.spec.models[run["model"]]
        command = self._cli("masks", "compute", "--model", model.hf_dir, "--method", run["method"], "--structure",
                            run["structure"], "--scope", self.spec.scope, "--sparsity", str(run["sparsity"]),
                            "--seed", str(run["seeds"]["masks"]), "--no-plot", "--out", run["assets"]["masks"])  # fmt: skip
        if (
            run["method"] in DATA_DRIVEN
        ):  # calibrated on the task's training data, never on evaluated examples
            cal = self.spec.calibration
            command += ["--calibration-data", run["assets"]["data"], "--calibration-tokens", str(cal.tokens),
                        "--calibration-seqlen", str(cal.seq_len)]  # fmt: skip
        return command

    def build_assets(self, runs: list[dict[str, Any]]) -> None:
        logs = self.sweep_dir / "assets" / "logs"
        for run in runs:
            assets = run["assets"]
            for asset, split in (("data", "train"), ("heldout", "heldout")):
                if assets.get(asset):
                    self._build(assets[asset], self._data_command(run, split, assets[asset]), logs)
            if assets["masks"]:
                calibration = assets["data"] if run["method"] in DATA_DRIVEN else None
                self._build(assets["masks"], self._masks_command(run), logs, needs=calibration)
            if assets["pruned"] and run["mode"] in ("s2d", "none"):
                hf_dir = self.spec.models[run["model"]].hf_dir
                apply = self._cli(
                    "masks", "apply", "--model", hf_dir, "--masks", assets["masks"], "--out", assets["pruned"]
                )
                self._build(assets["pruned"], apply, logs, needs=assets["masks"])

    def _build(self, path: str, command: list[str], logs: Path, needs: str | None = None) -> None:
        if Path(path).exists() or path in self.failed_assets:
            return
        if needs and needs in self.failed_assets:
            self.failed_assets[path] = f"needs {needs}, which failed"
            return
        try:  # log named after the asset's place under assets/ (data/<model>__<task>/train -> data__..__train)
            name = "__".join(Path(path).relative_to(self.sweep_dir / "assets").parts)
            self._step(command, logs / f"{name}.log")
        except StepFailed as exc:
            self.failed_assets[path] = str(exc)

    # -- one run ---------------------------------------------------------------------------------
    def run_one(self, run: dict[str, Any], stage: str) -> str:
        """The run's work in `stage` ("all", "train" or "eval"); returns where it ended."""
        run_id, run_dir = run["run_id"], self.sweep_dir / "runs" / run["run_id"]
        if self._stop.is_set():
            return "not_started"
        record = self.registry.get(run_id) or RunRecord(run_id)
        self.registry.update(
            run_id, status="running", started_at=time.time(), attempts=record.attempts + 1, error=None
        )
        try:
            missing = [self.failed_assets[p] for p in run["assets"].values() if p in self.failed_assets]
            if missing:
                raise StepFailed(f"a shared asset failed: {missing[0]}")
            if stage != "eval" and run["mode"] != "none" and not _trained(record):
                self._train_stage(run, run_dir)
            if stage == "train":
                return "trained"
            self._eval_stage(run, run_dir)
            return "succeeded"
        except SweepStopped as exc:
            self.stop_reason = str(exc)
            self._stop.set()
            self.registry.update(run_id, status="stopped", error=str(exc), finished_at=time.time())
            return "stopped"
        except (StepFailed, UserError) as exc:
            self.registry.update(run_id, status="failed", error=str(exc), finished_at=time.time())
            return "failed"

    def _train_stage(self, run: dict[str, Any], run_dir: Path) -> None:
        """Train (unless evaluation-only), check the export's sparsity -> status `trained`."""
        artifacts, throughput = self._train(run, run_dir)
        model_dir, adapter_dir = self._model_to_evaluate(run, run_dir)
        mask_sha = self._check_sparse(run, model_dir, run_dir)
        artifacts.update(model=model_dir, adapter=adapter_dir, masks=run["assets"]["masks"])
        curve = heldout_curve(run_dir / "train" / "metrics.jsonl")  # [] unless validated during training
        self.registry.update(
            run["run_id"], status="trained", mask_sha256=mask_sha, artifacts={k: v for k, v in artifacts.items() if v},
            throughput=throughput or {}, throughput_tokens_per_s=(throughput or {}).get("tokens_per_s"),
            metrics={CURVE_KEY: curve} if curve else {},
        )  # fmt: skip

    def _eval_stage(self, run: dict[str, Any], run_dir: Path) -> None:
        """Evaluate the trained (or pruned / dense) model -> status `succeeded` with its metrics."""
        record = self.registry.get(run["run_id"])
        if run["mode"] == "none" and not _trained(record):
            self._train_stage(run, run_dir)  # nothing to train: the pruned model's sparsity check
            record = self.registry.get(run["run_id"])
        metrics = self._evaluate(run, run_dir, record.artifacts["model"], record.artifacts.get("adapter"))
        self.registry.update(
            run["run_id"], status="succeeded", metrics=metrics, finished_at=time.time(),
            artifacts={"eval": str(run_dir / "eval.json"), "samples": str(run_dir / "eval_samples")},
        )  # fmt: skip

    def _finalise_length(self, run: dict[str, Any], run_dir: Path) -> None:
        """`train.epochs` -> `max_steps` from the prepared training data, written into params.yaml once."""
        length = self.spec.train.length_for(run["task"])
        if length.epochs is None:
            return
        from modelzoo_ext.data.hdf5 import SampleDataset

        params = load_yaml(run_dir / "params.yaml")
        examples = len(SampleDataset(run["assets"]["data"]))
        batch = rc.train_batch_size(params)
        steps = max(1, math.floor(length.epochs * examples / batch))
        if params["trainer"]["init"]["loop"].get("max_steps") != steps:
            rc.set_max_steps(params, steps)
            rc.write_yaml(run_dir / "params.yaml", params)
        record = json.loads((run_dir / "run.json").read_text())
        record["train_length"] = {
            "epochs": length.epochs,
            "examples": examples,
            "batch_size": batch,
            "max_steps": steps,
        }
        with atomic_file(run_dir / "run.json") as tmp:
            tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")

    def _train(self, run: dict[str, Any], run_dir: Path) -> tuple[dict[str, str], dict | None]:
        if run["mode"] == "none":
            return {}, None
        self._finalise_length(run, run_dir)
        train_dir = run_dir / "train"
        if run["backend"] == "cs3":
            if not (train_dir / _export_kind(run_dir)).is_dir():
                self._step(run["train_command"], run_dir / "train.log")
                command = cs_export_command(self.spec, run, run_dir)
                command[command.index("LAST_CHECKPOINT")] = str(latest_cs_checkpoint(train_dir))
                self._step(command, run_dir / "train.log")
            return {"train_dir": str(train_dir)}, cs_throughput(train_dir, load_yaml(run_dir / "params.yaml"))
        if not _train_complete(train_dir):
            self._step(run["train_command"], run_dir / "train.log")
        if not _train_complete(train_dir):
            raise StepFailed(f"training ended without a complete run record in {train_dir}")
        return {"train_dir": str(train_dir)}, reference_throughput(
            train_dir / "metrics.jsonl", run["backend"]
        )

    def _model_to_evaluate(self, run: dict[str, Any], run_dir: Path) -> tuple[str, str | None]:
        """The checkpoint (and adapter) that stands for this run; never a dense stand-in."""
        mode, train_dir, hf_dir = run["mode"], run_dir / "train", run["hf_dir"]
        if mode == "none":
            return (run["assets"]["pruned"] or hf_dir), None
        kind = _export_kind(run_dir)
        export = train_dir / kind
        if not export.is_dir():
            raise StepFailed(f"the {mode} export is missing: {export}")
        if kind == "merged":
            return str(export), None
        # s2d adapters sit on the pruned base; the dense-LoRA baseline's on the dense model.
        return (run["assets"]["pruned"] if mode == "s2d" else hf_dir), str(export)

    def _check_sparse(self, run: dict[str, Any], model_dir: str, run_dir: Path) -> str | None:
        """Zero violations of the run's mask in the evaluated base weights; returns the mask file's sha256."""
        masks = run["assets"]["masks"]
        if not masks:
            return None
        from modelzoo_ext.hf_checkpoint import HFCheckpoint
        from modelzoo_ext.masks.format import MaskFile
        from modelzoo_ext.sparse_lora import check_sparsity

        report = check_sparsity(HFCheckpoint(model_dir), MaskFile(masks))
        with atomic_file(run_dir / "sparsity_check.json") as tmp:
            tmp.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        if not report.ok:
            raise StepFailed(
                f"{model_dir} does not satisfy {masks} ({report.total_violations} violations, "
                f"{len(report.missing)} missing): refusing to evaluate a dense checkpoint as a sparse one"
            )
        return _file_sha256(Path(masks))

    def _eval_command(
        self, run: dict[str, Any], run_dir: Path, model_dir: str, adapter_dir: str | None
    ) -> list[str]:
        ev, data = self.spec.eval, self.spec.data
        command = self._cli("eval", "--model", model_dir, "--tasks", ",".join(ev.tasks or [run["task"]]), "--data",
                            data.source, "--protocol", data.protocol, "--batch-size", str(ev.batch_size), "--device",
                            ev.device, "--out", str(run_dir / "eval.json"))  # fmt: skip
        if data.protocol == "offline":
            command += ["--held-out-fraction", str(data.held_out_fraction), "--split-salt", data.split_salt]
        command += ["--adapter", adapter_dir] if adapter_dir else []
        command += ["--limit", str(ev.limit)] if ev.limit else []
        command += ["--max-gen-toks", str(ev.max_gen_toks)] if ev.max_gen_toks else []
        command += ["--loss-data", run["assets"]["heldout"]] if run["assets"].get("heldout") else []
        command += (
            ["--loss-limit", str(ev.heldout_limit)]
            if run["assets"].get("heldout") and ev.heldout_limit
            else []
        )
        return command

    def _evaluate(
        self, run: dict[str, Any], run_dir: Path, model_dir: str, adapter_dir: str | None
    ) -> dict[str, Any]:
        out = run_dir / "eval.json"
        if not out.exists():
            self._step(self._eval_command(run, run_dir, model_dir, adapter_dir), run_dir / "eval.log")
        from modelzoo_ext.study.evaluate import primary_metrics

        results = json.loads(out.read_text())
        metrics = primary_metrics(results) if results.get("tasks") else {}
        if "heldout_loss" in results:
            metrics["heldout/nll_per_token"] = results["heldout_loss"]["nll_per_token"]
        return {
            **metrics,
            "eval_limit": results.get("limit"),
            "lm_eval_version": results.get("lm_eval_version"),
        }


def _step_name(command: list[str]) -> str:
    """`masks compute`, `gpu_reference.train`, `cszoo`, ... for progress lines."""
    if "modelzoo_ext.cli" in command:
        words = command[command.index("modelzoo_ext.cli") + 1 :][:2]
        return " ".join(w for w in words if not w.startswith("-"))
    if "-m" in command:
        return command[command.index("-m") + 1]
    return Path(command[0]).name


def _train_complete(train_dir: Path) -> bool:
    record = train_dir / "run.json"
    return record.is_file() and bool(json.loads(record.read_text()).get("complete"))


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sweep_status(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Each planned run's registry row (run id, status, attempts, error, main metrics)."""
    sweep_dir = Path(sweep_dir).resolve()
    _load_plan(sweep_dir)
    return [
        {
            "run_id": rec.run_id,
            "status": rec.status,
            "attempts": rec.attempts,
            "error": rec.error,
            "metrics": rec.metrics,
        }
        for rec in Registry(sweep_dir / REGISTRY_FILE).runs()
    ]
