"""The sweep YAML: the study's grid as a list of points, its protocol, and how it is launched.

    name: phoenix
    models: {llama3p1_8b: {hf_dir: ..., params: ..., cs_checkpoint: ...}}
    tasks: [boolq, hellaswag, gsm8k]
    method_structures: [[magnitude, unstructured], [wanda, unstructured], [magnitude, "2:4"]]
    sparsities: [0.0, 0.5, 0.7]           # N:M points take theirs from N:M; 0.0 is the dense-LoRA baseline
    modes: [s2s, s2d]
    backends: [cs3, gpu]
    seeds: [0, 1, 2]                      # each seed sets LoRA init, data order, random/calibration masks, dropout
    data: {protocol: official, source: hub, max_seq_length: 2048}
    train: {epochs: 1, batch_size: 32, tasks: {gsm8k: {epochs: 3}}, keep_checkpoints: 1}
    calibration: {tokens: 2048, seq_len: 256}   # wanda/gradient/taylor, on the task's training data
    eval: {device: cuda, limit: null, heldout_limit: 256, heldout_every: 25}   # held-out loss also every 25 steps

See `modelzoo_ext/study/examples/` and docs/experiments.md. Unknown keys are errors; relative paths
are resolved against the YAML file's folder; the names that become run ids and paths (model keys,
tasks, methods, structures) must be plain (letters, digits, `._-`). Everything is checked when the file is loaded
(`load_sweep`), so `sweep plan` refuses a bad grid before it writes anything.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from modelzoo_ext.data.split import DEFAULT_SALT
from modelzoo_ext.data.templates import TASKS
from modelzoo_ext.errors import UserError

TaskName = Literal["boolq", "hellaswag", "gsm8k"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    hf_dir: str = Field(description="Hugging Face model directory")
    params: str = Field(description="the model's run config (ModelZoo trainer layout), for every backend")
    cs_checkpoint: str | None = Field(None, description="CS checkpoint of the base model (cs3 backend)")


class DataSpec(_Strict):
    protocol: Literal["official", "offline"] = "offline"
    source: str = Field(
        "bundled", description="hub, bundled (offline copies of the evaluation splits) or a directory"
    )
    held_out_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="offline protocol only")
    split_salt: str = Field(DEFAULT_SALT, description="offline protocol only")
    max_seq_length: int = Field(256, gt=1)


class TrainLength(_Strict):
    """How long to train: `epochs` over the task's training data, or `max_steps` (one of them)."""

    epochs: float | None = Field(None, gt=0)
    max_steps: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one(self) -> TrainLength:
        if self.epochs is not None and self.max_steps is not None:
            raise ValueError("give epochs or max_steps, not both")
        return self


class TrainSpec(TrainLength):
    batch_size: int | None = Field(None, gt=0, description="global batch (default: the params file's)")
    tasks: dict[TaskName, TrainLength] = Field(default_factory=dict, description="per-task training length")
    keep_checkpoints: int = Field(
        1,
        ge=0,
        description="training checkpoints a run keeps on disk (ModelZoo's KeepNCheckpoints, honoured by the "
        "reference trainer too); 0: one while training, deleted once the run's export is checked",
    )
    checkpoint_steps: int | None = Field(
        None, gt=0, description="checkpoint every N steps, to resume from (default: once, at the last step)"
    )

    @property
    def kept_while_training(self) -> int:
        """The KeepNCheckpoints `n` written into every run's params (ModelZoo needs n >= 1)."""
        return max(1, self.keep_checkpoints)

    def length_for(self, task: str) -> TrainLength:
        """The task's own length, else the sweep's, else none (the params file's max_steps)."""
        return self.tasks.get(task) or TrainLength(epochs=self.epochs, max_steps=self.max_steps)


class CalibrationSpec(_Strict):
    """wanda / gradient / taylor: how much of the task's training data calibrates the scores."""

    tokens: int = Field(2048, gt=0)
    seq_len: int = Field(256, gt=0)


class EvalSpec(_Strict):
    tasks: list[TaskName] | None = Field(None, description="default: the task the run fine-tunes on")
    limit: int | None = Field(None, gt=0)
    max_gen_toks: int | None = Field(None, gt=0)
    batch_size: int = 8
    device: str = "cpu"
    heldout_loss: bool = Field(
        True, description="also the held-out loss (completion NLL) on prepared held-out data"
    )
    heldout_limit: int | None = Field(None, gt=0, description="score only the first N held-out examples")
    heldout_every: int | None = Field(
        None,
        gt=0,
        description="also the held-out loss during training, every N steps: the trainer validates on the "
        "same held-out examples (the curve of held-out loss against steps)",
    )


class CS3Spec(_Strict):
    cszoo: str = "cszoo"
    num_csx: int = 1
    mount_dirs: list[str] = []
    python_paths: list[str] = []
    extra_args: list[str] = []


class GPUSpec(_Strict):
    nproc_per_node: int = 1
    device_memory: str | None = Field(
        None, description="one GPU's memory, e.g. 80GB: the preflight's memory plan per device"
    )
    micro_batch_size: int | Literal["auto", "none"] | None = Field(
        None,
        description="the reference trainer's --micro-batch-size (None: the run config's own setting; auto: "
        "the largest that fits the device); the same summed gradients whatever it is",
    )
    activation_checkpointing: bool = Field(
        False,
        description="the reference trainer's --activation-checkpointing (the same losses and gradients)",
    )
    fsdp: bool = Field(
        False, description="the reference trainer's --fsdp: the frozen base sharded over the ranks"
    )
    sampled_product: Literal["auto", "never", "always"] = Field(
        "auto",
        description="the reference trainer's --sampled-product: the s2s weight gradient through an index of the "
        "kept weights (12 bytes each, whole on every rank) or the dense product masked (the same gradient)",
    )

    @field_validator("micro_batch_size")
    @classmethod
    def _positive(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, int) and value < 1:
            raise ValueError("micro_batch_size must be >= 1, 'auto' or 'none'")
        return value

    def memory_arguments(self) -> list[str]:
        """The options of `gpu_reference.train` these settings ask for."""
        args = [] if self.micro_batch_size is None else ["--micro-batch-size", str(self.micro_batch_size)]
        args += ["--activation-checkpointing"] if self.activation_checkpointing else []
        args += [] if self.sampled_product == "auto" else ["--sampled-product", self.sampled_product]
        return args + (["--fsdp"] if self.fsdp else [])


class BaselineSpec(_Strict):
    dense_lora: bool = True
    no_finetune: bool = True


class SweepSpec(_Strict):
    name: str
    models: dict[str, ModelSpec]
    tasks: list[TaskName]
    method_structures: list[tuple[str, str]] = Field(min_length=1)
    scope: Literal["layer", "global"] = "layer"
    sparsities: list[float]
    modes: list[Literal["s2s", "s2d"]]
    backends: list[Literal["cs3", "gpu", "cpu"]]
    seeds: list[int] = [0]
    baselines: BaselineSpec = BaselineSpec()
    data: DataSpec = DataSpec()
    train: TrainSpec = TrainSpec()
    calibration: CalibrationSpec = CalibrationSpec()
    eval: EvalSpec = EvalSpec()
    cs3: CS3Spec = CS3Spec()
    gpu: GPUSpec = GPUSpec()


LEGACY_KEYS = {"methods", "structures"}


def _validation_error(exc: ValidationError, path: Path) -> UserError:
    first = exc.errors()[0]
    return UserError(f"sweep file: {first['msg']}", where=f"{path}: {'.'.join(map(str, first['loc']))}")


PLAIN_NAME = re.compile(r"[A-Za-z0-9._-]+")


def _check_names(spec: SweepSpec, path: Path) -> None:
    """Names that become run ids, directories and asset files must be plain: letters, digits and
    `._-` (not `.` or `..`), so that none can nest, leave the sweep directory or be read as shell text."""
    names = [("model key", "models", m) for m in spec.models] + [("task", "tasks", t) for t in spec.tasks]
    for method, structure in spec.method_structures:  # `2:4` is written `2of4` in run ids and paths
        names += [
            ("method", "method_structures", method),
            ("structure", "method_structures", structure.replace(":", "of")),
        ]
    for kind, key, name in names:
        if not PLAIN_NAME.fullmatch(name) or name in (".", ".."):
            raise UserError(
                f"{kind} {name!r} is not a plain name", where=f"{path}: {key}",
                fix="use letters, digits, '.', '_' and '-' only (it names run directories and files)",
            )  # fmt: skip


def _check_points(spec: SweepSpec, path: Path) -> None:
    """Every (method, structure) must be computable; unknown names are refused now, not hours later."""
    from modelzoo_ext.masks.compute import MaskRequest
    from modelzoo_ext.masks.select import Structure

    for s in spec.sparsities:
        if not 0.0 <= s < 1.0:
            raise UserError(f"sparsity {s} is outside [0, 1)", where=f"{path}: sparsities")
    for method, structure in spec.method_structures:
        try:  # the masks command's own checks, with N:M's own sparsity
            level = Structure.parse(structure).fixed_sparsity or 0.5
            MaskRequest(method=method, structure=structure, scope=spec.scope, sparsities=(level,)).checked()
        except UserError as exc:
            raise UserError(
                exc.what, where=f"{path}: method_structures [{method}, {structure}]", fix=exc.fix
            ) from exc
    if len(set(spec.method_structures)) != len(spec.method_structures):
        raise UserError("a (method, structure) pair is listed twice", where=f"{path}: method_structures")


def _check_heldout_curve(spec: SweepSpec, path: Path) -> None:
    """Evaluations during training score exactly the final held-out loss's examples, in whole batches."""
    ev = spec.eval
    if ev.heldout_every is None:
        return
    if not ev.heldout_loss or ev.heldout_limit is None or ev.heldout_limit % ev.batch_size:
        raise UserError(
            "eval.heldout_every needs the held-out loss on a fixed number of examples that fills whole "
            "batches, so that every point of the curve scores the examples of the final held-out loss",
            where=f"{path}: eval",
            fix=f"set heldout_loss: true and heldout_limit to a multiple of eval.batch_size ({ev.batch_size})",
        )


def validation_schedule(spec: SweepSpec) -> dict[str, int] | None:
    """How a fine-tune validates on the held-out data during training (None: it does not).

    The first `heldout_limit` held-out examples, in order, in batches of `eval.batch_size`, every
    `heldout_every` steps: the examples the final held-out loss scores (`_check_heldout_curve`).
    """
    ev = spec.eval
    if ev.heldout_every is None:
        return None
    return {
        "every": ev.heldout_every,
        "batch_size": ev.batch_size,
        "batches": ev.heldout_limit // ev.batch_size,
    }


def _check_models(spec: SweepSpec, path: Path) -> None:
    """Each model's params name a known family, and its HF config.json is of that family."""
    import json

    from modelzoo_ext.families import family_of_hf_config, family_of_model_name
    from modelzoo_ext.run_config import find_model_section, load_yaml

    for name, model in spec.models.items():
        for p in (model.hf_dir, model.params):
            if not Path(p).exists():
                raise UserError(f"model {name!r}: path not found", where=p)
        section = find_model_section(load_yaml(model.params), model.params)
        family = family_of_model_name(section.get("name"))
        if family is None:
            raise UserError(
                f"model {name!r}: its params name model {section.get('name')!r}, of no known family",
                where=model.params,
                fix="use a sparse_lora_<family> params file (model_configs/)",
            )
        config = Path(model.hf_dir) / "config.json"
        hf_family = family_of_hf_config(json.loads(config.read_text())) if config.is_file() else None
        if hf_family is not None and hf_family.name != family.name:
            raise UserError(
                f"model {name!r}: the params are {family.name} but the HF model is {hf_family.name}",
                where=f"{model.params} vs {model.hf_dir}",
            )


def _resolved(spec: SweepSpec, base: Path) -> SweepSpec:
    models = {
        name: m.model_copy(
            update={
                "hf_dir": str(base / m.hf_dir),
                "params": str(base / m.params),
                "cs_checkpoint": str(base / m.cs_checkpoint) if m.cs_checkpoint else None,
            }
        )
        for name, m in spec.models.items()
    }
    data = spec.data
    if data.source not in ("hub", "bundled"):
        data = data.model_copy(update={"source": str(base / data.source)})
    return spec.model_copy(update={"models": models, "data": data})


def load_sweep(path: str | Path) -> SweepSpec:
    """Parse and check a sweep YAML (paths resolved against its folder); UserError on anything wrong."""
    path = Path(path)
    if not path.is_file():
        raise UserError("sweep file not found", where=str(path))
    raw = yaml.safe_load(path.read_text())
    legacy = LEGACY_KEYS & set(raw or {})
    if legacy:
        raise UserError(
            f"`{'` and `'.join(sorted(legacy))}` made a cross product nobody asked for",
            where=f"{path}",
            fix="list the pairs: method_structures: [[magnitude, unstructured], [magnitude, '2:4'], ...]",
        )
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as exc:
        raise _validation_error(exc, path) from exc
    spec = _resolved(spec, path.parent.resolve())
    _check_names(spec, path)
    _check_points(spec, path)
    _check_heldout_curve(spec, path)
    _check_models(spec, path)
    if spec.data.protocol == "official" and spec.data.source == "bundled":
        raise UserError(
            "the official protocol trains on the tasks' training splits, which the offline copies do not hold",
            where=f"{path}: data",
            fix="use data.source: hub (or a directory), or data.protocol: offline",
        )
    unknown = [t for t in (spec.eval.tasks or []) if t not in TASKS]
    if unknown:
        raise UserError(f"unknown eval tasks {unknown}", where=f"{path}: eval.tasks")
    return spec
