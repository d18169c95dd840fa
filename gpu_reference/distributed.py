"""The reference trainer over torchrun ranks: the sum over ranks, and FSDP (the frozen base
sharded across ranks, the LoRA factors replicated).

`all_reduce_` sums a tensor over the ranks in place (a no-op in one process): gradients, loss
token counts and losses of every step.

`--fsdp` (under torchrun) wraps the model with torch's `FullyShardedDataParallel` (FSDP1): one
FSDP unit per HF decoder layer (the class named in the model's `_no_split_modules`, e.g.
`LlamaDecoderLayer`) plus the root unit (embeddings, final norm, LM head), `use_orig_params=True`.
Each rank then holds 1/N of every frozen base weight between forward/backward passes; a layer's
weights are all-gathered only while that layer runs.

The trainable LoRA factors are *not* sharded (`ignored_states`): they stay whole on every rank and
their gradients are summed across ranks exactly as in the plain torchrun path. Why:
- With trainable and frozen parameters in one FSDP1 unit, the unit's flat parameter requires
  grad, so the frozen weights come back from the all-gather as views that require grad: the
  sparse-LoRA kernel refuses them ("needs a frozen weight"), and were it to accept them FSDP
  would allocate and reduce-scatter a gradient for the whole unit, frozen base included (FSDP
  warns about it): as much gradient memory as base shard, and base-sized communication every
  step. Units holding only frozen weights have no gradient at all.
- LoRA factors are a fraction of a percent of the model, so replicating them (and their
  optimizer state) costs little, and the optimizer, clipping, checkpoints and exports stay the
  code the single-process run uses: N FSDP ranks compute what one process computes.

What was found on torch 2.4 (the ModelZoo 2.10 stack): FSDP2 (`fully_shard`, then under
`torch.distributed._composable.fsdp`) creates CUDA streams unconditionally and fails on a CPU
machine; FSDP1 with `device_id=torch.device("cpu")` and gloo works on torch 2.4 and on current
torch, and is the same code path with NCCL on CUDA. So this module uses FSDP1.

Not sharded (held whole on every rank): the masks (held as bits by the trainer: 1/8 byte per
target weight, a buffer of each `SparseLoRALinear`), the sampled-product pattern built from them
in s2s training, and the LoRA factors with their optimizer state.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import nn

from modelzoo_ext.errors import UserError
from modelzoo_ext.sparse_lora import load_lora_state_dict_, lora_state_dict

# FSDP1 inserts this segment into the qualified names of everything inside a wrapped unit.
FSDP_WRAPPED = "_fsdp_wrapped_module."


def all_reduce_(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    """Sum over the torchrun ranks (in place); a no-op in one process."""
    if world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def check_fsdp_request(world_size: int) -> None:
    """Refuse `--fsdp` where it cannot shard anything: a single process."""
    if world_size < 2:
        raise UserError(
            "--fsdp shards the base model across torchrun processes, but this is a single process",
            where="--fsdp",
            fix="run under `torchrun --nproc-per-node N` with N >= 2, or drop --fsdp",
        )


def decoder_layer_classes(model: nn.Module) -> set[type[nn.Module]]:
    """The classes of the HF decoder layers (`model._no_split_modules`) present in `model`."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    found = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not found:
        raise UserError(
            f"--fsdp cannot find the decoder layers of {type(model).__name__} "
            f"(_no_split_modules = {sorted(names)})",
            fix="use a transformers Llama/Mistral model, or run without --fsdp",
        )
    return found


def shard_frozen_base(model: nn.Module, device: torch.device) -> nn.Module:
    """Wrap `model` (sparse LoRA applied, on the CPU) in FSDP1; returns the wrapped model.

    Every frozen parameter is sharded over the default process group (FULL_SHARD, one unit per
    decoder layer); FSDP moves each unit to `device` as it shards it, so no rank ever holds the
    whole base on the device. Trainable parameters (the LoRA factors) are left out of FSDP and
    moved to `device` whole. Buffers (masks, rotary caches) are moved whole.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    layer_classes = decoder_layer_classes(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in trainable:  # FSDP does not move the states it ignores
            p.data = p.data.to(device)
    return FullyShardedDataParallel(
        model,
        auto_wrap_policy=ModuleWrapPolicy(layer_classes),
        sharding_strategy=ShardingStrategy.FULL_SHARD,
        use_orig_params=True,
        ignored_states=trainable,
        device_id=device,
    )


def plain_name(name: str) -> str:
    """A qualified name without FSDP's wrapper segments: the name in the unwrapped HF model."""
    return name.replace(FSDP_WRAPPED, "")


def lora_factors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole LoRA factors under their HF names, wrapped in FSDP or not (`lora_state_dict`)."""
    return {plain_name(k): v for k, v in lora_state_dict(model).items()}


def load_lora_factors_(model: nn.Module, factors: Mapping[str, torch.Tensor]) -> None:
    """Copy HF-named LoRA factors into `model`, wrapped in FSDP or not (`load_lora_state_dict_`)."""
    own_name = {plain_name(k): k for k in lora_state_dict(model)}
    load_lora_state_dict_(model, {own_name.get(k, k): v for k, v in factors.items()})


def local_parameter_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of parameters this rank holds now: {"frozen": ..., "trainable": ...} (shards count as held)."""
    held = {"frozen": 0, "trainable": 0}
    for p in model.parameters():
        held["trainable" if p.requires_grad else "frozen"] += p.numel() * p.element_size()
    return held
