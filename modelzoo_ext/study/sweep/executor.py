"""Executing one grid point's stage, given its plan: the unit that a local runner (`runner.py`) and a
cluster task (`task.py`) run.

    outcome = execute_stage(plan, stage, policy=StepPolicy(), assets=None)   # -> StageOutcome

It reads and writes only the run's own directory (and builds the shared assets the run is
missing): its progress and results go to the run's record (`records.py`, `record.json`, written
atomically), never to the registry database, which one process rebuilds from the records.

Stages of a run:
    train  (fine-tunes) `train.epochs` resolved into `max_steps` from the prepared training data
           (written into params.yaml once, recorded in run.json); the backend's training command
           (cs3: then `convert cs-to-hf` of the last checkpoint), skipped when the trainer's
           record says it finished; then the model to evaluate must satisfy the run's mask with
           zero violations (a dense checkpoint is never evaluated in place of a sparse one) ->
           status `trained`, with the export's paths and checksums, the mask file's sha256, the
           throughput and the software versions of the stage; with `train.keep_checkpoints: 0`
           the run's training checkpoints are then deleted (the study needs the export only)
    eval   `sparse-lora eval` of that model (the no-fine-tune runs: the pruned or dense base, after
           the same sparsity check) -> status `succeeded`, with its metrics (each with its 95%
           interval), the evaluation's checksums and the software versions of the stage
    all    both

The record's status goes to `running` when a stage starts, and ends `trained`, `succeeded`,
`failed` (a permanent step failure, or a transient one past its attempts; `UserError`s too) or
`stopped` (disk full or quota: every further run would fail too). A run killed meanwhile stays
`running` and is redone like a failed one. `attempts` counts the starts of the run's work (an
`eval` right after its `train` stage goes on with the same attempt). Finished work is not redone
(`stage_done`, the one definition the local runner, the task entry point and `sweep submit` use):
a run that `succeeded`, or (stage `train`) is `trained`, is `skipped`; `eval` before training is
`not_trained`.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from modelzoo_ext.atomic import atomic_file
from modelzoo_ext.errors import UserError
from modelzoo_ext.run_config import trainer_yaml as rc
from modelzoo_ext.study.cluster.launch import launcher_from_env
from modelzoo_ext.study.heldout_loss import CURVE_KEY, heldout_curve
from modelzoo_ext.study.registry import RunRecord
from modelzoo_ext.study.steps import StepFailed, StepPolicy, SweepStopped, run_step
from modelzoo_ext.study.sweep.assets import AssetBuilder
from modelzoo_ext.study.sweep.commands import cs_export_command, eval_command, train_command
from modelzoo_ext.study.sweep.plan import RunPlan, load_params, read_plan_file, write_plan
from modelzoo_ext.study.sweep.records import (
    artifact_checksums,
    planned_record,
    read_record,
    update_record,
    write_record,
)
from modelzoo_ext.versions import git_revision, run_versions

Stage = Literal["all", "train", "eval"]
STAGES: tuple[Stage, ...] = ("all", "train", "eval")
DEFAULT_POLICY = StepPolicy()
Result = Literal["trained", "succeeded", "failed", "stopped", "skipped", "not_trained"]


@dataclass(frozen=True)
class StageOutcome:
    """Where one run's stage ended, and why when it did not succeed."""

    run_id: str
    stage: Stage
    result: Result
    error: str | None = None


def is_trained(record: RunRecord) -> bool:
    """Has the run's train stage finished (its model to evaluate recorded and checked)?"""
    return "model" in record.artifacts


def stage_done(plan: RunPlan, record: RunRecord | None, stage: Stage) -> bool:
    """Is `stage`'s work on this run finished, so that nothing is redone? The one definition the
    local runner, the task entry point and `sweep submit` use: a run that `succeeded` is done; its
    `train` stage also once its checked model is recorded (status `trained` and later), or at once
    for a run that does not train (no-fine-tune baselines: the sparsity check is part of `eval`)."""
    if record is None:
        return False
    if record.status == "succeeded":
        return True
    return stage == "train" and (not plan.trains or is_trained(record))


def can_start(plan: RunPlan, record: RunRecord | None, stage: Stage) -> bool:
    """Can `stage` run now? `eval` of a run that trains waits for its `train` stage."""
    return stage != "eval" or not plan.trains or (record is not None and is_trained(record))


def has_work(plan: RunPlan, record: RunRecord | None, stage: Stage) -> bool:
    """Does `stage` still have work on this run that can be done now?"""
    return not stage_done(plan, record, stage) and can_start(plan, record, stage)


def execute_stage(
    plan: RunPlan, stage: Stage, *, policy: StepPolicy = DEFAULT_POLICY, assets: AssetBuilder | None = None
) -> StageOutcome:
    """Run `stage` of one planned run, recording its progress in the run's record; see the module doc.

    `assets` shares asset builds (and their failures) between the runs of one process; without it
    the run builds what it is missing itself.
    """
    if stage not in STAGES:
        raise UserError(f"unknown stage {stage!r}", fix=f"use one of {STAGES}")
    record = read_record(plan.run_dir) or write_record(plan.run_dir, planned_record(plan, git_revision()))
    if stage_done(plan, record, stage):
        return StageOutcome(plan.run_id, stage, "skipped")
    if not can_start(plan, record, stage):
        return StageOutcome(plan.run_id, stage, "not_trained", f"{plan.run_id} is not trained yet")
    # An attempt is a start of the run's work: evaluating a run just `trained` goes on with the same
    # one (so a run counts 1 whether its stages ran in one process or as two tasks).
    attempts = record.attempts + (record.status != "trained")
    update_record(plan.run_dir, status="running", started_at=time.time(), attempts=attempts, error=None)
    try:
        (assets or AssetBuilder(plan.sweep_dir, policy)).ensure(plan)
        if stage != "eval" and plan.trains and not is_trained(record):
            _train_stage(plan, policy)
        if stage == "train":
            return StageOutcome(plan.run_id, stage, "trained")
        _eval_stage(plan, policy)
        return StageOutcome(plan.run_id, stage, "succeeded")
    except SweepStopped as exc:
        update_record(plan.run_dir, status="stopped", error=str(exc), finished_at=time.time())
        return StageOutcome(plan.run_id, stage, "stopped", str(exc))
    except (StepFailed, UserError) as exc:
        update_record(plan.run_dir, status="failed", error=str(exc), finished_at=time.time())
        return StageOutcome(plan.run_id, stage, "failed", str(exc))


def _train_stage(plan: RunPlan, policy: StepPolicy) -> None:
    """Train (unless evaluation-only), check the model's sparsity -> status `trained`."""
    throughput = _train(plan, policy) if plan.trains else None
    model_dir, adapter_dir = model_to_evaluate(plan)
    mask_sha = check_sparse(plan, model_dir)
    artifacts = {"train_dir": str(plan.train_dir) if plan.trains else None, "model": model_dir,
                 "adapter": adapter_dir, "masks": plan.assets.masks}  # fmt: skip
    checksums = artifact_checksums(
        plan.sweep_dir, [plan.params_path, *([plan.export_dir] if plan.trains else [])]
    )
    if mask_sha:
        checksums[_under(plan, plan.assets.masks)] = f"sha256:{mask_sha}"  # hashed once, by the check
    curve = _heldout_curve(plan) if plan.trains else []
    update_record(
        plan.run_dir, status="trained", mask_sha256=mask_sha, artifacts={k: v for k, v in artifacts.items() if v},
        throughput=throughput or {}, throughput_tokens_per_s=(throughput or {}).get("tokens_per_s"),
        checksums=checksums, versions={"train": run_versions()}, metrics={CURVE_KEY: curve} if curve else {},
    )  # fmt: skip
    if plan.trains and plan.spec.train.keep_checkpoints == 0:
        drop_training_checkpoints(plan)


def training_checkpoints(plan: RunPlan) -> list[Path]:
    """The checkpoint files the run's trainer wrote (cs3: `checkpoint_<step>.mdl`; the reference
    trainer: `checkpoints/step_<N>.pt`)."""
    from gpu_reference.checkpoint import CHECKPOINT_DIR

    if plan.backend == "cs3":
        return sorted(plan.train_dir.glob("checkpoint_*.mdl"))
    return sorted((plan.train_dir / CHECKPOINT_DIR).glob("step_*.pt"))


def drop_training_checkpoints(plan: RunPlan) -> None:
    """`train.keep_checkpoints: 0`: once the export is checked and recorded, the run's training
    checkpoints are not needed by the study (evaluation reads the export)."""
    for path in training_checkpoints(plan):
        path.unlink(missing_ok=True)


def _heldout_curve(plan: RunPlan) -> list[dict[str, Any]]:
    """The held-out loss the trainer logged during training ([] unless the sweep validates)."""
    from gpu_reference.metrics import METRICS_FILE

    return heldout_curve(plan.train_dir / METRICS_FILE)


def _under(plan: RunPlan, path: str) -> str:
    """`path` relative to the sweep directory (as checksums are keyed), or as it is when outside it."""
    return str(Path(path).relative_to(plan.sweep_dir)) if Path(path).is_relative_to(plan.sweep_dir) else path


def _eval_stage(plan: RunPlan, policy: StepPolicy) -> None:
    """Evaluate the trained (or pruned / dense) model -> status `succeeded` with its metrics."""
    record = read_record(plan.run_dir)
    if not plan.trains and not is_trained(record):
        _train_stage(plan, policy)  # nothing to train: the pruned model's sparsity check
        record = read_record(plan.run_dir)
    metrics = _evaluate(plan, policy, record.artifacts["model"], record.artifacts.get("adapter"))
    results, samples = plan.run_dir / "eval.json", plan.run_dir / "eval_samples"
    update_record(
        plan.run_dir, status="succeeded", metrics=metrics, finished_at=time.time(),
        artifacts={"eval": str(results), "samples": str(samples)},
        checksums=artifact_checksums(plan.sweep_dir, [results, samples]), versions={"eval": run_versions()},
    )  # fmt: skip


def _finalise_length(plan: RunPlan) -> None:
    """`train.epochs` -> `max_steps` from the prepared training data, written into params.yaml once."""
    length = plan.spec.train.length_for(plan.task)
    if length.epochs is None:
        return
    from modelzoo_ext.data.hdf5 import SampleDataset

    params = load_params(plan.run_dir)
    examples = len(SampleDataset(plan.assets.data))
    batch = rc.train_batch_size(params)
    steps = max(1, math.floor(length.epochs * examples / batch))
    if rc.max_steps(params) != steps:
        rc.set_max_steps(params, steps)
        rc.set_checkpoint_steps(params, plan.spec.train.checkpoint_steps)
        rc.write_yaml(plan.params_path, params)
    train_length = {"epochs": length.epochs, "examples": examples, "batch_size": batch, "max_steps": steps}
    write_plan(plan, **{**read_plan_file(plan.run_dir), "train_length": train_length})


def _train(plan: RunPlan, policy: StepPolicy) -> dict[str, Any] | None:
    """Train unless the trainer finished already; the run's throughput (None without step times)."""
    from gpu_reference.metrics import METRICS_FILE
    from gpu_reference.run_record import is_complete
    from modelzoo_ext.study.throughput import cs_throughput, reference_throughput

    _finalise_length(plan)
    log = plan.run_dir / "train.log"
    if plan.backend == "cs3":
        if not plan.export_dir.is_dir():
            run_step(train_command(plan), log, policy)
            run_step(cs_export_command(plan, str(latest_cs_checkpoint(plan.train_dir))), log, policy)
        return cs_throughput(plan.train_dir, load_params(plan.run_dir))
    if not is_complete(plan.train_dir):
        run_step(train_command(plan, launcher_from_env()), log, policy)
    if not is_complete(plan.train_dir):
        raise StepFailed(f"training ended without a complete run record in {plan.train_dir}")
    return reference_throughput(plan.train_dir / METRICS_FILE, plan.backend)


def latest_cs_checkpoint(model_dir: Path) -> Path:
    """The highest-step `checkpoint_<step>.mdl` ModelZoo wrote into `model_dir`."""
    found = sorted(model_dir.glob("checkpoint_*.mdl"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))
    if not found:
        raise StepFailed(f"cszoo fit wrote no checkpoint_<step>.mdl in {model_dir}")
    return found[-1]


def model_to_evaluate(plan: RunPlan) -> tuple[str, str | None]:
    """The checkpoint (and adapter) that stands for this run; never a dense stand-in."""
    if not plan.trains:
        return (plan.assets.pruned or plan.hf_dir), None
    export = plan.export_dir
    if not export.is_dir():
        raise StepFailed(f"the {plan.mode} export is missing: {export}")
    if plan.export_kind == "merged":
        return str(export), None
    # s2d adapters sit on the pruned base; the dense-LoRA baseline's on the dense model.
    return (plan.assets.pruned if plan.mode == "s2d" else plan.hf_dir), str(export)


def check_sparse(plan: RunPlan, model_dir: str) -> str | None:
    """Zero violations of the run's mask in `model_dir`'s base weights (report in the run directory);
    returns the mask file's sha256 (None for dense runs)."""
    masks = plan.assets.masks
    if not masks:
        return None
    from modelzoo_ext.hf_checkpoint import HFCheckpoint
    from modelzoo_ext.masks.checksum import file_sha256
    from modelzoo_ext.masks.format import MaskFile
    from modelzoo_ext.sparse_lora import check_sparsity

    report = check_sparsity(HFCheckpoint(model_dir), MaskFile(masks))
    with atomic_file(plan.run_dir / "sparsity_check.json") as tmp:
        tmp.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    if not report.ok:
        raise StepFailed(
            f"{model_dir} does not satisfy {masks} ({report.total_violations} violations, "
            f"{len(report.missing)} missing): refusing to evaluate a dense checkpoint as a sparse one"
        )
    return file_sha256(masks)


def _evaluate(plan: RunPlan, policy: StepPolicy, model_dir: str, adapter_dir: str | None) -> dict[str, Any]:
    """Evaluate unless `eval.json` exists; the metrics it holds (scores with intervals, held-out loss)."""
    out = plan.run_dir / "eval.json"
    if not out.exists():
        run_step(eval_command(plan, model_dir, adapter_dir), plan.run_dir / "eval.log", policy)
    from modelzoo_ext.study.evaluate import primary_metrics

    results = json.loads(out.read_text())
    metrics = primary_metrics(results) if results.get("tasks") else {}
    if "heldout_loss" in results:
        metrics["heldout/nll_per_token"] = results["heldout_loss"]["nll_per_token"]
    return {**metrics, "eval_limit": results.get("limit"), "lm_eval_version": results.get("lm_eval_version")}
