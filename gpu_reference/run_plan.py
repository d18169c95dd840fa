"""The memory check of a reference run, before any weight is read (and `train --plan`).

    checked = check_memory(cfg, hf_config, masks_file=..., world_size=8, device=cuda:0, fsdp=True,
                           memory=MemoryOptions(micro_batch_size="auto"))
    checked.micro_batch_size; checked.plan.table(); checked.as_record()

It gathers what the plan needs without reading weights: the device's memory (`--device-memory`,
else the free memory of the GPU; unknown on the CPU), the longest prepared sequences
(`gpu_reference.data.sequence_stats`, or the configured worst case when the data is not there
yet), the mask densities from the mask file's header, and the micro-batch setting
(`gpu_reference.micro_batch`). `auto` takes the largest micro-batch whose plan fits. A plan
that does not fit is refused by the caller with `not_fitting` (a `UserError`, exit 2, with the
numbers and the levers).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from gpu_reference.data import SequenceStats, sequence_stats
from gpu_reference.memory_plan import (
    GIB,
    MemoryPlan,
    configured_sequences,
    largest_micro_batch,
    parse_memory_size,
    plan_memory,
)
from gpu_reference.micro_batch import AUTO, MicroBatchSetting, micro_batch_setting
from gpu_reference.train_args import MemoryOptions
from modelzoo_ext.errors import UserError
from modelzoo_ext.run_config import RunConfig


@dataclass
class CheckedMemory:
    """The plan a run starts with, and the micro-batch it chose."""

    plan: MemoryPlan
    setting: MicroBatchSetting
    micro_batch_size: int  # per rank; the rank's whole slice when not micro-batched
    sequences: SequenceStats
    probe: dict[str, Any] | None = None  # what the `auto` probe found (a GPU), set by the trainer

    def as_record(self) -> dict[str, Any]:
        """run.json's `memory` entry."""
        return {
            "micro_batch_size": self.micro_batch_size,
            "micro_batch_requested": self.setting.requested,
            "micro_batch_source": self.setting.source,
            "probe": self.probe,
            "plan": self.plan.as_record(),
        }


def device_memory(device: torch.device, given: str | None) -> tuple[int | None, str]:
    """(bytes, where the number comes from): `--device-memory`, else the GPU's free memory."""
    if given is not None:
        return parse_memory_size(given), f"--device-memory {given}"
    if device.type == "cuda" and not torch.cuda.is_available():
        return None, "not known: no GPU here (pass --device-memory, e.g. 80GB)"
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        name = torch.cuda.get_device_name(device)
        return int(free), f"free memory of {device} ({name}, {total / GIB:.1f} GiB in all)"
    return None, "not known on the CPU (pass --device-memory to check a plan)"


def mask_densities(masks_file: str | None) -> dict[str, float] | None:
    """{mask name: kept fraction} from the mask file's header (no mask is read); None without one."""
    if masks_file is None or not Path(masks_file).is_file():
        return None
    from modelzoo_ext.masks.format import MaskFile

    tensors = MaskFile(masks_file).metadata["tensors"]
    return {name: info["kept"] / max(1, info["numel"]) for name, info in tensors.items()}


@dataclass(frozen=True)
class PlannedInputs:
    """What a planned sweep run knows before its data and masks exist: the data's maximum sequence
    length (`data prepare --max-seq-length`) and, for per-layer masks, every mask's kept fraction
    (None: not known per layer, e.g. a global threshold)."""

    max_seq_length: int
    mask_density: float | None = None


def run_sequences(cfg: RunConfig, planned: PlannedInputs | None = None) -> SequenceStats:
    """The training data's sequence statistics, or the worst case before it exists (every sample
    at the planned data's maximum length, else the run config's maximum positions)."""
    data_dir = cfg.fit.train_dataloader.data_dir
    if Path(data_dir).is_dir() and any(Path(data_dir).glob("*.h5")):
        return sequence_stats(data_dir)
    if planned is not None:
        longest = planned.max_seq_length
        return SequenceStats(longest, longest, f"worst case: data not prepared yet, every sample {longest} tokens "
                             "(the planned --max-seq-length), every position a loss token")  # fmt: skip
    return configured_sequences(cfg)


def check_memory(
    cfg: RunConfig,
    hf_config: dict[str, Any],
    *,
    masks_file: str | None,
    world_size: int,
    device: torch.device,
    fsdp: bool,
    memory: MemoryOptions,
    planned: PlannedInputs | None = None,
) -> CheckedMemory:
    """The plan of this run on one of its devices, with the micro-batch chosen (`auto`: the
    largest that fits; 1 when none does, whose plan then does not fit). `planned`: what a sweep
    knows of its data and masks before they are built (used only where they are not there)."""
    setting = micro_batch_setting(cfg, memory.micro_batch_size)
    total, source = device_memory(device, memory.device_memory)
    sequences = run_sequences(cfg, planned)
    densities = mask_densities(masks_file)
    if densities is None and planned is not None:
        densities = planned.mask_density
    plan_args = dict(
        world_size=world_size, device_memory=total, device_memory_source=source, fsdp=fsdp,
        activation_checkpointing=memory.activation_checkpointing, bf16_base=memory.bf16_base,
        sequences=sequences, mask_densities=densities, device_type=device.type,
        sampled_product=memory.sampled_product,
    )  # fmt: skip
    per_rank = cfg.fit.train_dataloader.batch_size // world_size
    requested = setting.requested
    if requested == AUTO:
        chosen = largest_micro_batch(cfg, hf_config, **plan_args) if total is not None else per_rank
        micro = chosen or 1  # none fits: plan 1, which is then refused with the levers below
    else:
        micro = min(requested or per_rank, per_rank)
    plan = plan_memory(cfg, hf_config, micro_batch_size=micro, **plan_args)
    return CheckedMemory(plan, setting, micro, sequences)


def not_fitting(checked: CheckedMemory) -> UserError:
    """The refusal: the total, the largest terms, and the levers with their totals."""
    plan = checked.plan
    levers = "; ".join(
        f"{what}: {total / GIB:.1f} GiB{' (fits)' if total <= plan.device_memory else ''}"
        for what, total in plan.levers()
    )
    return UserError(
        f"this run does not fit the device: {plan.summary()}, micro-batch {checked.micro_batch_size} "
        f"({checked.setting.source})",
        where=plan.device_memory_source,
        fix=f"levers (plan total each): {levers}; see `sparse-lora train ... --plan`",
    )


def planned_world_size(given: int | None) -> int:
    """`--world-size`, else torchrun's WORLD_SIZE, else 1."""
    import os

    return int(given or os.environ.get("WORLD_SIZE", "1"))


def plan_device(device_arg: str | None) -> torch.device:
    """The device a plan is made for: a GPU unless `--device cpu` (a plan needs no GPU present)."""
    return torch.device("cpu" if device_arg == "cpu" else "cuda")


def with_probe(checked: CheckedMemory, probe: dict[str, Any], micro: int) -> CheckedMemory:
    """`checked` after the `auto` probe settled on `micro`."""
    return replace(checked, micro_batch_size=micro, probe=probe)
