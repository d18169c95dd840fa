"""Check 5: a GPU run's memory per device, by the reference trainer's own memory plan.

    memory_check(subject, cfg)              ->  Check (gpu runs only)
    memory_check_each(subjects, cfg)        ->  one Check for runs that differ in mask sparsity

The plan is `gpu_reference.memory_plan.plan_memory`, through the check the reference trainer
makes at the start of every GPU run (`gpu_reference.run_plan.check_memory`: the micro-batch,
checkpointing, FSDP and sampled-product options the run is launched with, `auto` = the largest
micro-batch that fits, the prepared data's longest sequences and the mask file's densities), so
the preflight and the run cannot disagree. Before a sweep's data and masks exist, the plan takes
what the sweep planned (its `--max-seq-length`, the per-layer sparsity) instead of the worst case.
The device's memory comes from `--device-memory` (or the sweep's `gpu.device_memory`): there is
no GPU on the machine that plans. Where that plan is not importable, the check is skipped with
the reason (`plan_module`): nothing else stands in for it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from modelzoo_ext.errors import UserError
from modelzoo_ext.run_config import RunConfig
from modelzoo_ext.study.preflight.report import FAIL, PASS, SKIP, Check
from modelzoo_ext.study.preflight.subject import Subject

NAME = "memory per GPU"
PLAN_MODULES = ("gpu_reference.memory_plan", "gpu_reference.run_plan")


def plan_module() -> ModuleType | None:
    """`gpu_reference.run_plan` when the memory plan is installed, else None."""
    try:
        return [importlib.import_module(name) for name in PLAN_MODULES][-1]
    except ModuleNotFoundError:
        return None


def memory_check(subject: Subject, cfg: RunConfig) -> Check | None:
    """The plan of one device of the run (None off the gpu backend)."""
    return memory_check_each([subject], cfg)


def memory_check_each(subjects: list[Subject], cfg: RunConfig) -> Check | None:
    """The plan of one device of each run (runs of one configuration that differ in their masks'
    sparsity, hence in the s2s sampled-product index): the first that does not fit, else the
    largest plan. None off the gpu backend."""
    if subjects[0].backend != "gpu":
        return None
    run_plan = plan_module()
    if run_plan is None:
        return Check(NAME, SKIP, "memory plan not merged: gpu_reference.memory_plan is not importable here")
    if subjects[0].device_memory is None:
        return Check(NAME, SKIP, "device memory unknown: pass --device-memory (e.g. 80GB) or set the sweep's "
                     "gpu.device_memory")  # fmt: skip
    largest = None
    for subject in subjects:
        try:
            checked = plan_device_memory(run_plan, subject, cfg)
        except UserError as exc:
            return Check(NAME, FAIL, str(exc))
        if checked.plan.fits is False:
            return _plan_check(checked, subject, len(subjects))
        if largest is None or checked.plan.total > largest[0].plan.total:
            largest = (checked, subject)
    return _plan_check(*largest, len(subjects))


def _plan_check(checked, subject: Subject, runs: int) -> Check:
    plan = checked.plan
    summary = f"{plan.summary()}; micro-batch {checked.micro_batch_size} ({checked.setting.source}), {subject.gpus} GPU(s)"
    if runs > 1:
        summary += f"; {subject.label} (of {runs} mask sparsities planned)"
    if plan.fits is False:
        levers = "; ".join(f"{what}: {total / 2**30:.1f} GiB" for what, total in plan.levers())
        return Check(NAME, FAIL, f"does not fit: {summary}; levers (plan total each): {levers or 'none'}")
    return Check(NAME, PASS, f"fits: {summary}")


def plan_device_memory(run_plan: ModuleType, subject: Subject, cfg: RunConfig):
    """`check_memory` of the run as the trainer will start it: `subject.gpus` processes, with the
    FSDP, micro-batch and activation checkpointing it is given (the sweep's `gpu:` settings, or the
    run config's own micro-batch setting), on a device of `subject.device_memory`."""
    import torch

    from gpu_reference.train_args import MemoryOptions

    planned = None
    if subject.planned_max_seq_length is not None:
        planned = run_plan.PlannedInputs(subject.planned_max_seq_length, subject.planned_mask_density)
    hf_config, _ = subject.hf_config()
    return run_plan.check_memory(
        cfg, hf_config, masks_file=subject.mask_path, world_size=subject.gpus, device=torch.device("cuda"),
        fsdp=subject.fsdp, memory=MemoryOptions(
            micro_batch_size=subject.micro_batch_size, activation_checkpointing=subject.activation_checkpointing,
            device_memory=subject.device_memory, sampled_product=subject.sampled_product,
        ),
        planned=planned,
    )  # fmt: skip
