"""One optimizer step of the reference trainer: the unit the recipe loops over and benchmarks time.

    config = StepConfig(batch_size=32, loss_scaling="num_tokens", autocast=True, max_norm=1.0,
                        micro_batch_size=4)
    result = train_step(model, optimizer, trainable, batches, config)

`batches` are this rank's slices of the step's `grad_accum_steps` global batches (ModelZoo's
gradient accumulation: each batch's loss is divided by their number). Each slice runs as
micro-batches of at most `micro_batch_size` samples, one forward/backward each, so a device
holds the activations of one micro-batch at a time; the batch's loss keeps ModelZoo's
normalisation exactly: every micro-batch's summed token loss is divided by the loss-token count
of the *whole global batch* (counted before the first backward, `loss_token_count`, summed over
the ranks), so the summed gradients of the micro-batches are the gradient of the batch's loss.
Gradients are summed over the torchrun ranks (each rank holds its slice of every global batch,
so N ranks compute what one process computes on the whole batch), clipped by norm or value,
and the optimizer steps. `on_grads`, if given, is called once the step's gradients are whole
(summed over the micro-batches and ranks) and before they are clipped: where ModelZoo's
`ComputeNorm` reads them. A MoE run (`StepConfig.router`) adds ModelZoo's load-balancing loss:
coef * (the micro-batches' `aux_loss_sum` over all ranks) / the global batch size.

Every trainable parameter gets a gradient, zero where the step did not reach it (an expert no
token was routed to: transformers skips it): ModelZoo's fused experts get exact zeros there, so
the optimizer steps them alike (moments, weight decay), and every rank all-reduces the same set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from gpu_reference.distributed import all_reduce_
from gpu_reference.loss import RouterLoss, loss_sums, loss_token_count, normalise
from gpu_reference.metrics import non_padding_tokens

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class StepConfig:
    """What a step needs from the run config (ModelZoo's semantics) and the run's options.

    `micro_batch_size`: samples per forward/backward on this rank (None: the whole slice).
    """

    batch_size: int
    loss_scaling: str = "num_tokens"
    loss_weight: float = 1.0
    autocast: bool = False
    max_norm: float | None = None
    max_value: float | None = None
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    router: RouterLoss | None = None
    micro_batch_size: int | None = None


@dataclass
class StepResult:
    """The step's loss (as ModelZoo reports it), gradient norm and token counts (over all ranks)."""

    loss: float
    grad_norm: float
    tokens: int
    loss_tokens: int
    samples: int


def micro_batches(batch: Batch, size: int | None) -> Iterator[Batch]:
    """Consecutive slices of at most `size` rows of `batch` (the whole batch when `size` is None)."""
    rows = batch["input_ids"].shape[0]
    step = rows if size is None else size
    for start in range(0, rows, step):
        yield {key: value[start : start + step] for key, value in batch.items()}


def _clip(trainable: list[torch.nn.Parameter], config: StepConfig) -> torch.Tensor:
    """Clip by norm or by value; returns the gradient norm before clipping (what ModelZoo logs)."""
    if config.max_norm is not None:
        return torch.nn.utils.clip_grad_norm_(trainable, config.max_norm)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainable if p.grad is not None]))
    if config.max_value is not None:
        torch.nn.utils.clip_grad_value_(trainable, config.max_value)
    return norm


def _backward_batch(
    model: torch.nn.Module, batch: Batch, config: StepConfig, accumulated: int
) -> tuple[torch.Tensor, int]:
    """Forward/backward one batch slice as micro-batches; returns (its loss / `accumulated`, global loss tokens)."""
    device, world = config.device, config.world_size
    batch_loss = torch.zeros((), device=device)
    global_count = None
    for micro in micro_batches(batch, config.micro_batch_size):
        sums = loss_sums(model, micro, config.autocast, device, config.router)
        if global_count is None:  # the whole global batch's count, in the dtype the loss counts in
            count = loss_token_count(batch["attention_mask"], sums.count_dtype, config.autocast, device)
            global_count = all_reduce_(count.detach().float().clone(), world)
        loss = normalise(
            sums.token_loss, global_count, config.loss_scaling, config.batch_size, config.loss_weight
        )
        if config.router is not None:  # each slice's sum_b over the global batch size
            loss = loss + config.router.coef * sums.router / config.batch_size
        loss = loss / accumulated
        loss.backward()
        batch_loss += loss.detach().float()
    return batch_loss, int(global_count)


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainable: list[torch.nn.Parameter],
    batches: list[Batch],
    config: StepConfig,
    on_grads: Callable[[], None] | None = None,
) -> StepResult:
    """Forward/backward over `batches` (this rank's slices) in micro-batches, reduce, clip, step;
    see the module doc."""
    device, world = config.device, config.world_size
    step_loss = torch.zeros((), device=device)
    tokens = loss_tokens = samples = 0
    for batch in batches:
        batch_loss, batch_loss_tokens = _backward_batch(model, batch, config, len(batches))
        step_loss += batch_loss
        tokens += non_padding_tokens(batch["attention_mask"])
        loss_tokens += batch_loss_tokens
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
