"""A model's parameters counted from its config.json, without any weight: a `meta`-device copy.

    counts = model_counts(hf_config, target_modules=["q_proj", ...], rank=16)
    counts.base_params; counts.targets["model.layers.0.self_attn.q_proj.weight"] -> (4096, 4096)

transformers builds the model of `config.json` on the `meta` device (shapes, no memory), and the
run's LoRA targets are found by the rule the trainers apply (`find_target_linears`), so the mask
check and the disk budget count exactly the tensors a run holds: every parameter (ties counted
once), every targeted weight with its shape, and the LoRA factors `r * (in + out)` per target.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelCounts:
    """What the preflight needs of a model: parameter and tensor counts, targets with shapes."""

    architecture: str
    base_params: int  # every parameter of the HF model (tied weights once)
    base_tensors: int  # parameter tensors of the HF model
    targets: dict[str, tuple[int, ...]]  # HF weight name of each targeted linear -> [out, in]
    lora_params: int  # r * (in + out) over the targets
    hidden_size: int

    @property
    def target_weights(self) -> int:
        """Weights of all targeted linears (what the masks cover, one bit or byte each)."""
        total = 0
        for shape in self.targets.values():
            n = 1
            for dim in shape:
                n *= dim
            total += n
        return total


@functools.lru_cache(maxsize=8)
def _meta_model(hf_config_json: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = json.loads(hf_config_json)
    kwargs = {k: v for k, v in hf_config.items() if k != "model_type"}
    config = AutoConfig.for_model(hf_config["model_type"], **kwargs)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def meta_model(hf_config: dict[str, Any]):
    """The transformers model of `hf_config` on the `meta` device (shapes only; cached). Do not
    change it: callers share it."""
    return _meta_model(json.dumps(hf_config, sort_keys=True))


@functools.lru_cache(maxsize=16)
def _counts(hf_config_json: str, target_modules: tuple[str, ...], rank: int) -> ModelCounts:
    from modelzoo_ext.sparse_lora.apply import find_target_linears

    model = _meta_model(hf_config_json)
    config = model.config
    params = list(model.parameters())  # tied weights appear once
    targets = find_target_linears(model, list(target_modules))
    return ModelCounts(
        architecture=type(model).__name__,
        base_params=sum(p.numel() for p in params),
        base_tensors=len(params),
        targets={f"{name}.weight": tuple(m.weight.shape) for name, m in targets.items()},
        lora_params=sum(rank * (m.in_features + m.out_features) for m in targets.values()),
        hidden_size=int(config.hidden_size),
    )


def model_counts(hf_config: dict[str, Any], target_modules: list[str], rank: int) -> ModelCounts:
    """The `ModelCounts` of the model `hf_config` describes, with LoRA of `rank` on `target_modules`
    (UserError when a target names no linear of the model, as the trainers refuse it)."""
    return _counts(json.dumps(hf_config, sort_keys=True), tuple(target_modules), rank)
