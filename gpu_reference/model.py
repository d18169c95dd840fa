"""The base model of a reference run: checked against the run config before any weight is read.

Order matters for a 7B run: the HF directory's `config.json` is compared with the run config's
`model:` section, as ModelZoo reads it (`RunConfig.model_section`), first (`check_hf_config`, with
`modelzoo_ext.run_config.check_architecture`: a model that differs is refused before any weight file
is even opened; `train --plan` stops there), then the directory is opened through the one
guarded reader (`HFCheckpoint`: no weights, truncated or corrupt shards are clear errors; only
the shards' headers are read), and the mask file's provenance is checked against it, all before
the 16 GB of weights are loaded; only then does transformers read them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from modelzoo_ext.errors import UserError
from modelzoo_ext.families import ModelFamily, resolve_family
from modelzoo_ext.hf_checkpoint import CONFIG_FILE, HFCheckpoint, read_json
from modelzoo_ext.masks.format import MaskFile
from modelzoo_ext.masks.provenance import check_hf_checkpoint
from modelzoo_ext.run_config import ArchitectureCheck, RunConfig, check_architecture


@dataclass
class BaseModel:
    """The checked HF directory of a run, and what the checks found."""

    checkpoint: HFCheckpoint
    family: str
    architecture: ArchitectureCheck
    hf_config: dict[str, Any]


@dataclass
class CheckedConfig:
    """An HF directory's `config.json`, checked against the run config (no weight file opened)."""

    hf_config: dict[str, Any]
    family: ModelFamily
    architecture: ArchitectureCheck


def check_hf_config(hf_model: str | Path, cfg: RunConfig) -> CheckedConfig:
    """Read `hf_model`'s config.json and check it against the run config (UserError on any
    disagreement); opens no weight file, so a directory with config.json alone is enough."""
    if not Path(hf_model).is_dir():
        raise UserError(
            "HF model directory not found",
            where=str(hf_model),
            fix="pass --hf-model DIR: the Hugging Face directory (config.json + *.safetensors) the run config describes",
        )
    config_path = Path(hf_model) / CONFIG_FILE
    if not config_path.is_file():
        raise UserError(
            f"{CONFIG_FILE} is missing", where=str(hf_model), fix="pass a Hugging Face model directory"
        )
    hf_config = read_json(config_path, CONFIG_FILE)
    family = resolve_family(None, model_name=cfg.init.model.name, hf_config=hf_config, where=cfg.path)
    _require_per_expert_linears(family)
    architecture = check_architecture(cfg.model_section, hf_config, family.name)
    if not architecture.ok:
        raise UserError(
            "the run config and the HF model disagree: " + "; ".join(architecture.mismatches),
            where=f"{cfg.path}: trainer.init.model vs {config_path}",
            fix="pass the --hf-model the run config describes (or fix the run config's model section)",
        )
    return CheckedConfig(hf_config, family, architecture)


def open_base(hf_model: str | Path, cfg: RunConfig) -> BaseModel:
    """Open and check `hf_model` against the run config (UserError on any disagreement)."""
    checked = check_hf_config(hf_model, cfg)
    checkpoint = HFCheckpoint(hf_model)  # every shard's header: no weights / a bad shard is one error
    return BaseModel(checkpoint, checked.family.name, checked.architecture, checked.hf_config)


def _require_per_expert_linears(family: ModelFamily) -> None:
    """MoE families train on transformers 4.x, whose experts are `nn.Linear`s (Mixtral's w1/w2/w3)
    that sparse LoRA wraps one by one; transformers 5 fuses them into 3-D parameters it cannot wrap."""
    import transformers

    if family.has_experts and int(transformers.__version__.split(".")[0]) >= 5:
        raise UserError(
            f"the reference trainer runs {family.class_stem} on transformers 4.x (per-expert nn.Linear experts); "
            f"transformers {transformers.__version__} fuses the experts into 3-D parameters",
            fix="use transformers 4.57 (the ModelZoo 2.10 stack: pip install 'transformers==4.57.1')",
        )


def load_masks(
    path: str | Path | None, base: BaseModel, *, skip_provenance_check: bool
) -> tuple[dict[str, torch.Tensor], dict[str, Any], str | None]:
    """(masks {HF weight name: bool [out, in]}, the file's metadata, how its provenance was accepted)."""
    if path is None:
        return {}, {}, None
    mask_file = MaskFile(path).require_naming("hf", "the reference trainer")
    verdict = check_hf_checkpoint(mask_file, base.checkpoint, skip=skip_provenance_check)
    return dict(mask_file.items()), mask_file.metadata, verdict


def load_hf_model(hf_model: str | Path, dtype: torch.dtype = torch.float32):
    """The HF causal LM in float32 (ModelZoo keeps float32 weights; bf16 is autocast only), or in
    bfloat16 when a run asks for a bfloat16 frozen base (`--bf16-base`)."""
    import transformers
    from transformers import AutoModelForCausalLM

    major_minor = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    dtype_key = "dtype" if major_minor >= (4, 56) else "torch_dtype"  # renamed in transformers 4.56
    return AutoModelForCausalLM.from_pretrained(str(hf_model), **{dtype_key: dtype})
