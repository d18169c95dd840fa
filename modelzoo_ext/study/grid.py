"""The runs a sweep plans: exactly the points its YAML lists, and the baselines, each once.

    fine-tunes    model x task x (method, structure) x sparsity x mode x backend x seed, where
                  an N:M structure takes its own sparsity (1 - N/M) instead of the list's, and
                  sparsity 0 is not a sparse fine-tune (it is the dense-LoRA baseline below);
    dense LoRA    model x task x backend x seed: plain LoRA on the dense model (sparsity 0), once;
    no fine-tune  model x task x (method, structure) x sparsity (and the dense model): the masks
                  alone, evaluated once per seed only where the seed changes the masks (random
                  and data-aware methods), else once.

A run's seed sets everything random in it (`derived_seeds`): the LoRA initialisation, the data
order, the masks of random and data-aware methods, and the trainer's RNG (dropout). The values
are derived at plan time and written into the run's params and record.
"""

from __future__ import annotations

import hashlib
import itertools
from typing import Any

from modelzoo_ext.study.sweep_spec import SweepSpec

SEEDED_METHODS = ("random", "wanda", "gradient", "taylor")  # masks depend on the seed
DATA_DRIVEN = ("wanda", "gradient", "taylor")  # masks depend on the task's training data
SEED_ROLES = {
    "lora_init": "sparse_lora.init_seed: the LoRA A initialisation of every layer",
    "data_order": "train_dataloader.shuffle_seed: the order of the training examples (shuffle on)",
    "masks": "masks compute --seed: random scores, and which calibration samples data-aware methods use",
    "trainer": "trainer.init.seed: the trainer's RNG (LoRA dropout)",
}


def derived_seeds(seed: int) -> dict[str, int]:
    """The per-role seeds of sweep seed `seed`: sha256(f"{seed}:{role}") read as a 31-bit integer."""
    return {
        role: int.from_bytes(hashlib.sha256(f"{seed}:{role}".encode()).digest()[:4], "little") & 0x7FFFFFFF
        for role in SEED_ROLES
    }


def sparsity_tag(sparsity: float) -> str:
    """0.5 -> `s50` (run ids and asset names)."""
    return f"s{round(sparsity * 100):02d}"


def run_id_of(model, task, method, structure, sparsity, mode, backend, seed) -> str:
    """`model__task__method__structure__sXX__mode__backend__seedN` (`2:4` written `2of4`)."""
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


def _sparsity_of(structure: str, sparsity: float) -> float:
    from modelzoo_ext.masks.select import Structure

    fixed = Structure.parse(structure).fixed_sparsity
    return fixed if fixed is not None else sparsity


def _mask_points(spec: SweepSpec) -> list[tuple[str, str, float]]:
    """(method, structure, sparsity) of every sparse point, N:M at its own sparsity, each once."""
    points = {
        (method, structure, _sparsity_of(structure, s))
        for (method, structure), s in itertools.product(spec.method_structures, spec.sparsities)
    }
    return sorted(p for p in points if p[2] > 0.0)


def _run(model, task, method, structure, sparsity, mode, backend, seed) -> dict[str, Any]:
    run = dict(model=model, task=task, method=method, structure=structure, sparsity=sparsity, mode=mode,
               backend=backend, seed=seed)  # fmt: skip
    run["run_id"] = run_id_of(**run)
    return run


def fine_tunes(spec: SweepSpec) -> list[dict[str, Any]]:
    return [
        _run(m, t, me, st, sp, mo, b, se)
        for m, t, (me, st, sp), mo, b, se in itertools.product(
            spec.models, spec.tasks, _mask_points(spec), spec.modes, spec.backends, spec.seeds
        )
    ]


def dense_lora(spec: SweepSpec) -> list[dict[str, Any]]:
    if not spec.baselines.dense_lora:
        return []
    return [
        _run(m, t, "dense", "dense", 0.0, "lora", b, se)
        for m, t, b, se in itertools.product(spec.models, spec.tasks, spec.backends, spec.seeds)
    ]


def no_finetune(spec: SweepSpec) -> list[dict[str, Any]]:
    if not spec.baselines.no_finetune:
        return []
    runs = [
        _run(m, t, "dense", "dense", 0.0, "none", "eval", 0)
        for m, t in itertools.product(spec.models, spec.tasks)
    ]
    for m, t, (method, structure, sparsity) in itertools.product(spec.models, spec.tasks, _mask_points(spec)):
        seeds = spec.seeds if method in SEEDED_METHODS else spec.seeds[:1]
        runs += [_run(m, t, method, structure, sparsity, "none", "eval", se) for se in seeds]
    return runs


def grid(spec: SweepSpec) -> list[dict[str, Any]]:
    """Every run of the sweep (fine-tunes, then the baselines), each with its `run_id` and `seeds`."""
    runs = fine_tunes(spec) + dense_lora(spec) + no_finetune(spec)
    for run in runs:
        run["seeds"] = {"sweep": run["seed"], **derived_seeds(run["seed"])}
    return runs
