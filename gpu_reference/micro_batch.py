"""How many samples one forward/backward holds on a rank: the setting, where it came from, `auto`.

    setting = micro_batch_setting(cfg, cli_value)          # MicroBatchSetting("auto" | int | None, source)
    size = probe_micro_batch(model, start, sequences, step_config)   # `auto` on a GPU

The setting comes from `--micro-batch-size` when given, else from the run config's own
micro-batch setting (`RunConfig.train_micro_batch_size`: the CSX flag
`csx.performance.micro_batch_size` computes the same summed gradients on a CS-3, so its value is
the natural default), else the rank's whole slice of the batch (ModelZoo's `None`: no tiling).
An int larger than the rank's slice means the whole slice. `auto` is the largest micro-batch
whose memory plan fits the device (`memory_plan.largest_micro_batch`), confirmed on a GPU by a
short probe: one forward/backward of that many longest samples, halved on a CUDA out-of-memory
by accelerate's `find_executable_batch_size`. ModelZoo's `explore` (a CS search that trains
nothing) has no reference-trainer meaning and is refused.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

from gpu_reference.data import SequenceStats
from gpu_reference.loss import loss_sums
from gpu_reference.step import StepConfig
from modelzoo_ext.errors import UserError
from modelzoo_ext.run_config import RunConfig

AUTO = "auto"


@dataclass(frozen=True)
class MicroBatchSetting:
    """What was asked for (an int, "auto", or None for the whole slice) and where it was set."""

    requested: int | str | None
    source: str


def _parse(value: Any, where: str) -> int | str | None:
    if value is None or (isinstance(value, str) and value.lower() in ("none", "disable")):
        return None
    if isinstance(value, str) and value.lower() == AUTO:
        return AUTO
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    raise UserError(
        f"micro-batch size {value!r}: the reference trainer takes a positive int, auto or none",
        where=where,
        fix="pass --micro-batch-size N|auto|none (ModelZoo's `explore` searches CS-3 settings and trains nothing)",
    )


def micro_batch_setting(cfg: RunConfig, cli_value: str | None) -> MicroBatchSetting:
    """The run's micro-batch setting: `--micro-batch-size`, else the run config's, else none."""
    if cli_value is not None:
        return MicroBatchSetting(_parse(cli_value, "--micro-batch-size"), "--micro-batch-size")
    own = cfg.train_micro_batch_size
    if own is not None:
        value, key = own
        return MicroBatchSetting(_parse(value, f"{cfg.path}: trainer.init.{key}"), key)
    return MicroBatchSetting(None, "not set: each rank's whole slice of the batch")


def _probe_batch(size: int, sequences: SequenceStats) -> dict[str, torch.Tensor]:
    """`size` samples of the longest length, their last positions under the loss."""
    shape = (size, sequences.longest)
    loss_mask = torch.zeros(shape, dtype=torch.int32)
    loss_mask[:, sequences.longest - min(sequences.longest, sequences.most_loss_tokens) :] = 1
    return {"input_ids": torch.zeros(shape, dtype=torch.int32), "attention_mask": loss_mask,
            "labels": torch.zeros(shape, dtype=torch.int32)}  # fmt: skip


def _forward_backward(model: torch.nn.Module, batch: dict[str, torch.Tensor], config: StepConfig) -> None:
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        with torch.random.fork_rng(devices=[config.device] if config.device.type == "cuda" else []):
            sums = loss_sums(model, batch, config.autocast, config.device, config.router)
            loss = sums.token_loss + (sums.router if sums.router is not None else 0.0)
            loss.backward()
    finally:
        for p in trainable:
            p.grad = None


def probe_micro_batch(
    model: torch.nn.Module, start: int, sequences: SequenceStats, config: StepConfig
) -> tuple[int, int | None]:
    """(largest micro-batch <= `start` whose forward/backward ran, its peak device bytes on a GPU).

    Runs on `config.device` with the run's model; gradients and RNG are left as they were.
    Halves on an out-of-memory (accelerate's `find_executable_batch_size`)."""
    from accelerate.utils import find_executable_batch_size

    sizes = iter([start // 2**i for i in range(1, start.bit_length() + 1)])
    cuda = config.device.type == "cuda"

    def attempt(size: int) -> tuple[int, int | None]:
        if cuda:
            torch.cuda.reset_peak_memory_stats(config.device)
        _forward_backward(model, _probe_batch(size, sequences), config)
        return size, int(torch.cuda.max_memory_allocated(config.device)) if cuda else None

    halving = (
        {"reduce_batch_size_fn": lambda: next(sizes)}
        if "reduce_batch_size_fn" in inspect.signature(find_executable_batch_size).parameters
        else {}  # accelerate before 1.x halves by itself
    )
    try:
        return find_executable_batch_size(attempt, starting_batch_size=start, **halving)()
    except RuntimeError as exc:
        if "No executable batch size" not in str(exc):
            raise
        raise UserError(
            "even a micro-batch of 1 sample runs out of device memory (probe)",
            fix="use --activation-checkpointing, --fsdp over more ranks, or --bf16-base (see the memory plan)",
        ) from exc
