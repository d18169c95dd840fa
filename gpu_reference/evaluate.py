"""The validation loss the reference trainer logs during training (ModelZoo's `validate_0/loss`).

    loss = validation_loss(model, dataset, cfg.val_dataloader, eval_steps=10, scaling="num_tokens", ...)

The mean over `eval_steps` validation batches (all of them when unset) of each batch's loss
(`gpu_reference.loss`: LM only, as ModelZoo evaluates), each batch normalised over all ranks.
"""

from __future__ import annotations

import torch

from gpu_reference.data import collate, global_batches, rank_slice
from gpu_reference.distributed import all_reduce_
from gpu_reference.loss import loss_sums, loss_token_count, normalise
from gpu_reference.step import micro_batches


@torch.no_grad()
def validation_loss(
    model, dataset, val, *, eval_steps: int | None, scaling: str, loss_weight: float, autocast: bool,
    device: torch.device, rank: int = 0, world_size: int = 1, micro_batch_size: int | None = None,
) -> float:  # fmt: skip
    """Mean loss over `eval_steps` batches of the validation data (all of it when unset).

    `val`: the validation dataloader section (batch size, shuffle, seed, drop_last). Each batch
    runs in micro-batches of `micro_batch_size` rows (the training one): the summed token losses
    over the whole batch's loss-token count, as one pass would give.
    """
    num_batches = len(dataset) // val.batch_size
    if eval_steps:
        num_batches = min(num_batches, eval_steps)
    model.eval()
    losses = []
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
    model.train()
    return sum(losses) / max(1, len(losses))
