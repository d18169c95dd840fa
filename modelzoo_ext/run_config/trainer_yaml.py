"""A trainer YAML (`params_sparse_lora*.yaml`) as a raw mapping: read, write, and one setting at a time.

The validated view the reference trainer runs from is `modelzoo_ext.run_config.params`
(`load_run_config`); this module is for code that reads a setting of a params file or derives one
run's params file from another (the sweep, the demo, throughput, the converters): load and write
atomically (`load_yaml`, `write_yaml`), find the `model:` section in any layout ModelZoo writes
(`find_model_section`), and read or change one setting where it lives (`model_section`,
`train_dataloader`, `max_steps`, `set_mode`, `set_max_steps`, ...), so that no caller spells
`params["trainer"]["init"]["loop"]` by hand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from modelzoo_ext.atomic import atomic_file
from modelzoo_ext.errors import UserError
from modelzoo_ext.run_config.modes import yaml_mode


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a run config (or any YAML mapping); UserError when absent, invalid or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise UserError("config file not found", where=str(path), fix="pass the run's params YAML")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"not valid YAML ({exc})".replace("\n", " "), where=str(path)) from exc
    if not isinstance(data, dict):
        raise UserError("config is not a YAML mapping", where=str(path))
    return data


def write_yaml(path: str | Path, data: dict[str, Any]) -> Path:
    """Write a YAML mapping atomically (keys in their given order)."""
    with atomic_file(path) as tmp:
        tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    return Path(path)


def find_model_section(config: dict[str, Any], where: str) -> dict[str, Any]:
    """The `model:` section of a trainer YAML (`trainer.init.model`, a list of trainers, or `model`)."""
    trainer = config.get("trainer")
    if isinstance(trainer, list) and trainer:
        trainer = trainer[0].get("trainer", trainer[0])
    if isinstance(trainer, dict) and isinstance(trainer.get("init", {}).get("model"), dict):
        return trainer["init"]["model"]
    if isinstance(config.get("model"), dict):
        return config["model"]
    raise UserError(
        "no model section (trainer.init.model or model) in the config",
        where=where,
        fix="pass the trainer YAML of the run (or the model_config.yaml written by `convert hf-to-cs`)",
    )


def trainer_yaml_model_section(model: dict[str, Any]) -> dict[str, Any]:
    """`{"trainer": {"init": {"model": ...}}}`: the section to paste into a trainer YAML."""
    return {"trainer": {"init": {"model": dict(model)}}}


# ---------------------------------------------------------------------------------------------
# Reading and changing one setting of a trainer YAML in place (sweeps, the demo). Together these
# are the only code that knows where a setting lives.


def _init(params: dict[str, Any]) -> dict[str, Any]:
    return params["trainer"]["init"]


def _fit(params: dict[str, Any]) -> dict[str, Any]:
    return params["trainer"].setdefault("fit", {})


def model_section(params: dict[str, Any]) -> dict[str, Any]:
    """`trainer.init.model` (the mapping itself: changes to it change `params`)."""
    return _init(params)["model"]


def train_dataloader(params: dict[str, Any]) -> dict[str, Any]:
    """`trainer.fit.train_dataloader` (the mapping itself)."""
    return _fit(params)["train_dataloader"]


def max_steps(params: dict[str, Any]) -> int | None:
    """`trainer.init.loop.max_steps` (or its other name `num_steps`); None when neither is set."""
    loop = _init(params).get("loop") or {}
    return loop.get("max_steps", loop.get("num_steps"))


def set_model_section(params: dict[str, Any], model: dict[str, Any]) -> None:
    """Replace `trainer.init.model` with `model`."""
    _init(params)["model"] = model


def set_optimizer(params: dict[str, Any], optimizer: dict[str, Any], schedulers: list | None) -> None:
    """The optimizer (`{"AdamW": {...}}`) and its learning-rate schedulers (None: constant)."""
    _init(params)["optimizer"] = optimizer
    _init(params)["schedulers"] = schedulers


def set_save_initial_checkpoint(params: dict[str, Any], save: bool) -> None:
    """Whether the trainer checkpoints step 0 (ModelZoo's `checkpoint.save_initial_checkpoint`)."""
    _init(params).setdefault("checkpoint", {})["save_initial_checkpoint"] = save


def set_mode(params: dict[str, Any], short: str, mask_path: str | None) -> None:
    """`s2s`/`s2d` with `mask_path`, or `lora` (the dense baseline: no masks)."""
    mode, dense_baseline = yaml_mode(short)
    block = model_section(params)["sparse_lora"]
    block["mode"] = mode
    block.pop("mask_path", None)
    block.pop("dense_baseline", None)
    if dense_baseline:
        block["dense_baseline"] = True
    else:
        block["mask_path"] = mask_path


def set_training_data(params: dict[str, Any], data_dir: str, batch_size: int | None = None) -> None:
    """Train on `data_dir`; evaluation happens outside the trainer (lm-eval), so no validation loader."""
    loader = train_dataloader(params)
    loader["data_dir"] = data_dir
    if batch_size:
        loader["batch_size"] = batch_size
    _fit(params).pop("val_dataloader", None)


def set_validation_data(
    params: dict[str, Any], data_dir: str, batch_size: int, every_steps: int, batches: int
) -> None:
    """Validate during training every `every_steps` steps on the first `batches` batches of `data_dir`,
    in order (no shuffle); call after `set_training_data`, which removes any validation loader."""
    fit, loop = _fit(params), _init(params)["loop"]
    train = train_dataloader(params)
    fit["val_dataloader"] = {
        "data_processor": train["data_processor"],
        "data_dir": data_dir,
        "batch_size": batch_size,
        "shuffle": False,
        **({"num_workers": train["num_workers"]} if "num_workers" in train else {}),
    }
    loop["eval_frequency"] = every_steps
    loop["eval_steps"] = batches


def set_max_steps(params: dict[str, Any], max_steps: int) -> None:
    """Train `max_steps` optimizer steps; a periodic checkpoint becomes one at the end."""
    init = _init(params)
    init["loop"]["max_steps"] = max_steps
    init["loop"].pop("num_steps", None)
    if (init.get("checkpoint") or {}).get("steps"):
        init["checkpoint"]["steps"] = max_steps


KEEP_CHECKPOINTS = "KeepNCheckpoints"  # ModelZoo's retention callback (`trainer/callbacks/checkpoint.py`)


def set_checkpoint_retention(params: dict[str, Any], keep: int, every: int | None) -> None:
    """Keep the newest `keep` checkpoints on disk (ModelZoo's `KeepNCheckpoints`, which the reference
    trainer honours too) and checkpoint every `every` steps (`set_checkpoint_steps`)."""
    callbacks = _init(params).setdefault("callbacks", [])
    callbacks[:] = [c for c in callbacks if not _is_callback(c, KEEP_CHECKPOINTS)]
    callbacks.append({KEEP_CHECKPOINTS: {"n": keep}})
    set_checkpoint_steps(params, every)


def set_checkpoint_steps(params: dict[str, Any], every: int | None) -> None:
    """`checkpoint.steps`: every `every` steps (a resumable run), else once at the last step.

    ModelZoo also checkpoints the last step whatever the period (its schedule includes it), and
    writes no checkpoint at all without `checkpoint.steps`.
    """
    steps = max_steps(params)
    period = min(every, steps) if every and steps else (every or steps)
    _init(params).setdefault("checkpoint", {})["steps"] = period


def kept_checkpoints(params: dict[str, Any]) -> int | None:
    """`n` of the `KeepNCheckpoints` callback (None: the callback is absent or keeps every checkpoint)."""
    for entry in _init(params).get("callbacks") or []:
        if _is_callback(entry, KEEP_CHECKPOINTS):
            return (entry[next(iter(entry))] or {}).get("n")
    return None


def _is_callback(entry: Any, name: str) -> bool:
    """Is a `callbacks` entry the callback `name` (ModelZoo matches callback names lower-cased)?"""
    return isinstance(entry, dict) and len(entry) == 1 and str(next(iter(entry))).lower() == name.lower()


def set_output(params: dict[str, Any], model_dir: str, seed: int) -> None:
    """Where the trainer writes, and the trainer seed (its RNG: LoRA dropout)."""
    set_model_dir(params, model_dir)
    _init(params)["seed"] = seed


def set_model_dir(params: dict[str, Any], model_dir: str) -> None:
    """Where the trainer writes its checkpoints and logs."""
    _init(params)["model_dir"] = model_dir


def set_backend(params: dict[str, Any], backend_type: str) -> None:
    """ModelZoo's backend (`CSX`, `CPU`, `GPU`), keeping its other settings."""
    _init(params).setdefault("backend", {})["backend_type"] = backend_type


def set_seeds(params: dict[str, Any], lora_init: int, data_order: int) -> None:
    """The LoRA initialisation seed, and the data order: shuffled, with seed `data_order`."""
    model_section(params)["sparse_lora"]["init_seed"] = lora_init
    loader = train_dataloader(params)
    loader["shuffle"] = True
    loader["shuffle_seed"] = data_order


def train_batch_size(params: dict[str, Any]) -> int:
    """The global batch size of the training loader."""
    return int(train_dataloader(params)["batch_size"])


def set_train_batch_size(params: dict[str, Any], batch_size: int) -> None:
    """The global batch size of the training loader."""
    train_dataloader(params)["batch_size"] = batch_size


def set_base_checkpoint(params: dict[str, Any], ckpt_path: str | None) -> None:
    """The CS checkpoint a `cszoo fit` run starts from (None: the params file's own, if any)."""
    if ckpt_path:
        _fit(params)["ckpt_path"] = ckpt_path


def ensure_callback(params: dict[str, Any], name: str) -> None:
    """Add `- <name>: {}` to the callbacks unless it is there."""
    callbacks = _init(params).setdefault("callbacks", [])
    if not any(isinstance(c, dict) and name in c for c in callbacks):
        callbacks.append({name: {}})
