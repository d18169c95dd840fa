"""What one preflight checks: a run configuration as it will run (`Subject`).

A subject is the run's params (the raw trainer YAML, with `--masks` / `--data` applied the way
the trainers apply them), its backend, the HF model directory (config.json, tokenizer, weights:
any of them may be missing, and the checks that need them say so), and how it is launched (GPUs,
device memory). `sparse-lora preflight PARAMS.yaml` makes one from its options
(`subject_from_options`); `sweep preflight` makes one per group of runs from their plans.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelzoo_ext.errors import UserError
from modelzoo_ext.families import ModelFamily, family_of_model_name
from modelzoo_ext.run_config import cs_to_hf_config, find_model_section, load_yaml
from modelzoo_ext.run_config import trainer_yaml as rc

BACKENDS = ("cs3", "gpu", "cpu")
BACKEND_OF_TYPE = {"CSX": "cs3", "GPU": "gpu", "CPU": "cpu"}


@dataclass(frozen=True)
class Subject:
    """One configuration under check."""

    label: str  # how the table names it
    params: dict[str, Any]  # the trainer YAML the run reads (overrides applied)
    params_path: Path  # where it was read from
    backend: str  # cs3 | gpu | cpu
    hf_dir: Path | None = None  # the run's HF model directory (None: not given)
    gpus: int = 1  # GPU runs: processes (torchrun --nproc-per-node)
    device_memory: str | None = None  # GPU runs: one device's memory, e.g. "80GB"
    micro_batch_size: str | None = None  # GPU runs: --micro-batch-size (None: the run config's setting)
    activation_checkpointing: bool = False  # GPU runs: --activation-checkpointing
    fsdp: bool = False  # GPU runs: --fsdp
    sampled_product: str = "auto"  # GPU runs: --sampled-product
    planned_max_seq_length: int | None = None  # a sweep's data before it is prepared (memory plan)
    planned_mask_density: float | None = None  # a sweep's per-layer masks before they are built
    allowed_epochs: float = 1.0  # how often the run may go through its data (a sweep's train.epochs)
    mask_method: dict[str, Any] | None = field(default=None, compare=False)  # sweep: the planned masks

    @property
    def model(self) -> dict[str, Any]:
        return find_model_section(self.params, str(self.params_path))

    @property
    def sparse_lora(self) -> dict[str, Any]:
        return dict(self.model.get("sparse_lora") or {})

    @property
    def dense_baseline(self) -> bool:
        return bool(self.sparse_lora.get("dense_baseline"))

    @property
    def mask_path(self) -> str | None:
        return None if self.dense_baseline else self.sparse_lora.get("mask_path")

    @property
    def data_dir(self) -> str | None:
        return (self.params["trainer"].get("fit") or {}).get("train_dataloader", {}).get("data_dir")

    @property
    def model_dir(self) -> str:
        return str(self.params["trainer"]["init"].get("model_dir") or "model_dir")

    @property
    def ckpt_path(self) -> str | None:
        return (self.params["trainer"].get("fit") or {}).get("ckpt_path")

    @property
    def family(self) -> ModelFamily | None:
        return family_of_model_name(self.model.get("name"))

    def hf_config(self) -> tuple[dict[str, Any], str]:
        """(the model's config.json, where it came from): the HF directory's, else the one the run
        config's model section describes (`cs_to_hf_config`)."""
        if self.hf_dir is not None and (self.hf_dir / "config.json").is_file():
            return json.loads((self.hf_dir / "config.json").read_text()), str(self.hf_dir / "config.json")
        family = self.family
        if family is None:
            raise UserError(
                f"model {self.model.get('name')!r} is of no known family", where=str(self.params_path)
            )
        section = {
            k: v
            for k, v in self.model.items()
            if k not in ("name", "sparse_lora", "loss_scaling", "loss_weight")
        }
        return cs_to_hf_config(
            section, family.name
        ), "derived from the run config's model section (no --hf-model)"

    def write_params(self, path: Path) -> Path:
        """The params as the run reads them, for the checks that take a file (`load_run_config`)."""
        return rc.write_yaml(path, self.params)


def backend_of(params: dict[str, Any]) -> str:
    """The backend a params file names (`backend.backend_type`: CSX -> cs3, GPU -> gpu, CPU -> cpu)."""
    kind = ((params.get("trainer", {}).get("init", {}) or {}).get("backend") or {}).get("backend_type", "CSX")
    return BACKEND_OF_TYPE.get(str(kind).upper(), "cs3")


def subject_from_options(
    params_yaml: str | Path,
    *,
    hf_model: str | Path | None = None,
    masks: str | Path | None = None,
    data: str | Path | None = None,
    backend: str | None = None,
    gpus: int = 1,
    device_memory: str | None = None,
    micro_batch_size: str | None = None,
    activation_checkpointing: bool = False,
    fsdp: bool = False,
    sampled_product: str = "auto",
    allowed_epochs: float = 1.0,
) -> Subject:
    """The subject of `sparse-lora preflight PARAMS.yaml [--hf-model] [--masks] [--data] [--backend]`."""
    params = copy.deepcopy(load_yaml(params_yaml))
    if "trainer" not in params or not isinstance(params["trainer"], dict):
        raise UserError(
            "expected a ModelZoo trainer config (top-level key `trainer`)", where=str(params_yaml)
        )
    model = find_model_section(params, str(params_yaml))
    if masks is not None:
        model.setdefault("sparse_lora", {})["mask_path"] = str(masks)
    if data is not None:
        rc.train_dataloader(params)["data_dir"] = str(data)
    chosen = backend or backend_of(params)
    if chosen not in BACKENDS:
        raise UserError(f"unknown backend {chosen!r}", where="--backend", fix=f"use one of {BACKENDS}")
    return Subject(
        label=f"{params_yaml} ({chosen})", params=params, params_path=Path(params_yaml), backend=chosen,
        hf_dir=Path(hf_model) if hf_model else None, gpus=gpus, device_memory=device_memory,
        micro_batch_size=micro_batch_size, activation_checkpointing=activation_checkpointing, fsdp=fsdp,
        sampled_product=sampled_product, allowed_epochs=allowed_epochs,
    )  # fmt: skip
