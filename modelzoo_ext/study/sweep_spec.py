"""The sweep YAML: a grid of runs (models x tasks x methods x structures x sparsities x modes x
backends x seeds) plus the baselines, the data split, the evaluation and the launch settings.

See `modelzoo_ext/study/examples/sweep_tiny.yaml` and `sweep_phoenix_360.yaml`. Unknown keys are errors;
relative paths are resolved against the YAML file's folder.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from modelzoo_ext.data.split import DEFAULT_SALT
from modelzoo_ext.errors import UserError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    hf_dir: str = Field(description="Hugging Face model directory")
    params: str = Field(description="base run config (ModelZoo trainer layout) for this model")
    cs_checkpoint: str | None = Field(None, description="CS checkpoint of the base model (cs3 backend)")


class DataSpec(_Strict):
    # The bundled evaluation sets, split by `data prepare` (training) and `eval` (held-out) with the
    # same fraction and salt, so both sides agree by construction.
    source: Literal["bundled"] = "bundled"
    held_out_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    split_salt: str = DEFAULT_SALT
    max_seq_length: int = Field(256, gt=1)


class TrainSpec(_Strict):
    max_steps: int | None = Field(None, gt=0)
    batch_size: int | None = Field(None, gt=0)


class EvalSpec(_Strict):
    tasks: list[str] | None = Field(None, description="default: the task the run fine-tunes on")
    limit: int | None = Field(None, gt=0)
    max_gen_toks: int | None = Field(None, gt=0)
    batch_size: int = 8
    device: str = "cpu"


class CS3Spec(_Strict):
    cszoo: str = "cszoo"
    num_csx: int = 1
    mount_dirs: list[str] = []
    python_paths: list[str] = []
    extra_args: list[str] = []


class GPUSpec(_Strict):
    nproc_per_node: int = 1


class BaselineSpec(_Strict):
    dense_lora: bool = True
    no_finetune: bool = True


class SweepSpec(_Strict):
    name: str
    models: dict[str, ModelSpec]
    tasks: list[Literal["boolq", "hellaswag", "gsm8k"]]
    methods: list[str]
    structures: list[str] = ["unstructured"]
    scope: Literal["layer", "global"] = "layer"
    sparsities: list[float]
    modes: list[Literal["s2s", "s2d"]]
    backends: list[Literal["cs3", "gpu", "cpu"]]
    seeds: list[int] = [0]
    baselines: BaselineSpec = BaselineSpec()
    data: DataSpec = DataSpec()
    train: TrainSpec = TrainSpec()
    eval: EvalSpec = EvalSpec()
    cs3: CS3Spec = CS3Spec()
    gpu: GPUSpec = GPUSpec()


def load_sweep(path: str | Path) -> SweepSpec:
    """Parse and validate a sweep YAML; relative paths are resolved against its folder."""
    path = Path(path)
    if not path.is_file():
        raise UserError("sweep file not found", where=str(path))
    raw = yaml.safe_load(path.read_text())
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise UserError(
            f"sweep file: {first['msg']}", where=f"{path}: {'.'.join(map(str, first['loc']))}"
        ) from exc
    for s in spec.sparsities:
        if not 0.0 <= s < 1.0:
            raise UserError(f"sparsity {s} is outside [0, 1)", where=f"{path}: sparsities")
    base = path.parent.resolve()
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
    return spec.model_copy(update={"models": models})


# -- planning -------------------------------------------------------------------------------------
def sparsity_tag(sparsity: float) -> str:
    """0.5 -> `s50` (run ids and asset names)."""
    return f"s{round(sparsity * 100):02d}"


def run_id_of(model, task, method, structure, sparsity, mode, backend, seed) -> str:
    parts = [
        model,
        task,
        method,
        structure.replace(":", "of"),
        sparsity_tag(sparsity),
        mode,
        backend,
        f"seed{seed}",
    ]
    return "__".join(str(p) for p in parts)


def grid(spec: SweepSpec) -> list[dict[str, Any]]:
    """Every run of the sweep: the fine-tune grid, then the baselines (dense LoRA, no fine-tune)."""
    runs = [
        dict(model=m, task=t, method=me, structure=st, sparsity=sp, mode=mo, backend=b, seed=se)
        for m, t, me, st, sp, mo, b, se in itertools.product(
            spec.models,
            spec.tasks,
            spec.methods,
            spec.structures,
            spec.sparsities,
            spec.modes,
            spec.backends,
            spec.seeds,
        )
    ]
    if spec.baselines.dense_lora:
        runs += [
            dict(
                model=m,
                task=t,
                method="dense",
                structure="dense",
                sparsity=0.0,
                mode="lora",
                backend=b,
                seed=se,
            )
            for m, t, b, se in itertools.product(spec.models, spec.tasks, spec.backends, spec.seeds)
        ]
    if spec.baselines.no_finetune:  # evaluation only: one per mask (and the dense model), no backend
        levels = sorted({0.0, *spec.sparsities})
        runs += [
            dict(model=m, task=t, method=me if sp > 0 else "dense", structure=st if sp > 0 else "dense",
                 sparsity=sp, mode="none", backend="eval", seed=0)
            for m, t, me, st, sp in itertools.product(spec.models, spec.tasks, spec.methods, spec.structures, levels)
        ]  # fmt: skip
        unique = {run_id_of(**r): r for r in runs}
        runs = list(unique.values())
    for run in runs:
        run["run_id"] = run_id_of(**run)
    return runs
