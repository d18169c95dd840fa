"""ModelZoo's GPT fine-tuning loss on a transformers causal LM, and the validation loss.

The data's `attention_mask` is ModelZoo's loss mask (0 on the prompt, 1 on the completion), not
a padding mask: the model attends causally only, and the logits at position i are scored against
labels[i] (the data is already shifted). `loss_scaling` is ModelZoo's: `num_tokens` divides the
summed token loss by the number of loss tokens of the global batch, `batch_size` by the batch
size (times `loss_weight`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def loss_sums(
    model, batch: dict[str, torch.Tensor], autocast: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed token loss over the loss mask, number of loss tokens) of one batch.

    batch: int32 `input_ids`, `attention_mask` (the loss mask), `labels`, each [B, msl].
    Causality makes two savings exact: positions after the batch's last loss-bearing one are
    dropped (fine-tuning samples are mostly padding), and the LM head runs only at loss-bearing
    positions (`logits_to_keep`; completions are a few tokens after a long prompt).
    """
    loss_mask = batch["attention_mask"].to(device)
    keep = loss_mask.any(dim=0).nonzero().squeeze(1)  # [P] positions with a loss in some row
    length = int(keep[-1]) + 1 if keep.numel() else 1
    input_ids = batch["input_ids"][:, :length].to(device).long()
    labels = batch["labels"].to(device).long()[:, keep]
    loss_mask = loss_mask[:, keep]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=input_ids, logits_to_keep=keep).logits  # [B, P, vocab]
        token_loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none"
        )
        weights = loss_mask.to(dtype=logits.dtype).reshape(-1)
        return (token_loss * weights).sum(), weights.sum()


@torch.no_grad()
def per_example_loss_sums(
    model, batch: dict[str, torch.Tensor], autocast: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed token loss of each row [B], loss tokens of each row [B]) in float32, for evaluation.

    The same loss as `loss_sums`, kept per example so that comparisons can be paired on examples.
    """
    loss_mask = batch["attention_mask"].to(device)
    keep = loss_mask.any(dim=0).nonzero().squeeze(1)
    length = int(keep[-1]) + 1 if keep.numel() else 1
    input_ids = batch["input_ids"][:, :length].to(device).long()
    labels = batch["labels"].to(device).long()[:, keep]
    weights = loss_mask[:, keep].float()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=input_ids, logits_to_keep=keep).logits
    token_loss = F.cross_entropy(logits.float().transpose(1, 2), labels, reduction="none")  # [B, P]
    return (token_loss * weights).sum(dim=1), weights.sum(dim=1)


def normalise(
    loss_sum: torch.Tensor, count: torch.Tensor, scaling: str, batch_size: int, loss_weight: float
) -> torch.Tensor:
    """The batch loss ModelZoo reports: per loss token (`num_tokens`) or per sample (`batch_size`)."""
    if scaling.lower() == "num_tokens":
        return loss_sum / count
    return loss_sum / batch_size * loss_weight


@torch.no_grad()
def validation_loss(
    model, dataset, val, *, eval_steps: int | None, scaling: str, loss_weight: float, autocast: bool,
    device: torch.device, rank: int = 0, world_size: int = 1,
) -> float:  # fmt: skip
    """Mean loss over `eval_steps` batches of the validation data (all of it when unset).

    `val`: the validation dataloader section (batch size, shuffle, seed, drop_last).
    """
    from gpu_reference.data import collate, global_batches, rank_slice
    from gpu_reference.step import all_reduce_

    num_batches = len(dataset) // val.batch_size
    if eval_steps:
        num_batches = min(num_batches, eval_steps)
    model.eval()
    losses = []
    batches = global_batches(len(dataset), val.batch_size, val.shuffle, val.shuffle_seed, val.drop_last)
    for _ in range(num_batches):
        batch = collate(dataset, rank_slice(next(batches), rank, world_size))
        loss_sum, count = loss_sums(model, batch, autocast, device)
        totals = all_reduce_(torch.stack([loss_sum.float(), count.float()]), world_size)
        losses.append(float(normalise(totals[0], totals[1], scaling, val.batch_size, loss_weight)))
    model.train()
    return sum(losses) / max(1, len(losses))
