"""The memory plan of a reference run: what one device (rank) will hold, before any weight is read.

    plan = plan_memory(cfg, hf_config, world_size=8, device_memory=80 * 10**9, fsdp=True,
                       micro_batch_size=4, activation_checkpointing=True, sequences=stats)
    print(plan.table()); plan.fits; plan.as_record()

The model's parameters are counted on a `meta`-device copy of the transformers model built from
`config.json` (no weight is read, no memory is used), with the run config's LoRA targets found
the way `apply_sparse_lora_` finds them (`gpu_reference.model_shape`). Per device:

- base weights: float32 as ModelZoo keeps them, or bfloat16 (`bf16_base`, changes the numerics
  against the CS-3); under FSDP a 1/N shard plus what FSDP holds unsharded while training (the
  root unit and two decoder layers, the running one and the prefetched one);
- masks, held as bits (1/8 byte per target weight: `SparseLoRALinear(pack_mask=True)`), and,
  for s2s where the sampled product is used, its index (12 bytes per kept weight): whole on
  every rank;
- LoRA factors, their gradients and the optimizer state (AdamW: 16 bytes per factor weight);
- activations: micro-batch x longest sequence tokens times the bytes autograd keeps per token
  (`model_shape.activation_bytes_per_token`, from the architecture); with activation checkpointing only
  each layer's input, plus one layer recomputed in backward;
- s2d / plain LoRA under bf16 autocast on a float32 base: autograd keeps the bfloat16 cast of
  every frozen target weight until backward (as PEFT's LoRA does); one layer's when checkpointed;
- the largest transient (the loss's logits, or one layer's backward temporaries);
- a reserve for the CUDA context, library workspaces and allocator fragmentation.

The sequence length is the longest sample of the prepared data after trimming (positions after a
sample's last loss token are never run), or, without prepared data, the configured maximum
(`max_position_embeddings` of the run config) as the worst case; the plan says which.
`MemoryPlan.levers()` lists what would make a plan fit (micro-batch, checkpointing, FSDP ranks,
bf16 base), each with its total.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any

from gpu_reference.data import SequenceStats
from gpu_reference.model_shape import (
    ModelShape,
    activation_bytes_per_token,
    checkpointed_bytes_per_token,
    model_shape,
)
from modelzoo_ext.errors import UserError
from modelzoo_ext.run_config import SPARSE_TO_SPARSE, RunConfig

GIB = 2**30
# CUDA: the context, cuBLAS/NCCL workspaces (fixed), and the caching allocator's fragmentation
# (a share of what is allocated and freed during a step). CPU: Python, torch and transformers.
RESERVE_FIXED = {"cuda": int(2.0 * GIB), "cpu": int(1.0 * GIB)}
RESERVE_DYNAMIC_SHARE = 0.10
# Bytes per kept weight of the s2s sampled-product index (int32 columns of M and M^T, and the
# permutation between them: `SampledPattern`), and the density limit per device
# (`modelzoo_ext.sparse_lora.kernels.SAMPLED_MAX_DENSITY`, read there so the two cannot disagree).
SAMPLED_INDEX_BYTES = 12
# Optimizer state bytes per trainable float32 weight.
OPTIMIZER_STATE_BYTES = {"AdamW": 8, "SGD": 4}
# The loss at P kept positions: bf16 and float32 logits, log-softmax and their gradients.
LOGITS_BYTES_PER_POSITION_AND_VOCAB = 16
# Gradients of the hidden states alive during backward, per token (float32, a few at a time).
HIDDEN_GRAD_BYTES_PER_TOKEN_AND_WIDTH = 12
# One target layer's backward temporaries per weight of the largest target: s2s unpacks its mask
# (2 bytes), recomputes W_eff = (W + s B A) * M and forms the masked gradient G = g^T x (float32;
# ~12 bytes measured on the CPU, benchmarks/memory_plan.py); s2d unpacks and recomputes W*M only
# on an unpruned base (6 bytes).
WEIGHT_TEMPORARY_BYTES = {"sparse_to_sparse": 13, "sparse_to_dense": 6}


@dataclass(frozen=True)
class PlanOptions:
    """How the run is launched: the choices that change what a device holds."""

    world_size: int = 1
    fsdp: bool = False
    micro_batch_size: int | None = None  # None: the rank's whole slice of the batch
    activation_checkpointing: bool = False
    bf16_base: bool = False
    device_type: str = "cuda"
    sampled_product: str = "auto"  # the s2s gradient path: "auto", "never", "always"

    def describe(self) -> str:
        parts = [f"{self.world_size} process{'es' if self.world_size > 1 else ''}"]
        parts.append("FSDP" if self.fsdp else "base whole on every rank")
        parts.append(f"micro-batch {self.micro_batch_size}")
        parts.append("activation checkpointing" if self.activation_checkpointing else "no checkpointing")
        parts.append("bfloat16 base" if self.bf16_base else "float32 base")
        return ", ".join(parts)


@dataclass(frozen=True)
class MemoryTerm:
    """One line of a plan: bytes per device, and how they were counted."""

    name: str
    bytes: int
    note: str


@dataclass(frozen=True)
class MemoryPlan:
    """What one device holds at the peak of a training step, term by term."""

    model: str
    options: PlanOptions
    terms: tuple[MemoryTerm, ...]
    device_memory: int | None
    device_memory_source: str
    sequences: SequenceStats
    levers_: tuple[tuple[str, int], ...] = ()

    @property
    def total(self) -> int:
        return sum(t.bytes for t in self.terms)

    @property
    def fits(self) -> bool | None:
        """True/False against the device's memory; None when the device's memory is unknown."""
        return None if self.device_memory is None else self.total <= self.device_memory

    def term(self, name: str) -> MemoryTerm:
        return next(t for t in self.terms if t.name == name)

    def levers(self) -> list[tuple[str, int]]:
        """(what to change, the total bytes it gives), smallest first; computed when the plan does
        not fit."""
        return list(self.levers_)

    def summary(self) -> str:
        """One line: the total against the device, and the largest terms."""
        big = sorted(self.terms, key=lambda t: -t.bytes)[:4]
        device = "unknown device memory" if self.device_memory is None else f"{_gib(self.device_memory)} GiB"
        return (
            f"plan {_gib(self.total)} GiB vs {device} ("
            + ", ".join(f"{t.name} {_gib(t.bytes)}" for t in big)
            + ")"
        )

    def table(self) -> str:
        """The plan as a text table (GiB), with the verdict and the levers."""
        lines = [
            f"memory plan per device: {self.model}; {self.options.describe()}",
            f"sequences: {self.sequences.source}",
            f"{'term':<44} {'GiB':>8}  note",
        ]
        lines += [f"{t.name:<44} {_gib(t.bytes):>8}  {t.note}" for t in self.terms]
        verdict = {None: "device memory unknown (pass --device-memory)", True: "fits", False: "DOES NOT FIT"}[
            self.fits
        ]
        device = (
            ""
            if self.device_memory is None
            else f" of {_gib(self.device_memory)} ({self.device_memory_source})"
        )
        lines.append(f"{'total':<44} {_gib(self.total):>8}{device}: {verdict}")
        for what, total in self.levers_:
            verdict = "fits" if total <= (self.device_memory or 0) else "does not fit"
            lines.append(f"  lever: {what:<48} {_gib(total):>8} GiB: {verdict}")
        return "\n".join(lines)

    def as_record(self) -> dict[str, Any]:
        """For run.json: every term in bytes, the options, the sequences and the verdict."""
        return {
            "model": self.model,
            "options": self.options.__dict__,
            "terms": {t.name: {"bytes": t.bytes, "note": t.note} for t in self.terms},
            "total_bytes": self.total,
            "device_memory_bytes": self.device_memory,
            "device_memory_source": self.device_memory_source,
            "fits": self.fits,
            "sequences": self.sequences.__dict__,
            "levers": [{"change": what, "total_bytes": total} for what, total in self.levers_],
        }


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def parse_memory_size(text: str) -> int:
    """`80GB` (10^9), `80GiB` (2^30), `512MB`, `512MiB` or plain bytes -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B?|B)?\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise UserError(
            f"cannot read the memory size {text!r}",
            where="--device-memory",
            fix="write it like 80GB (10^9 bytes), 80GiB (2^30 bytes) or a number of bytes",
        )
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    if unit == "B":
        return int(number)
    power = "KMGT".index(unit[0]) + 1
    return int(number * ((1024**power) if "I" in unit else (1000**power)))


def _sampled_density_limit(device_type: str) -> float | None:
    from modelzoo_ext.sparse_lora.kernels import SAMPLED_MAX_DENSITY

    return SAMPLED_MAX_DENSITY.get(device_type)


def _optimizer_name(cfg: RunConfig) -> str:
    return next(iter(cfg.init.optimizer))


def _static_terms(
    cfg: RunConfig, shape: ModelShape, options: PlanOptions, densities: dict[str, float] | None
) -> list[MemoryTerm]:
    """Weights, masks, sampled-product index, LoRA state: held for the whole run."""
    sl = cfg.sparse_lora
    weight_bytes = 2 if options.bf16_base else 4
    dtype = "bfloat16 (changes numerics vs CS-3)" if options.bf16_base else "float32"
    terms = []
    if options.fsdp:
        shard = math.ceil(shape.base_params / options.world_size) * weight_bytes
        unsharded = (shape.root_params + 2 * shape.largest_layer_params) * weight_bytes
        terms.append(MemoryTerm("base weights", shard, f"{dtype}, {shape.base_params:,} params / {options.world_size} ranks (FSDP shard)"))  # fmt: skip
        terms.append(MemoryTerm("FSDP unsharded units", unsharded, "root unit (embeddings, LM head) + 2 decoder layers, gathered while they run"))  # fmt: skip
    else:
        terms.append(MemoryTerm("base weights", shape.base_params * weight_bytes, f"{dtype}, {shape.base_params:,} params, whole on this rank"))  # fmt: skip
    masked = not sl.dense_baseline
    terms.append(MemoryTerm("masks", shape.mask_bytes if masked else 0,
                            "bits, 1/8 byte per target weight, whole on every rank" if masked else "dense baseline: none"))  # fmt: skip
    terms.append(_sampled_index_term(cfg, shape, options, densities))
    state = OPTIMIZER_STATE_BYTES.get(_optimizer_name(cfg), 8)
    lora_bytes = shape.lora_params * (4 + 4 + state)
    terms.append(MemoryTerm("LoRA factors + grads + optimizer", lora_bytes,
                            f"{shape.lora_params:,} float32 params x {8 + state} bytes ({_optimizer_name(cfg)}), whole on every rank"))  # fmt: skip
    return terms


def _sampled_index_term(
    cfg: RunConfig, shape: ModelShape, options: PlanOptions, densities: dict[str, float] | float | None
) -> MemoryTerm:
    name = "s2s sampled-product index"
    limit = _sampled_density_limit(options.device_type)
    if cfg.sparse_lora.mode != SPARSE_TO_SPARSE or cfg.sparse_lora.dense_baseline:
        return MemoryTerm(name, 0, "not used (s2d or dense baseline)")
    if options.sampled_product == "never" or (limit is None and options.sampled_product == "auto"):
        return MemoryTerm(name, 0, "not used (--sampled-product never, or a device without it)")
    if options.sampled_product == "always":
        limit = 1.0
    if densities is None:  # no mask file to read: every layer just at the limit, the worst case
        kept = int(shape.target_weights * limit)
        return MemoryTerm(name, kept * SAMPLED_INDEX_BYTES, f"worst case (mask densities unknown): all at the {options.device_type} limit {limit}")  # fmt: skip
    if isinstance(densities, float):  # planned: every mask at one density
        kept = int(shape.target_weights * densities) if densities <= limit else 0
        note = f"every mask at the planned density {densities:g} ({options.device_type} limit {limit})"
        return MemoryTerm(name, kept * SAMPLED_INDEX_BYTES, note)
    used = {n: d for n, d in densities.items() if d <= limit}
    kept = int(sum(d * shape.target_numel.get(n.removesuffix(".weight"), 0) for n, d in used.items()))
    note = f"{len(used)} of {len(densities)} masks at density <= {limit} ({options.device_type}): 12 bytes per kept weight"
    return MemoryTerm(name, kept * SAMPLED_INDEX_BYTES, note)


def _dynamic_terms(
    cfg: RunConfig, shape: ModelShape, options: PlanOptions, seq: SequenceStats, batch_per_rank: int
) -> list[MemoryTerm]:
    """Activations, weight casts kept for backward, the largest transient: one micro-batch's."""
    sl = cfg.sparse_lora
    autocast = bool(cfg.init.precision and cfg.init.precision.enabled)
    micro = options.micro_batch_size or batch_per_rank
    tokens = micro * seq.longest
    lora_path = "s2s" if sl.mode == SPARSE_TO_SPARSE and not sl.dense_baseline else "lora"
    full = activation_bytes_per_token(
        shape, autocast=autocast, lora_path=lora_path, rank=sl.r, bf16_base=options.bf16_base
    )
    outside = 16 * shape.hidden  # embeddings output, final norm
    if options.activation_checkpointing:
        kept = checkpointed_bytes_per_token(shape, bf16_base=options.bf16_base)
        activations = tokens * (shape.layers * kept + outside)
        note = (
            f"{micro} x {seq.longest} tokens x ({shape.layers} layers x {kept} B checkpointed + {outside} B)"
        )
    else:
        activations = tokens * (shape.layers * full + outside)
        note = f"{micro} x {seq.longest} tokens x ({shape.layers} layers x {full:,} B + {outside} B)"
    terms = [MemoryTerm("activations", activations, note)]
    casts = lora_path == "lora" and autocast and not options.bf16_base
    layers_cast = 1 if options.activation_checkpointing else shape.layers
    terms.append(MemoryTerm("bf16 casts of frozen weights (s2d)", 2 * shape.layer_target_weights * layers_cast if casts else 0,
                            f"kept by autograd for backward, {layers_cast} layer(s)" if casts else "none (s2s, float32 compute or a bfloat16 base)"))  # fmt: skip
    positions = min(seq.longest, micro * seq.most_loss_tokens)
    logits = micro * positions * shape.vocab * LOGITS_BYTES_PER_POSITION_AND_VOCAB
    recompute = tokens * full if options.activation_checkpointing else 0
    weight_tmp = (
        shape.largest_target
        * WEIGHT_TEMPORARY_BYTES["sparse_to_sparse" if lora_path == "s2s" else "sparse_to_dense"]
    )
    backward = recompute + weight_tmp + tokens * shape.hidden * HIDDEN_GRAD_BYTES_PER_TOKEN_AND_WIDTH
    transient = max(logits, backward)
    which = (
        f"logits at {micro} x {positions} positions"
        if logits >= backward
        else (
            "one layer's backward"
            + (" with its recompute" if recompute else "")
            + " and hidden-state gradients"
        )
    )
    terms.append(MemoryTerm("largest transient", transient, which))
    return terms


def _reserve(options: PlanOptions, dynamic: int) -> MemoryTerm:
    fixed = RESERVE_FIXED.get(options.device_type, RESERVE_FIXED["cuda"])
    what = "CUDA context and workspaces" if options.device_type == "cuda" else "Python, torch, transformers"
    return MemoryTerm("reserve", fixed + int(RESERVE_DYNAMIC_SHARE * dynamic),
                      f"{what} {_gib(fixed)} GiB + {int(100 * RESERVE_DYNAMIC_SHARE)}% of the per-step terms (fragmentation)")  # fmt: skip


def _terms(cfg, shape, options, seq, densities, batch_per_rank) -> tuple[MemoryTerm, ...]:
    static = _static_terms(cfg, shape, options, densities)
    dynamic = _dynamic_terms(cfg, shape, options, seq, batch_per_rank)
    return (*static, *dynamic, _reserve(options, sum(t.bytes for t in dynamic)))


def configured_sequences(cfg: RunConfig) -> SequenceStats:
    """The worst case without prepared data: every sample as long as the configured maximum."""
    longest = int(cfg.init.model.architecture.get("max_position_embeddings") or 2048)
    return SequenceStats(longest, longest, f"worst case: no prepared data, every sample {longest} tokens "
                         "(max_position_embeddings of the run config), every position a loss token")  # fmt: skip


def plan_memory(
    params: RunConfig,
    hf_config: dict[str, Any],
    *,
    world_size: int = 1,
    device_memory: int | None = None,
    device_memory_source: str = "given",
    fsdp: bool = False,
    micro_batch_size: int | None = None,
    activation_checkpointing: bool = False,
    bf16_base: bool = False,
    sequences: SequenceStats | None = None,
    mask_densities: dict[str, float] | float | None = None,
    device_type: str = "cuda",
    sampled_product: str = "auto",
) -> MemoryPlan:
    """The memory plan of one device of a run of `params` on the model `hf_config` describes.

    micro_batch_size: samples per forward/backward on a rank (None: its whole slice of the batch).
    sequences: from the prepared data (`gpu_reference.data.sequence_stats`); default the
    configured worst case. mask_densities: {mask name: kept fraction} from the mask file's
    header, or one kept fraction for every mask (a planned per-layer sparsity before its mask
    file exists); default: unknown, the worst case for the s2s sampled-product index.
    """
    options = PlanOptions(
        world_size, fsdp, micro_batch_size, activation_checkpointing, bf16_base, device_type, sampled_product
    )
    sl = params.sparse_lora
    shape = model_shape(hf_config, sl.target_modules, sl.r)
    seq = sequences or configured_sequences(params)
    batch_per_rank = max(1, params.fit.train_dataloader.batch_size // world_size)
    options = replace(options, micro_batch_size=min(micro_batch_size or batch_per_rank, batch_per_rank))
    terms = _terms(params, shape, options, seq, mask_densities, batch_per_rank)
    plan = MemoryPlan(shape.architecture, options, terms, device_memory, device_memory_source, seq)
    if plan.fits is False:
        plan = replace(plan, levers_=tuple(_levers(params, shape, options, seq, mask_densities, plan.total)))
    return plan


def _alternatives(options: PlanOptions) -> list[tuple[str, PlanOptions]]:
    """Single changes worth trying (smaller micro-batch, checkpointing, FSDP at this or 8 ranks,
    bf16 base), and the first two together."""
    out = []
    if (options.micro_batch_size or 1) > 1:
        out.append(("--micro-batch-size 1", replace(options, micro_batch_size=1)))
    if not options.activation_checkpointing:
        out.append(("--activation-checkpointing", replace(options, activation_checkpointing=True)))
    if len(out) == 2:
        out.append(("--micro-batch-size 1 --activation-checkpointing",
                    replace(options, micro_batch_size=1, activation_checkpointing=True)))  # fmt: skip
    if not options.fsdp and options.world_size > 1:
        out.append((f"--fsdp (over the {options.world_size} ranks)", replace(options, fsdp=True)))
    if options.world_size < 8:
        out.append(("torchrun --nproc-per-node 8 ... --fsdp", replace(options, world_size=8, fsdp=True)))
    if not options.bf16_base:
        out.append(("--bf16-base (changes numerics vs CS-3)", replace(options, bf16_base=True)))
    if options.sampled_product != "never":
        out.append(
            ("--sampled-product never (slower s2s backward)", replace(options, sampled_product="never"))
        )
    return out


def _levers(cfg, shape, options, seq, densities, current: int) -> list[tuple[str, int]]:
    """(change, total bytes) of each alternative that lowers the total, smallest first."""
    found = []
    for what, alternative in _alternatives(options):
        per_rank = max(1, cfg.fit.train_dataloader.batch_size // alternative.world_size)
        alternative = replace(
            alternative, micro_batch_size=min(alternative.micro_batch_size or per_rank, per_rank)
        )
        total = sum(t.bytes for t in _terms(cfg, shape, alternative, seq, densities, per_rank))
        if total < current:
            found.append((what, total))
    return sorted(found, key=lambda item: item[1])


def largest_micro_batch(params: RunConfig, hf_config: dict[str, Any], **plan_args) -> int | None:
    """The largest micro-batch (<= the rank's slice) whose plan fits the device; None if even 1 does not."""
    world = plan_args.get("world_size", 1)
    per_rank = max(1, params.fit.train_dataloader.batch_size // world)
    for micro in range(per_rank, 0, -1):
        if plan_memory(params, hf_config, micro_batch_size=micro, **plan_args).fits:
            return micro
    return None
