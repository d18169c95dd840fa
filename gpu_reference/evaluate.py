"""The validation loss the reference trainer logs during training (ModelZoo's `validate_0/loss`).

    val = validation_loss(model, dataset, cfg.val_dataloader, eval_steps=10, scaling="num_tokens", ...)

`val.loss` is the mean over `eval_steps` validation batches (all of them when unset) of each
batch's loss (`gpu_reference.loss`: LM only, as ModelZoo evaluates), each batch normalised over
all ranks; `val.nll_per_token` pools the same token losses over every validated example.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpu_reference.data import collate, global_batches, rank_slice
from gpu_reference.distributed import all_reduce_
from gpu_reference.loss import loss_sums, loss_token_count, normalise
from gpu_reference.step import micro_batches


@dataclass(frozen=True)
class Validation:
    """One pass over the validation data, in two readings of the same per-token losses.

    `loss` is ModelZoo's evaluation loss: the mean over batches of each batch's loss (`loss_scaling`).
    `nll_per_token` pools the batches: summed NLL / summed loss tokens over every validated example,
    the quantity of the sweep's held-out loss (`modelzoo_ext.study.heldout_loss`) and the log of
    ModelZoo's `eval/lm_perplexity`. The two differ when batches hold different numbers of loss tokens.
    """

    loss: float
    nll_per_token: float
    loss_tokens: int
    samples: int


@torch.no_grad()
def validation_loss(
    model, dataset, val, *, eval_steps: int | None, scaling: str, loss_weight: float, autocast: bool,
    device: torch.device, rank: int = 0, world_size: int = 1, micro_batch_size: int | None = None,
) -> Validation:  # fmt: skip
    """The loss over `eval_steps` batches of the validation data (all whole batches when unset).

    `val`: the validation dataloader section (batch size, shuffle, seed, drop_last). Each batch
    runs in micro-batches of `micro_batch_size` rows (the training one): the summed token losses
    over the whole batch's loss-token count, as one pass would give.
    """
    num_batches = len(dataset) // val.batch_size
    if eval_steps:
        num_batches = min(num_batches, eval_steps)
    model.eval()
    losses, nll, tokens = [], 0.0, 0.0
    batches = global_batches(len(dataset), val.batch_size, val.shuffle, val.shuffle_seed, val.drop_last)
    for _ in range(num_batches):
        batch = collate(dataset, rank_slice(next(batches), rank, world_size))
        parts = [
            loss_sums(model, micro, autocast, device) for micro in micro_batches(batch, micro_batch_size)
        ]
        token_loss = torch.stack([part.token_loss.float() for part in parts]).sum()  # LM only, as ModelZoo
        count = loss_token_count(batch["attention_mask"], parts[0].count_dtype, autocast, device)
        totals = all_reduce_(torch.stack([token_loss, count.float()]), world_size)
        losses.append(float(normalise(totals[0], totals[1], scaling, val.batch_size, loss_weight)))
        nll, tokens = nll + float(totals[0]), tokens + float(totals[1])
    model.train()
    return Validation(
        loss=sum(losses) / max(1, len(losses)),
        nll_per_token=nll / tokens if tokens else float("nan"),
        loss_tokens=int(tokens),
        samples=num_batches * val.batch_size,
    )
