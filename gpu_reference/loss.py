"""ModelZoo's GPT fine-tuning loss on a transformers causal LM: loss math only.

    sums = loss_sums(model, batch, autocast, device, router)      # LossSums of one (micro-)batch
    loss = normalise(sums.token_loss, global_count, "num_tokens", batch_size, loss_weight)

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

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from modelzoo_ext.errors import UserError
from modelzoo_ext.run_config.model_section import NormalisedModelSection, as_normalised


@dataclass(frozen=True)
class RouterLoss:
    """ModelZoo's load-balancing loss of a MoE run: experts, top-k, coefficient (`moe:` of the run config)."""

    num_experts: int
    top_k: int
    coef: float

    @classmethod
    def from_model_section(cls, model: NormalisedModelSection | Mapping[str, Any]) -> RouterLoss | None:
        """From the run config's `model:` section as ModelZoo reads it (`RunConfig.model_section`; a
        raw mapping is normalised first): `moe` or `moe_params`, ModelZoo's `MoEConfig` defaults for
        keys left out. None for dense models or a zero coefficient (ModelZoo then adds nothing)."""
        model = as_normalised(model)
        if model.num_experts <= 1 or model.load_balancing_loss_coef <= 0:
            return None
        return cls(model.num_experts, model.top_k, model.load_balancing_loss_coef)


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


def forward_at(model, input_ids: torch.Tensor, keep: torch.Tensor, **extra):
    """`model(input_ids, **extra)` with logits only at the positions `keep` [P]: `.logits` is [B, P, vocab].

    transformers >= 4.50 takes the positions as `logits_to_keep`. 4.45 (ModelZoo 2.6-2.8) names
    the argument `num_logits_to_keep` and keeps only the last N positions: there the LM head runs
    from the first kept position on and the kept ones are picked out of that suffix (the same
    values: the head is applied per position). Which one applies is read from the forward
    signature of the transformers model inside `model` (a PEFT or FSDP wrapper takes **kwargs).
    """
    takes = {"logits_to_keep", "num_logits_to_keep"}
    names = next(
        (n for m in model.modules() if (n := takes & set(inspect.signature(type(m).forward).parameters))),
        {"logits_to_keep"},
    )
    if "logits_to_keep" in names:
        return model(input_ids=input_ids, logits_to_keep=keep, **extra)
    first = int(keep[0]) if keep.numel() else 0
    out = model(input_ids=input_ids, num_logits_to_keep=input_ids.shape[1] - first, **extra)
    out.logits = out.logits[:, keep - first]
    return out


@dataclass(frozen=True)
class LossSums:
    """One batch's loss before ModelZoo's normalisation (each a 0-d tensor).

    `token_loss`: the summed token loss over the loss mask (float32; attached to the graph in
    training). `loss_tokens`: the number of loss tokens, counted as ModelZoo counts them (the loss
    mask in the logits' dtype, summed; `loss_token_count`). `router`: `aux_loss_sum` of the batch
    for a MoE run given a `RouterLoss`, else None.
    """

    token_loss: torch.Tensor
    loss_tokens: torch.Tensor
    router: torch.Tensor | None = None

    @property
    def count_dtype(self) -> torch.dtype:
        """The dtype ModelZoo counts loss tokens in here (the logits'): for `loss_token_count`."""
        return self.loss_tokens.dtype


def _autocast(device: torch.device, enabled: bool):
    """bf16 autocast on `device` (ModelZoo's `cbfloat16` off the wafer), or a no-op."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def loss_token_count(
    loss_mask: torch.Tensor, dtype: torch.dtype, autocast: bool, device: torch.device
) -> torch.Tensor:
    """ModelZoo's loss-token count, `sum(loss_mask.to(logits dtype))`, 0-d, on `device`.

    Computed under the same autocast as the loss (on CUDA autocast sums in float32, on the CPU
    in the logits' dtype), so the count of a whole batch taken here equals the one `loss_sums`
    takes of that batch: a micro-batched step normalises by exactly the whole batch's count.
    loss_mask: int [B, msl].
    """
    with _autocast(device, autocast):
        return loss_mask.to(device).to(dtype).sum()


def _causal_lm(model, input_ids: torch.Tensor, keep: torch.Tensor, **extra):
    """The model's forward with the LM head at the `keep` positions only (no KV cache in training)."""
    return forward_at(model, input_ids, keep, use_cache=False, **extra)


def _trimmed(batch: dict[str, torch.Tensor], device: torch.device):
    """(input_ids [B, L], labels [B, P], loss mask [B, L], positions kept [P]) of a batch.

    Causality makes two savings exact: positions after the batch's last loss-bearing one are
    dropped (L: fine-tuning samples are mostly padding), and the LM head runs only at the P
    loss-bearing positions (completions are a few tokens after a long prompt).
    """
    loss_mask = batch["attention_mask"].to(device)
    keep = loss_mask.any(dim=0).nonzero().squeeze(1)  # [P] positions with a loss in some row
    length = int(keep[-1]) + 1 if keep.numel() else 1
    input_ids = batch["input_ids"][:, :length].to(device).long()
    labels = batch["labels"].to(device).long()[:, keep]
    return input_ids, labels, loss_mask[:, :length], keep


def loss_sums(
    model,
    batch: dict[str, torch.Tensor],
    autocast: bool,
    device: torch.device,
    router: RouterLoss | None = None,
) -> LossSums:
    """The summed token loss and loss-token count of one batch (with `router`, its router loss sum).

    batch: int32 `input_ids`, `attention_mask` (the loss mask), `labels`, each [B, msl]; see
    `_trimmed` for the positions the model runs on.
    """
    input_ids, labels, seen_mask, keep = _trimmed(batch, device)
    loss_mask = seen_mask[:, keep]
    extra = {"output_router_logits": True} if router else {}
    with _autocast(device, autocast):
        out = _causal_lm(model, input_ids, keep, **extra)
        logits = out.logits  # [B, P, vocab]
        token_loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none"
        )
        weights = loss_mask.to(dtype=logits.dtype).reshape(-1)
        token_loss_sum, count = (token_loss * weights).sum(), weights.sum()
    if router is None:
        return LossSums(token_loss_sum, count)
    aux = aux_loss_sum(out.router_logits, seen_mask, router.num_experts, router.top_k)
    return LossSums(token_loss_sum, count, aux)


@torch.no_grad()
def per_example_loss_sums(
    model, batch: dict[str, torch.Tensor], autocast: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed token loss of each row [B], loss tokens of each row [B]) in float32, for evaluation.

    The same loss as `loss_sums`, kept per example so that comparisons can be paired on examples.
    """
    input_ids, labels, seen_mask, keep = _trimmed(batch, device)
    weights = seen_mask[:, keep].float()
    with _autocast(device, autocast):
        logits = _causal_lm(model, input_ids, keep).logits
    token_loss = F.cross_entropy(logits.float().transpose(1, 2), labels, reduction="none")  # [B, P]
    return (token_loss * weights).sum(dim=1), weights.sum(dim=1)


def normalise(
    loss_sum: torch.Tensor, count: torch.Tensor, scaling: str, batch_size: int, loss_weight: float
) -> torch.Tensor:
    """The batch loss ModelZoo reports: per loss token (`num_tokens`) or per sample (`batch_size`)."""
    if scaling.lower() == "num_tokens":
        return loss_sum / count
    return loss_sum / batch_size * loss_weight
