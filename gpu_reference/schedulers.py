"""Learning-rate schedules with cerebras-pytorch's per-step formulas, written in plain torch.

The learning rate of optimizer step t (0-based) is a closed form of t, computed with the same
float32 tensor operations as `cstorch.optim.lr_scheduler` (so the two backends agree bit for
bit, not just approximately):

    ConstantLR     lr = learning_rate
    LinearLR       lr = end                                      if t >= total_iters
                        (1 - t / total_iters) * (initial - end) + end   otherwise   (cycle: false)
    CosineDecayLR  lr = 0.5 * (1 + cos(pi / total_iters * min(t, total_iters))) * (initial - end) + end
    SequentialLR   lr = schedulers[k](t - milestones[k-1]), k = number of milestones <= t;
                   milestones default to the cumulative `total_iters` of all but the last one
                   (as ModelZoo's config computes them).

YAML (the trainer's `schedulers:` list, one LR scheduler):

    schedulers:
      - SequentialLR:
          schedulers:
            - LinearLR: {initial_learning_rate: 0.0, end_learning_rate: 1.0e-4, total_iters: 10}
            - CosineDecayLR: {initial_learning_rate: 1.0e-4, end_learning_rate: 1.0e-5, total_iters: 90}
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from modelzoo_ext.errors import UserError

Schedule = Callable[[int], torch.Tensor]  # optimizer step t -> float32 0-d tensor

FIELDS = {
    "ConstantLR": ({"learning_rate"}, {"total_iters"}),
    "LinearLR": ({"initial_learning_rate", "end_learning_rate", "total_iters"}, {"cycle"}),
    "CosineDecayLR": ({"initial_learning_rate", "end_learning_rate", "total_iters"}, set()),
    "SequentialLR": ({"schedulers"}, {"milestones"}),
}


def _constant(learning_rate: float, total_iters: int | None = None) -> Schedule:
    return lambda t: torch.tensor(learning_rate)


def _linear(
    initial_learning_rate: float, end_learning_rate: float, total_iters: int, cycle: bool = False
) -> Schedule:
    if cycle:
        raise UserError("LinearLR with cycle: true is not supported by gpu_reference", fix="remove `cycle`")
    diff = initial_learning_rate - end_learning_rate

    def lr(t: int) -> torch.Tensor:
        step = torch.tensor(t)
        alpha = torch.tensor(1.0, dtype=torch.float32)
        return torch.where(
            step >= total_iters,
            torch.tensor(end_learning_rate, dtype=torch.float32),
            torch.sub(1, torch.div(step, torch.mul(total_iters, alpha)))
            .pow(1.0)
            .mul(diff)
            .add(end_learning_rate)
            .float(),
        )

    return lr


def _cosine(initial_learning_rate: float, end_learning_rate: float, total_iters: int) -> Schedule:
    diff = initial_learning_rate - end_learning_rate

    def lr(t: int) -> torch.Tensor:
        step = torch.minimum(torch.tensor(total_iters, dtype=torch.float32), torch.tensor(t))
        progress = torch.div(math.pi, total_iters).mul(step).cos().add(1).mul(0.5)
        return torch.mul(progress, diff).add(end_learning_rate)

    return lr


def _sequential(schedulers: list[Any], milestones: list[int] | None = None) -> Schedule:
    parts = [build_schedule(s) for s in schedulers]
    expected = list(_cumsum(_total_iters(s) for s in schedulers[:-1]))
    if milestones is None:
        milestones = expected
    elif list(milestones) != expected:
        raise UserError(
            f"SequentialLR milestones {milestones} differ from the cumulative total_iters {expected}",
            fix="drop `milestones` (ModelZoo computes them) or make them match",
        )

    def lr(t: int) -> torch.Tensor:
        k = sum(1 for m in milestones if t >= m)
        start = milestones[k - 1] if k else 0
        return parts[k](t - start)

    return lr


def _cumsum(values) -> list[int]:
    total, out = 0, []
    for v in values:
        total += v
        out.append(total)
    return out


def _total_iters(spec: dict[str, Any]) -> int:
    ((name, args),) = spec.items()
    if "total_iters" not in args or args["total_iters"] is None:
        raise UserError(f"{name} inside SequentialLR needs total_iters", where=f"schedulers.{name}")
    return int(args["total_iters"])


BUILDERS = {
    "ConstantLR": _constant,
    "LinearLR": _linear,
    "CosineDecayLR": _cosine,
    "SequentialLR": _sequential,
}


def build_schedule(spec: dict[str, Any]) -> Schedule:
    """A schedule from one YAML entry `{Name: {args}}` (names and arguments as in cstorch)."""
    if not isinstance(spec, dict) or len(spec) != 1:
        raise UserError(
            f"a scheduler must be a one-key mapping {{Name: {{...}}}}, got {spec!r}", where="schedulers"
        )
    ((name, args),) = spec.items()
    if name not in BUILDERS:
        raise UserError(
            f"scheduler {name!r} is not supported by gpu_reference",
            where="trainer.init.schedulers",
            fix=f"use one of {sorted(BUILDERS)}",
        )
    args = dict(args or {})
    required, optional = FIELDS[name]
    unknown = set(args) - required - optional
    missing = required - set(args)
    if unknown or missing:
        raise UserError(
            f"{name}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}",
            where=f"trainer.init.schedulers.{name}",
        )
    return BUILDERS[name](**args)


def build_lr_schedule(schedulers: Any, base_lr: float) -> Schedule:
    """The run's schedule from the trainer's `schedulers:` (None -> constant `base_lr`)."""
    if schedulers is None or schedulers == []:
        return _constant(base_lr)
    if isinstance(schedulers, dict):
        schedulers = [schedulers]
    if len(schedulers) != 1:
        raise UserError(
            f"gpu_reference supports one learning-rate scheduler, got {len(schedulers)}",
            where="trainer.init.schedulers",
            fix="wrap them in one SequentialLR",
        )
    return build_schedule(schedulers[0])
