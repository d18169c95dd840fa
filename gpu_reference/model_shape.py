"""What the memory plan counts of a model, without its weights: parameters and bytes per token.

    shape = model_shape(hf_config, target_modules, rank)      # a `ModelShape`, cached
    activation_bytes_per_token(shape, autocast=True, lora_path="s2s", rank=16)

`model_shape` builds the transformers model of `config.json` on the `meta` device (no memory, no
weight read) and counts its parameters: all of them, those outside the decoder layers (FSDP's
root unit), the largest decoder layer, and the LoRA targets found the way `apply_sparse_lora_`
finds them. `activation_bytes_per_token` is what autograd keeps per token and decoder layer
(formula in its docstring, held to the tensors autograd really saves by
tests/test_gpu_reference_memory.py).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a model, counted on its `meta`-device twin."""

    architecture: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    experts: int  # 0 for a dense model
    top_k: int
    base_params: int
    root_params: int  # outside the decoder layers: embeddings, final norm, LM head
    largest_layer_params: int
    target_weights: int  # weights of all targeted linears
    mask_bytes: int  # the targets' masks held as bits
    largest_target: int  # weights of the largest targeted linear
    layer_target_weights: int  # targeted weights of one decoder layer
    lora_params: int
    attention_targets: int  # targeted linears per layer outside the experts
    expert_targets: int  # targeted linears per expert
    target_numel: dict[str, int] = field(repr=False)  # targeted module name -> weights


@functools.lru_cache(maxsize=16)
def _model_shape(hf_config_json: str, target_modules: tuple[str, ...], rank: int) -> ModelShape:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from gpu_reference.distributed import decoder_layer_classes
    from modelzoo_ext.sparse_lora.apply import find_target_linears

    hf_config = json.loads(hf_config_json)
    kwargs = {k: v for k, v in hf_config.items() if k != "model_type"}
    config = AutoConfig.for_model(hf_config["model_type"], **kwargs)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layers = [m for m in model.modules() if type(m) in decoder_layer_classes(model)]
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    targets = find_target_linears(model, list(target_modules))
    first = next(n for n, m in model.named_modules() if m is layers[0])
    in_first = [n for n in targets if n.startswith(first + ".")]
    expert_zero = [n for n in in_first if re.search(r"\.experts\.0\.", n)]
    numel = {name: m.weight.numel() for name, m in targets.items()}
    return ModelShape(
        architecture=type(model).__name__,
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        layers=len(layers),
        heads=config.num_attention_heads,
        vocab=config.vocab_size,
        experts=int(getattr(config, "num_local_experts", 0) or 0),
        top_k=int(getattr(config, "num_experts_per_tok", 0) or 0),
        base_params=sum(p.numel() for p in model.parameters()),
        root_params=sum(p.numel() for p in model.parameters() if id(p) not in in_layers),
        largest_layer_params=max(sum(p.numel() for p in layer.parameters()) for layer in layers),
        target_weights=sum(numel.values()),
        mask_bytes=sum((n + 7) // 8 for n in numel.values()),
        largest_target=max(numel.values()),
        layer_target_weights=sum(numel[n] for n in in_first),
        lora_params=sum(rank * (m.in_features + m.out_features) for m in targets.values()),
        attention_targets=len([n for n in in_first if ".experts." not in n]),
        expert_targets=len(expert_zero),
        target_numel=numel,
    )


def model_shape(hf_config: dict[str, Any], target_modules: list[str], rank: int) -> ModelShape:
    """The `ModelShape` of the model `hf_config` describes, with LoRA of `rank` on `target_modules`."""
    return _model_shape(json.dumps(hf_config, sort_keys=True), tuple(target_modules), rank)


def activation_bytes_per_token(
    shape: ModelShape, *, autocast: bool, lora_path: str, rank: int, bf16_base: bool = False
) -> int:
    """Bytes autograd keeps per token and decoder layer (no checkpointing).

    Counted with `torch.autograd.graph.saved_tensors_hooks` (distinct storages, parameters and
    buffers excluded) on random Llama and Mixtral models of several widths, depths and expert
    counts, SDPA attention, sparse LoRA on all seven projections, transformers 4.57
    (`benchmarks/memory_plan.py` prints the count beside this formula). With h the width, f the
    MLP width, H the heads, E experts and k of them per token:

        dense, float32:     32 h + 16 f                     + 4 H + 8
        dense, bf16 autocast: 24 h + 8 f                    + 4 H + 8
        MoE, float32:       (28 + 12 k) h + 16 k f + 4 E + 34 k + 4 H + 8
        MoE, bf16 autocast: (20 + 10 k) h +  8 k f + 4 E + 34 k + 4 H + 8

    `lora_path` "s2s" keeps only its input per projection; "lora" (s2d and the dense baseline)
    also keeps x A^T (r values per projection run) and, under autocast, one more bf16 copy of
    the attention input (2 h). A bfloat16 base runs every activation in 2 bytes: half the
    float32 figure (an estimate, not counted).
    """
    h, f, heads, k = shape.hidden, shape.intermediate, shape.heads, shape.top_k
    moe = shape.experts > 0
    if moe:
        per_h, per_f = (20 + 10 * k, 8 * k) if autocast else (28 + 12 * k, 16 * k)
        extra = 4 * shape.experts + 34 * k
        projections = shape.attention_targets + k * shape.expert_targets
    else:
        per_h, per_f = (24, 8) if autocast else (32, 16)
        extra = 0
        projections = shape.attention_targets
    total = per_h * h + per_f * f + extra + 4 * heads + 8
    if lora_path == "lora":
        total += (2 if autocast else 4) * rank * projections + (2 * h if autocast else 0)
    if bf16_base and not autocast:
        total //= 2
    return total


def checkpointed_bytes_per_token(shape: ModelShape, *, bf16_base: bool) -> int:
    """Bytes kept per token and layer with activation checkpointing: the layer's input (the
    residual stream: float32, or bfloat16 on a bfloat16 base)."""
    return (2 if bf16_base else 4) * shape.hidden
