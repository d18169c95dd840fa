"""The checks of one configuration (1 to 5), and the preflight of one params file (with its disk budget).

    checks, cfg = configuration_checks(subject, work_dir)       # config, masks, provenance, data, memory, twin
    report = preflight_params(subject, work_dir)                 # the above + the run's disk budget

The order is cheap first: the run config (ModelZoo's classes, the reference trainer's validation,
config.json, checkpoints), the mask callback's rules and the mask file against the model,
provenance, the data, the GPU memory plan; the scaled-down twin last, and only when everything
before it passed (a refused config is not worth a minute of training to be refused again).
"""

from __future__ import annotations

from pathlib import Path

from modelzoo_ext.errors import UserError
from modelzoo_ext.run_config import RunConfig
from modelzoo_ext.study.preflight.config_checks import (
    checkpoint_check,
    model_check,
    modelzoo_check,
    reference_check,
)
from modelzoo_ext.study.preflight.data_check import data_checks
from modelzoo_ext.study.preflight.disk import DiskBudget, disk_check, run_outputs
from modelzoo_ext.study.preflight.mask_callback import mask_callback_check, masks_fit_check
from modelzoo_ext.study.preflight.memory import memory_check
from modelzoo_ext.study.preflight.model_counts import model_counts
from modelzoo_ext.study.preflight.provenance_check import provenance_check
from modelzoo_ext.study.preflight.quota import filesystem_room
from modelzoo_ext.study.preflight.report import FAIL, SKIP, Check, PreflightReport
from modelzoo_ext.study.preflight.subject import Subject
from modelzoo_ext.study.preflight.twin import TwinMasks, twin_checks


def configuration_checks(
    subject: Subject, work: Path, *, twin: bool = True, twin_masks: TwinMasks | None = None,
    prepared_later: bool = False, data_stand_in: str | None = None,
) -> tuple[list[Check], RunConfig | None]:  # fmt: skip
    """Checks 1-5 of `subject` (and the twin, 4, unless `twin=False`); the validated run config.

    twin_masks: how the twin's masks are made (default: as the run's mask file records).
    prepared_later / data_stand_in: a sweep's data not built yet (see `data_checks`, `modelzoo_check`).
    """
    work.mkdir(parents=True, exist_ok=True)
    checks = [modelzoo_check(subject, data_stand_in=data_stand_in)]
    reference, cfg = reference_check(subject, work)
    checks.append(reference)
    if cfg is not None:
        checks += [model_check(subject, cfg), checkpoint_check(subject, cfg)]
    checks.append(mask_callback_check(subject))
    checks += [c for c in (masks_fit_check(subject), provenance_check(subject)) if c is not None]
    checks += data_checks(subject, cfg, prepared_later=prepared_later)
    if cfg is not None and (memory := memory_check(subject, cfg)) is not None:
        checks.append(memory)
    if not twin:
        checks.append(Check("twin", SKIP, "not asked for (--no-twin)"))
    elif any(c.status == FAIL for c in checks) or cfg is None:
        checks.append(Check("twin", SKIP, "not run: the checks above failed (fix them first)"))
    else:
        masks = None if subject.dense_baseline else (twin_masks or TwinMasks.of_file(subject.mask_path))
        checks += twin_checks(subject, masks, work / "twin")
    return checks, cfg


def run_budget(subject: Subject, cfg: RunConfig, *, keep: int | None = None, setting: str = "") -> DiskBudget:
    """The disk budget of one run of `subject` (keep: the KeepNCheckpoints n to assume)."""
    hf_config, _ = subject.hf_config()
    counts = model_counts(hf_config, cfg.sparse_lora.target_modules, cfg.sparse_lora.r)
    outputs = run_outputs(
        cfg, counts, backend=subject.backend, label=subject.label, hf_dir=subject.hf_dir, keep=keep
    )
    return DiskBudget([outputs], filesystem_room(subject.model_dir), setting=setting)


def single_disk_check(subject: Subject, cfg: RunConfig | None) -> Check:
    """Check 6 for one run: its outputs against the filesystem of its model_dir."""
    if cfg is None:
        return Check("disk budget", SKIP, "needs a run config the reference trainer accepts (see above)")
    try:
        budget = run_budget(subject, cfg)
        alternatives = [] if cfg.keep_checkpoints == 1 else [run_budget(subject, cfg, keep=1,
                                                                         setting="KeepNCheckpoints: {n: 1}")]  # fmt: skip
    except UserError as exc:
        return Check("disk budget", FAIL, str(exc))
    return disk_check(budget, alternatives)


def preflight_params(subject: Subject, work: Path, *, twin: bool = True) -> PreflightReport:
    """`sparse-lora preflight PARAMS.yaml`: checks 1-6 of one configuration."""
    report = PreflightReport(subject.label)
    masks = None
    if twin and not subject.dense_baseline and subject.mask_path and Path(subject.mask_path).is_file():
        try:
            masks = TwinMasks.of_file(subject.mask_path)
        except UserError:
            masks = None
    checks, cfg = configuration_checks(subject, work, twin=twin, twin_masks=masks)
    report.extend(checks)
    report.add(single_disk_check(subject, cfg))
    report.notes.append(f"work directory: {work}")
    return report
