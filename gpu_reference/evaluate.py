"""The validation loss the reference trainer logs during training (ModelZoo's `validate_0/loss`).

    loss = validation_loss(model, dataset, cfg.val_dataloader, eval_steps=10, scaling="num_tokens", ...)

The mean over `eval_steps` validation batches (all of them when unset) of each batch's loss
(`gpu_reference.loss`: LM only, as ModelZoo evaluates), each batch normalised over all ranks.
"""

from __future__ import annotations

import torch

from gpu_reference.data import collate, global_batches, rank_slice
from gpu_reference.distributed import all_reduce_
from gpu_reference.loss import loss_sums, normalise


@torch.no_grad()
def validation_loss(
    model, dataset, val, *, eval_steps: int | None, scaling: str, loss_weight: float, autocast: bool,
    device: torch.device, rank: int = 0, world_size: int = 1,
) -> float:  # fmt: skip
    """Mean loss over `eval_steps` batches of the validation data (all of it when unset).

    `val`: the validation dataloader section (batch size, shuffle, seed, drop_last).
    """
    num_batches = len(dataset) // val.batch_size
    if eval_steps:
        num_batches = min(num_batches, eval_steps)
    model.eval()
    losses = []
    batches = global_batches(len(dataset), val.batch_size, val.shuffle, val.shuffle_seed, val.drop_last)
    for _ in range(num_batches):
        batch = collate(dataset, rank_slice(next(batches), rank, world_size))
        sums = loss_sums(model, batch, autocast, device)  # evaluation: LM only, as ModelZoo
        totals = all_reduce_(torch.stack([sums.token_loss.float(), sums.loss_tokens.float()]), world_size)
        losses.append(float(normalise(totals[0], totals[1], scaling, val.batch_size, loss_weight)))
    model.train()
    return sum(losses) / max(1, len(losses))
