"""A run config (`params_sparse_lora*.yaml`, ModelZoo's trainer layout), validated for the reference trainer.

Both backends read the same file: `cszoo fit` validates it with ModelZoo's own pydantic classes,
the reference trainer with the models below, which cover what it computes. Every section the
reference trainer interprets rejects unknown keys (`extra="forbid"`); keys that only steer the
Cerebras backend or its bookkeeping (backend and cluster settings, CSX performance flags,
logging, checkpoint loading flags, data streaming knobs) are accepted by rule and listed in
`RunConfig.ignored` as {key: reason}, so the run record (`run.json`, `ignored_config_keys`) says
what was not applied and why, and the file never needs editing per backend. Anything that
would change the computation and that the reference trainer cannot reproduce is a `UserError`
naming the key. The `model:` section's architecture keys are read once, as ModelZoo reads them
(`RunConfig.model_section`, a `NormalisedModelSection`: either spelling of a key, ModelZoo's
defaults); the architecture check compares them with the HF model.

The raw YAML helpers and the one-setting accessors live in `modelzoo_ext.run_config.trainer_yaml`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from modelzoo_ext.errors import UserError
from modelzoo_ext.run_config.migrate import is_lora_callback, lora_callback_refusal
from modelzoo_ext.run_config.model_section import NormalisedModelSection, normalise_model_section
from modelzoo_ext.run_config.sparse_lora_block import SparseLoRAConfig
from modelzoo_ext.run_config.trainer_yaml import load_yaml

# ModelZoo callbacks that observe a run without changing what it computes.
OBSERVING_CALLBACKS = {
    "CheckLoss", "ComputeNorm", "LogOptimizerParamGroup", "ModelEvalMetrics", "RateProfiler",
    "DurationProfiler", "FlopUtilization", "SavePerformanceData", "DumpAvailableTensorNames",
    "ModelZooParamsMetadata", "SamplesStreamedInfo", "LogInputSummaries", "WeightCompression",
}  # fmt: skip
# ModelZoo callbacks that only set Cerebras (CSX) compiler/runtime flags: they change how a CS-3 runs
# the step, never what it computes. Accepted when every flag they set is a `csx.` flag.
CSX_FLAG_CALLBACKS = {"ScopedTrainFlags", "ScopedValidateFlags", "GlobalFlags"}
# ModelZoo callbacks about checkpoints that leave the computation as it is (which states of
# fit.ckpt_path are read, checked in `_check_callbacks`).
CHECKPOINT_CALLBACKS = {
    "LoadCheckpointStates": "which states of fit.ckpt_path ModelZoo loads; gpu_reference loads the model "
    "only (from --hf-model), and the base from `convert hf-to-cs` holds the model only",
}
# ModelZoo's checkpoint retention: honoured by gpu_reference with the same meaning (`RunConfig.keep_checkpoints`).
KEEP_CHECKPOINTS = "KeepNCheckpoints"
# This package's own callbacks (modelzoo_ext.cerebras): the CS side of what gpu_reference does itself.
PACKAGE_CALLBACKS = {
    "SparseLoRAMasks": "this package's CS-side mask hook; gpu_reference applies the masks itself",
    "SparseLoRALossLog": "this package's CS-side loss log (sparse_lora_losses.jsonl); "
    "gpu_reference writes metrics.jsonl",
}
# Keys accepted but not applied, and why (a key is listed only when the file sets it).
IGNORED_REASONS = {
    "validate": "ModelZoo's `cszoo validate` section; gpu_reference evaluates with fit.val_dataloader",
    "validate_all": "ModelZoo's `cszoo validate_all` section; gpu_reference evaluates with fit.val_dataloader",
    "fit.ckpt_path": "the CS checkpoint of the base model; gpu_reference reads --hf-model",
    "logging": "how often ModelZoo logs; gpu_reference logs every step (metrics.jsonl, TensorBoard)",
    "loggers": "ModelZoo's loggers; gpu_reference writes metrics.jsonl and TensorBoard events itself",
    "precision.precision_opt_level": "CS compiler precision optimisation level",
    "precision.loss_scaling_factor": "loss scaling keeps cbfloat16/float16 CS gradients in range; "
    "gpu_reference's bfloat16 autocast keeps float32 gradients and does not scale the loss",
    "precision.initial_loss_scale": "dynamic loss scaling (CS)",
    "precision.steps_per_increase": "dynamic loss scaling (CS)",
    "precision.min_loss_scale": "dynamic loss scaling (CS)",
    "precision.max_loss_scale": "dynamic loss scaling (CS)",
    "precision.log_loss_scale": "dynamic loss scaling (CS)",
    "checkpoint.save_initial_checkpoint": "CS checkpoint schedule (step 0); gpu_reference checkpoints the "
    "LoRA factors every checkpoint.steps",
    "checkpoint.disable_strict_checkpoint_loading": "how ModelZoo loads fit.ckpt_path (the base has no LoRA "
    "or mask entries); gpu_reference reads --hf-model",
    "checkpoint.autoload_last_checkpoint": "ModelZoo's resume; gpu_reference resumes from its own "
    "checkpoints/ when rerun",
    "checkpoint.save_hf_checkpoint": "ModelZoo's HF export; gpu_reference writes its own exports",
    "checkpoint.checkpoint_root": "where ModelZoo writes its checkpoints; gpu_reference writes under the run dir",
    "checkpoint.checkpoint_name": "ModelZoo's checkpoint file names; gpu_reference names its own",
    "checkpoint.strict_version": "ModelZoo's check of a loaded checkpoint's version; gpu_reference reads --hf-model",
}
# Dataloader keys that change how samples are streamed, never which samples come in which order.
STREAMING_KEYS = {
    "num_workers": "worker processes reading the data",
    "prefetch_factor": "batches read ahead",
    "persistent_workers": "whether workers outlive an epoch",
    "use_worker_cache": "a copy of the data on the CS worker nodes",
    "micro_batch_size": "CS micro-batching of each batch (the same summed gradients)",
}
# Model keys whose non-default values would change the math in ways the HF model does not follow.
ZERO_DROPOUT_KEYS = ("embedding_dropout_rate", "dropout_rate", "attention_dropout_rate")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelSection(BaseModel):
    """`trainer.init.model`: the sparse_lora block, the loss, and architecture keys checked against the HF config."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    name: str
    sparse_lora: SparseLoRAConfig
    loss_scaling: Literal["num_tokens", "batch_size", "NUM_TOKENS", "BATCH_SIZE"] = "num_tokens"
    loss_weight: float = 1.0

    @property
    def architecture(self) -> dict[str, Any]:
        """The remaining keys (vocab_size, hidden_size, ...) as written; `RunConfig.model_section`
        reads them as ModelZoo does."""
        return dict(self.model_extra or {})


class PrecisionSection(_Strict):
    """`trainer.init.precision` (ModelZoo's `MixedPrecision`)."""

    enabled: bool = True
    fp16_type: Literal["float16", "bfloat16", "cbfloat16"] = "bfloat16"
    loss_scaling_factor: float | Literal["dynamic"] | None = 1.0
    max_gradient_norm: float | None = Field(None, gt=0)
    max_gradient_value: float | None = Field(None, gt=0)
    # CS-only or fp16-only knobs: accepted, recorded as not applied.
    precision_opt_level: int | None = None
    initial_loss_scale: float | None = None
    steps_per_increase: int = 2000
    min_loss_scale: float | None = None
    max_loss_scale: float | None = None
    log_loss_scale: bool | None = None


class LoopSection(_Strict):
    """`trainer.init.loop`."""

    max_steps: int | None = Field(None, gt=0)
    num_steps: int | None = Field(None, gt=0)
    eval_frequency: int | float | None = 1.0
    eval_steps: int | None = Field(None, gt=0)
    grad_accum_steps: int = Field(1, gt=0)
    num_epochs: int | None = None
    steps_per_epoch: int | None = None


class CheckpointSection(_Strict):
    """`trainer.init.checkpoint`: `steps` is honoured; the loading flags concern the CS checkpoint only."""

    steps: int | None = Field(None, gt=0)
    save_initial_checkpoint: bool = False
    disable_strict_checkpoint_loading: bool | None = None
    autoload_last_checkpoint: bool | None = None
    save_hf_checkpoint: bool | None = None
    checkpoint_root: str | None = None
    checkpoint_name: str | None = None
    strict_version: bool | None = None


class DataLoaderSection(_Strict):
    """A `GptHDF5MapDataProcessor` dataloader."""

    data_processor: Literal["GptHDF5MapDataProcessor"]
    data_dir: str
    batch_size: int = Field(gt=0)
    shuffle: bool = False
    shuffle_seed: int = 0
    drop_last: bool = True
    # Streaming knobs: no effect on which samples come in which order.
    num_workers: int = 0
    prefetch_factor: int | None = None
    persistent_workers: bool | None = None
    use_worker_cache: bool = False
    sort_files: bool = True
    micro_batch_size: Any = None
    # Accepted only at their defaults (checked in `_check_dataloader`).
    max_sequence_length: int | None = None
    data_subset: str | None = None
    mixture: Any = None
    num_samples: int | None = None
    use_vsl: bool = False
    pad_last: bool = False


class TrainerInit(_Strict):
    backend: dict[str, Any] | None = None
    model_dir: str | None = None
    seed: int | None = None
    model: ModelSection
    optimizer: dict[str, Any]
    schedulers: Any = None
    precision: PrecisionSection | None = None
    sparsity: Any = None
    loop: LoopSection
    checkpoint: CheckpointSection | None = None
    logging: dict[str, Any] | None = None
    loggers: Any = None
    callbacks: list[Any] | None = None


class TrainerFit(_Strict):
    train_dataloader: DataLoaderSection
    val_dataloader: DataLoaderSection | list[DataLoaderSection] | None = None
    ckpt_path: str | None = None


class RunConfig(BaseModel):
    """A validated run config, its model section as ModelZoo reads it, and the keys accepted but not applied."""

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=())

    init: TrainerInit
    fit: TrainerFit
    path: str
    ignored: dict[str, str]
    model_section: NormalisedModelSection

    @property
    def max_steps(self) -> int:
        return self.init.loop.max_steps or self.init.loop.num_steps

    @property
    def sparse_lora(self) -> SparseLoRAConfig:
        return self.init.model.sparse_lora

    @property
    def keep_checkpoints(self) -> int | None:
        """How many of its checkpoints a run keeps on disk (`KeepNCheckpoints` n; None: all)."""
        for entry in self.init.callbacks or []:
            if isinstance(entry, dict) and len(entry) == 1 and KEEP_CHECKPOINTS in entry:
                return keep_n_checkpoints(entry[KEEP_CHECKPOINTS])
        return None

    @property
    def val_dataloader(self) -> DataLoaderSection | None:
        val = self.fit.val_dataloader
        return val[0] if isinstance(val, list) else val

    @property
    def train_micro_batch_size(self) -> tuple[Any, str] | None:
        """(value, key) of the file's own training micro-batch setting: `csx.performance.
        micro_batch_size` of a `ScopedTrainFlags` callback (before a `GlobalFlags` one, as
        ModelZoo scopes them), else the train dataloader's `micro_batch_size`; None when unset.
        The value is ModelZoo's: an int, "auto", "explore", {"explore": ...} or None."""
        flag = "csx.performance.micro_batch_size"
        for name in ("ScopedTrainFlags", "GlobalFlags"):
            for entry in self.init.callbacks or []:
                if isinstance(entry, dict) and isinstance(entry.get(name), dict) and flag in entry[name]:
                    return entry[name][flag], f"callbacks.{name}.{flag}"
        if "micro_batch_size" in self.fit.train_dataloader.model_fields_set:
            return self.fit.train_dataloader.micro_batch_size, "fit.train_dataloader.micro_batch_size"
        return None


def _format_validation_error(exc: ValidationError, path: str) -> UserError:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return UserError(
        f"run config: {first['msg']}", where=f"{path}: trainer.{where}", fix="see docs/gpu_reference.md"
    )


def _csx_flags_only(settings: Any) -> bool:
    return isinstance(settings, dict) and all(str(key).startswith("csx.") for key in settings)


def _check_callbacks(callbacks: list[Any] | None, ignored: dict[str, str]) -> None:
    for entry in callbacks or []:
        name = next(iter(entry)) if isinstance(entry, dict) and len(entry) == 1 else str(entry)
        if name in OBSERVING_CALLBACKS:
            ignored[f"callbacks.{name}"] = "observes the run only (metrics, checks, profiles)"
        elif name in CSX_FLAG_CALLBACKS and _csx_flags_only(entry[name]):
            ignored[f"callbacks.{name}"] = (
                f"CSX flags only ({', '.join(sorted(entry[name]))}): how a CS-3 runs the step, not what it computes"
            )
        elif name in PACKAGE_CALLBACKS:
            ignored[f"callbacks.{name}"] = PACKAGE_CALLBACKS[name]
        elif name == KEEP_CHECKPOINTS:
            keep_n_checkpoints(entry[name] if isinstance(entry, dict) else None)
        elif is_lora_callback(entry):
            raise lora_callback_refusal(f"trainer.init.callbacks.{name}")
        elif name in CHECKPOINT_CALLBACKS:
            _check_loaded_states(name, entry[name] if isinstance(entry, dict) else None)
            ignored[f"callbacks.{name}"] = CHECKPOINT_CALLBACKS[name]
        else:
            raise UserError(
                f"callback {name!r} may change the computation and gpu_reference cannot run it",
                where="trainer.init.callbacks",
                fix="remove it from the run config, or run on the Cerebras backend",
            )


def keep_n_checkpoints(settings: Any) -> int | None:
    """`n` of a `KeepNCheckpoints` callback, checked as ModelZoo checks it (None: keep every one)."""
    n = (settings or {}).get("n") if isinstance(settings, dict) or settings is None else settings
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise UserError(
            f"KeepNCheckpoints n must be a positive integer (or left out: keep every checkpoint), got {n!r}",
            where="trainer.init.callbacks.KeepNCheckpoints",
            fix="n: 1 keeps the latest checkpoint (enough to resume)",
        )
    return n


def _check_loaded_states(name: str, settings: Any) -> None:
    """LoadCheckpointStates must load the model: without it a CS run would train a random base."""
    if name != "LoadCheckpointStates":
        return
    states = (settings or {}).get("load_checkpoint_states", "all")
    names = {s.strip() for s in (states.split(",") if isinstance(states, str) else states)}
    if "all" not in {n.lower() for n in names} and "model" not in names:
        raise UserError(
            f"LoadCheckpointStates loads {sorted(names)} but not the model: the CS run would start from "
            "ModelZoo's random initialisation, which gpu_reference cannot reproduce",
            where="trainer.init.callbacks.LoadCheckpointStates",
            fix="load_checkpoint_states: model",
        )


def _ignore_streaming_keys(dl: DataLoaderSection, where: str, ignored: dict[str, str]) -> None:
    for key in sorted(dl.model_fields_set & set(STREAMING_KEYS)):
        ignored[f"{where}.{key}"] = f"{STREAMING_KEYS[key]}: not which samples come in which order"


def _check_dataloader(dl: DataLoaderSection, where: str) -> None:
    defaults = {
        "max_sequence_length": None,
        "data_subset": None,
        "mixture": None,
        "num_samples": None,
        "use_vsl": False,
        "sort_files": True,  # the file order; gpu_reference reads the files sorted by path
    }
    for key, default in defaults.items():
        if getattr(dl, key) != default:
            raise UserError(
                f"{key} is not supported by gpu_reference", where=f"{where}.{key}", fix="remove it"
            )
    if dl.pad_last and not dl.drop_last:
        raise UserError(
            "pad_last is not supported by gpu_reference", where=f"{where}.pad_last", fix="remove it"
        )


def load_run_config(path: str | Path) -> RunConfig:
    """Parse and check a params YAML; a `UserError` for anything the trainer cannot honour."""
    path = str(path)
    raw = load_yaml(path)
    if "trainer" not in raw:
        raise UserError("expected a ModelZoo trainer config (top-level key `trainer`)", where=path)
    unknown_top = set(raw) - {"trainer"}
    if unknown_top:
        raise UserError(f"unknown top-level keys {sorted(unknown_top)}", where=path)
    trainer = raw["trainer"]
    unknown = set(trainer) - {"init", "fit", "validate", "validate_all"}
    if unknown:
        raise UserError(f"unknown trainer keys {sorted(unknown)}", where=f"{path}: trainer")
    ignored = {k: IGNORED_REASONS[k] for k in ("validate", "validate_all") if k in trainer}
    try:
        init = TrainerInit(**trainer["init"])
        fit = TrainerFit(**trainer.get("fit") or {})
    except ValidationError as exc:
        raise _format_validation_error(exc, path) from exc
    except KeyError as exc:
        raise UserError(f"missing trainer.{exc.args[0]}", where=path) from exc
    if init.sparsity is not None:
        raise UserError(
            "a `sparsity:` section is not supported with sparse LoRA",
            where=f"{path}: trainer.init.sparsity",
            fix="masks come from sparse_lora.mask_path",
        )
    if fit.ckpt_path is not None:  # the CS copy of the base weights; this trainer reads them from --hf-model
        ignored["fit.ckpt_path"] = IGNORED_REASONS["fit.ckpt_path"]
    loop = init.loop
    if (loop.max_steps is None) == (loop.num_steps is None):
        raise UserError(
            "set exactly one of loop.max_steps / loop.num_steps", where=f"{path}: trainer.init.loop"
        )
    if loop.num_epochs is not None or loop.steps_per_epoch is not None:
        raise UserError(
            "num_epochs / steps_per_epoch are not supported by gpu_reference",
            where=f"{path}: trainer.init.loop",
            fix="use max_steps",
        )
    precision = init.precision or PrecisionSection(enabled=False)
    if precision.enabled and precision.fp16_type == "float16":
        raise UserError(
            "float16 mixed precision is not supported by gpu_reference",
            where=f"{path}: trainer.init.precision.fp16_type",
            fix="use bfloat16",
        )
    if precision.max_gradient_norm is not None and precision.max_gradient_value is not None:
        raise UserError(
            "set max_gradient_norm or max_gradient_value, not both", where=f"{path}: trainer.init.precision"
        )
    model = init.model
    if model.loss_scaling.lower() == "num_tokens" and model.loss_weight != 1.0:
        raise UserError(
            "loss_scaling num_tokens requires loss_weight 1.0",
            where=f"{path}: trainer.init.model.loss_weight",
        )
    model_section = normalise_model_section(model.architecture, where=f"{path}: trainer.init.model")
    for key in ZERO_DROPOUT_KEYS:  # under either spelling (`embd_pdrop`); left out: the architecture check's
        if float(model_section.stated.get(key, 0.0) or 0.0) != 0.0:
            spelled = model_section.spelled_as(key)
            raise UserError(
                f"{spelled} must be 0 (the HF model runs without this dropout)",
                where=f"{path}: trainer.init.model.{spelled}",
            )
    _check_callbacks(init.callbacks, ignored)
    _check_dataloader(fit.train_dataloader, f"{path}: trainer.fit.train_dataloader")
    _ignore_streaming_keys(fit.train_dataloader, "fit.train_dataloader", ignored)
    vals = fit.val_dataloader if isinstance(fit.val_dataloader, list) else [fit.val_dataloader]
    for i, val in enumerate(v for v in vals if v is not None):
        _ignore_streaming_keys(val, "fit.val_dataloader" + (f"[{i}]" if len(vals) > 1 else ""), ignored)
    if init.backend is not None:
        ignored["backend"] = f"which machine runs a CS step ({', '.join(sorted(init.backend))})"
    for key in ("logging", "loggers"):
        if getattr(init, key) is not None:
            ignored[key] = IGNORED_REASONS[key]
    for section in ("precision", "checkpoint"):
        for key in sorted(getattr(getattr(init, section), "model_fields_set", ())):
            if f"{section}.{key}" in IGNORED_REASONS:
                ignored[f"{section}.{key}"] = IGNORED_REASONS[f"{section}.{key}"]
    return RunConfig(init=init, fit=fit, path=path, ignored=ignored, model_section=model_section)
