"""Check 1: the run config as the trainers will read it, before any of them runs.

    modelzoo_check(subject)                ModelZoo's own config classes, as `cszoo fit` validates
                                           (skipped, with the reason, where ModelZoo is not installed)
    reference_check(subject, work_dir)     the reference trainer's validation (`load_run_config`)
    model_check(subject, cfg)              the run config's model section against config.json
    checkpoint_check(subject, cfg)         the checkpoints the run writes: a cs3 run without
                                           `checkpoint.steps` writes none, and its export would fail

The mask callback's own rules, which `cszoo fit` applies only once the trainer is built, are in
`mask_callback.py`.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

from modelzoo_ext.errors import UserError
from modelzoo_ext.run_config import RunConfig, check_architecture, load_run_config
from modelzoo_ext.run_config import trainer_yaml as rc
from modelzoo_ext.study.preflight.report import FAIL, PASS, SKIP, Check
from modelzoo_ext.study.preflight.subject import Subject


def modelzoo_installed() -> bool:
    """Is Cerebras ModelZoo importable here?"""
    try:
        return importlib.util.find_spec("cerebras.modelzoo") is not None
    except ModuleNotFoundError:
        return False


def modelzoo_release() -> str | None:
    from modelzoo_ext.versions import stack_versions

    return stack_versions().get("cerebras-modelzoo")


def modelzoo_check(subject: Subject, *, data_stand_in: str | None = None) -> Check:
    """ModelZoo's validation of the run's params (`modelzoo_ext.cerebras.validation`).

    `data_stand_in`: a data directory to validate with where the run's own is not prepared yet
    (ModelZoo's data processor checks that `data_dir` exists); the detail says so.
    """
    if not modelzoo_installed():
        return Check("run config: ModelZoo's classes", SKIP,
                     "ModelZoo is not installed here: the reference trainer's validation and the mask-callback "
                     "rules below stand in for it")  # fmt: skip
    from modelzoo_ext.cerebras.validation import modelzoo_validation_problems

    name = f"run config: ModelZoo {modelzoo_release()} classes"
    params, note = subject.params, ""
    if data_stand_in is not None:
        params = copy.deepcopy(params)
        rc.train_dataloader(params)["data_dir"] = data_stand_in
        note = f" (the training data is not prepared yet: validated with {data_stand_in} in its place)"
    problems = modelzoo_validation_problems(params)
    if problems:
        return Check(name, FAIL, "; ".join(problems) + note)
    callbacks = [
        next(iter(c)) for c in subject.params["trainer"]["init"].get("callbacks") or [] if isinstance(c, dict)
    ]
    return Check(name, PASS, f"accepted as `cszoo fit` validates it: model {subject.model.get('name')}, "
                 f"callbacks {', '.join(callbacks) or 'none'}{note}")  # fmt: skip


def reference_check(subject: Subject, work_dir: Path) -> tuple[Check, RunConfig | None]:
    """The reference trainer's validation of the same params (what a GPU run, and the twin, read)."""
    name = "run config: reference trainer"
    try:
        cfg = load_run_config(subject.write_params(work_dir / "params.yaml"))
    except UserError as exc:
        return Check(name, FAIL, str(exc)), None
    ignored = sorted(cfg.ignored)
    shown = ", ".join(ignored[:6]) + (", ..." if len(ignored) > 6 else "")
    detail = f"accepted; {len(ignored)} keys read by the CS backend only ({shown})" if ignored else "accepted"
    return Check(name, PASS, detail), cfg


def model_check(subject: Subject, cfg: RunConfig) -> Check:
    """The run config's model section describes the HF model (every key that changes the computation)."""
    name = "model: config.json vs run config"
    family = subject.family
    if family is None:
        return Check(name, FAIL, f"model {subject.model.get('name')!r} is of no known family")
    try:
        hf_config, source = subject.hf_config()
        check = check_architecture(cfg.model_section, hf_config, family.name)
    except UserError as exc:
        return Check(name, FAIL, str(exc))
    if not check.ok:
        return Check(name, FAIL, "; ".join(check.mismatches) + f" ({source})")
    return Check(name, PASS, f"{len(check.compared)} keys equal ({source})")


def checkpoint_check(subject: Subject, cfg: RunConfig) -> Check:
    """Which checkpoints the run writes and keeps; a cs3 run must write at least its last one."""
    name = "checkpoints"
    every = cfg.init.checkpoint.steps if cfg.init.checkpoint else None
    keep = cfg.keep_checkpoints
    kept = "all kept" if keep is None else f"the newest {keep} kept (KeepNCheckpoints)"
    if subject.backend == "cs3" and not every:
        return Check(name, FAIL, "no trainer.init.checkpoint.steps: cszoo fit writes no checkpoint, so the "
                     "trained LoRA factors are lost and `convert cs-to-hf` has nothing to export; set "
                     f"checkpoint.steps (e.g. {cfg.max_steps}: the last step only)")  # fmt: skip
    when = f"every {every} steps and at step {cfg.max_steps}" if every else f"at step {cfg.max_steps} only"
    return Check(name, PASS, f"written {when}; {kept}")
