"""One optimizer step of the reference trainer: the unit the recipe loops over and benchmarks time.

    config = StepConfig(batch_size=32, loss_scaling="num_tokens", autocast=True, max_norm=1.0)
    result = train_step(model, optimizer, trainable, micro_batches, config)

A step runs `len(micro_batches)` forward/backward passes (gradient accumulation: each pass's loss
is divided by their number), sums gradients over the torchrun ranks (each rank holds its slice
of every global batch; the loss of a slice is divided by the *global* token count, so N ranks
compute what one process computes on the whole batch), clips by norm or value, and steps the
optimizer. `on_grads`, if given, is called once the step's gradients are whole (summed over the
micro-batches and ranks) and before they are clipped: where ModelZoo's `ComputeNorm` reads them.
A MoE run (`StepConfig.router`) adds ModelZoo's load-balancing loss to each pass's
loss: coef * (the passes' `aux_loss_sum` over all ranks) / the global batch size.

Every trainable parameter gets a gradient, zero where the step did not reach it (an expert no
token was routed to: transformers skips it): ModelZoo's fused experts get exact zeros there, so
the optimizer steps them alike (moments, weight decay), and every rank all-reduces the same set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from gpu_reference.loss import RouterLoss, loss_sums, normalise
from gpu_reference.metrics import non_padding_tokens


@dataclass(frozen=True)
class StepConfig:
    """What a step needs from the run config (ModelZoo's semantics)."""

    batch_size: int
    loss_scaling: str = "num_tokens"
    loss_weight: float = 1.0
    autocast: bool = False
    max_norm: float | None = None
    max_value: float | None = None
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    router: RouterLoss | None = None


@dataclass
class StepResult:
    """The step's loss (as ModelZoo reports it), gradient norm and token counts (over all ranks)."""

    loss: float
    grad_norm: float
    tokens: int
    loss_tokens: int
    samples: int


def all_reduce_(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    """Sum over the torchrun ranks (in place); a no-op in one process."""
    if world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _clip(trainable: list[torch.nn.Parameter], config: StepConfig) -> torch.Tensor:
    """Clip by norm or by value; returns the gradient norm before clipping (what ModelZoo logs)."""
    if config.max_norm is not None:
        return torch.nn.utils.clip_grad_norm_(trainable, config.max_norm)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainable if p.grad is not None]))
    if config.max_value is not None:
        torch.nn.utils.clip_grad_value_(trainable, config.max_value)
    return norm


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainable: list[torch.nn.Parameter],
    micro_batches: list[dict[str, torch.Tensor]],
    config: StepConfig,
    on_grads: Callable[[], None] | None = None,
) -> StepResult:
    """Forward/backward over `micro_batches` (this rank's slices), reduce, clip, step; see the module doc."""
    device, world = config.device, config.world_size
    step_loss = torch.zeros((), device=device)
    tokens = loss_tokens = samples = 0
    for batch in micro_batches:
        loss_sum, count, *aux = loss_sums(model, batch, config.autocast, device, config.router)
        global_count = all_reduce_(count.detach().float().clone(), world)
        loss = normalise(loss_sum, global_count, config.loss_scaling, config.batch_size, config.loss_weight)
        if config.router is not None:  # each rank's slice of sum_b over the global batch size
            loss = loss + config.router.coef * aux[0] / config.batch_size
        loss = loss / len(micro_batches)
        loss.backward()
        step_loss += loss.detach().float()
        tokens += non_padding_tokens(batch["attention_mask"])
        loss_tokens += int(global_count)
        samples += batch["input_ids"].shape[0] * world
    for p in trainable:  # sum the slices' gradients: the gradient of the global batch's loss
        if p.grad is None:  # not reached this step (an un-routed expert): zero, as on ModelZoo
            p.grad = torch.zeros_like(p)
        all_reduce_(p.grad, world)
    all_reduce_(step_loss, world)
    if on_grads is not None:
        on_grads()
    grad_norm = _clip(trainable, config)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = int(all_reduce_(torch.tensor(tokens, device=device), world))
    return StepResult(float(step_loss), float(grad_norm), tokens, loss_tokens, samples)
