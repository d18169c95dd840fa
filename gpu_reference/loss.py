"""ModelZoo's GPT fine-tuning loss on a transformers causal LM, and the validation loss.

The data's `attention_mask` is ModelZoo's loss mask (0 on the prompt, 1 on the completion), not
a padding mask: the model attends causally only, and the logits at position i are scored against
labels[i] (the data is already shifted). `loss_scaling` is ModelZoo's: `num_tokens` divides the
summed token loss by the number of loss tokens of the global batch, `batch_size` by the batch
size (times `loss_weight`).

Mixture of experts (Mixtral): ModelZoo adds its router load-balancing loss in training,
`loss = LM + load_balancing_loss_coef * AUX` (`Gpt2Model.forward`; evaluation reports LM alone),
with its own AUX (`LoadBalancingLoss`), which is not transformers' `aux_loss`: per sample, masked
by the LOSS mask m (not padding), averaged over layers. With p_l = softmax(router logits of layer
l) in fp32 over all E experts and d_l = the 0/1 top-k choice of each token,

    F[b, e] = mean_l  sum_t d_l[b,t,e] m[b,t] / sum_t m[b,t]
    P[b, e] = mean_l  sum_t p_l[b,t,e] m[b,t] / sum_t m[b,t]
    AUX     = E^2 * mean_{b,e}(F * P) = (E / B) * sum_b sum_e F[b,e] P[b,e]

AUX is a sum over samples over B, so each rank and micro-batch adds its local
`E * sum_b sum_e F P` (`aux_loss_sum`) and the step divides by the global batch size: exact, as
`normalise(..., "batch_size")` is. Dropping positions after the batch's last loss token leaves it
unchanged (m = 0 there; the model is causal). A sample without loss tokens makes ModelZoo's AUX
NaN (0/0): refused here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from modelzoo_ext.errors import UserError


@dataclass(frozen=True)
class RouterLoss:
    """ModelZoo's load-balancing loss of a MoE run: experts, top-k, coefficient (`moe:` of the run config)."""

    num_experts: int
    top_k: int
    coef: float

    @classmethod
    def from_model_section(cls, model: dict) -> RouterLoss | None:
        """From the run config's `model:` keys; None for dense models or a zero coefficient
        (ModelZoo then adds nothing)."""
        moe = model.get("moe") or {}
        coef = float(moe.get("load_balancing_loss_coef", 0.0))
        if int(moe.get("num_experts") or 0) <= 1 or coef <= 0:
            return None
        return cls(int(moe["num_experts"]), int(moe.get("top_k", 1)), coef)


def aux_loss_sum(router_logits, loss_mask: torch.Tensor, num_experts: int, top_k: int) -> torch.Tensor:
    """E * sum_b sum_e F[b,e] P[b,e] (see the module docstring): ModelZoo's AUX times the batch size.

    router_logits: per layer, [B*S, E] or [B, S, E] (transformers' `output_router_logits`);
    loss_mask: [B, S] (S = the positions the model saw).
    """
    batch, length = loss_mask.shape
    m = loss_mask.to(torch.float32)[:, :, None]
    tokens = m.sum(dim=1)  # [B, 1]
    if bool((tokens == 0).any()):
        raise UserError(
            "a sample without loss tokens: ModelZoo's load-balancing loss is NaN for it (0/0)",
            where="the training data",
            fix="drop samples whose loss mask is all zero (empty completions) from the HDF5 data",
        )
    fraction = torch.zeros(batch, num_experts, dtype=torch.float32, device=loss_mask.device)
    probability = torch.zeros_like(fraction)
    for logits in router_logits:
        p = torch.softmax(logits.reshape(batch, length, num_experts).float(), dim=-1)
        chosen = F.one_hot(p.topk(top_k, dim=-1).indices, num_experts).to(p.dtype).sum(dim=-2)
        fraction = fraction + (chosen * m).sum(dim=1) / tokens
        probability = probability + (p * m).sum(dim=1) / tokens
    layers = len(router_logits)
    return num_experts * ((fraction / layers) * (probability / layers)).sum()


def loss_sums(
    model,
    batch: dict[str, torch.Tensor],
    autocast: bool,
    device: torch.device,
    router: RouterLoss | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed token loss over the loss mask, number of loss tokens) of one batch; with `router`,
    also `aux_loss_sum` of the batch (a third element).

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
    seen_mask = loss_mask[:, :length]
    loss_mask = loss_mask[:, keep]
    extra = {"output_router_logits": True} if router else {}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=input_ids, logits_to_keep=keep, **extra)
        logits = out.logits  # [B, P, vocab]
        token_loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none"
        )
        weights = loss_mask.to(dtype=logits.dtype).reshape(-1)
        sums = (token_loss * weights).sum(), weights.sum()
    if router is None:
        return sums
    return (*sums, aux_loss_sum(out.router_logits, seen_mask, router.num_experts, router.top_k))


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
    device: torch.device, rank: int = 0, world_size: int = 1,
) -> Validation:  # fmt: skip
    """The loss over `eval_steps` batches of the validation data (all whole batches when unset).

    `val`: the validation dataloader section (batch size, shuffle, seed, drop_last).
    """
    from gpu_reference.data import collate, global_batches, rank_slice
    from gpu_reference.step import all_reduce_

    num_batches = len(dataset) // val.batch_size
    if eval_steps:
        num_batches = min(num_batches, eval_steps)
    model.eval()
    losses, nll, tokens = [], 0.0, 0.0
    batches = global_batches(len(dataset), val.batch_size, val.shuffle, val.shuffle_seed, val.drop_last)
    for _ in range(num_batches):
        batch = collate(dataset, rank_slice(next(batches), rank, world_size))
        loss_sum, count = loss_sums(model, batch, autocast, device)[:2]  # evaluation: LM only, as ModelZoo
        totals = all_reduce_(torch.stack([loss_sum.float(), count.float()]), world_size)
        losses.append(float(normalise(totals[0], totals[1], scaling, val.batch_size, loss_weight)))
        nll, tokens = nll + float(totals[0]), tokens + float(totals[1])
    model.train()
    return Validation(
        loss=sum(losses) / max(1, len(losses)),
        nll_per_token=nll / tokens if tokens else float("nan"),
        loss_tokens=int(tokens),
        samples=num_batches * val.batch_size,
    )
