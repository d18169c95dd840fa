"""Seeds that vary: one sweep seed reproduces a reference run bit for bit; another changes the LoRA
initialisation and the data order (what `grid.derived_seeds` writes into a run's params)."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file
from test_gpu_reference_train import assets, losses, write_params  # noqa: F401, F811  (assets: a fixture)

from gpu_reference.data import global_batches
from gpu_reference.model import load_hf_model
from gpu_reference.train import train
from modelzoo_ext.run_config import SparseLoRAConfig
from modelzoo_ext.run_config import trainer_yaml as rc
from modelzoo_ext.sparse_lora import apply_sparse_lora_, lora_state_dict
from modelzoo_ext.study.grid import derived_seeds


def _params_for_seed(assets, seed: int, name: str) -> Path:  # noqa: F811
    path = write_params(assets, name, mode="sparse_to_dense", max_steps=3, batch_size=4)
    params = yaml.safe_load(path.read_text())
    seeds = derived_seeds(seed)
    rc.set_seeds(params, lora_init=seeds["lora_init"], data_order=seeds["data_order"])
    params["trainer"]["init"]["seed"] = seeds["trainer"]
    path.write_text(yaml.safe_dump(params))
    return path


def _run(assets, seed: int, name: str) -> Path:  # noqa: F811
    return train(
        _params_for_seed(assets, seed, name), assets["hf"], assets["root"] / name, "cpu", progress=False
    )


def test_a_seed_reproduces_bit_for_bit_and_another_changes_init_and_order(assets):  # noqa: F811
    first, again, other = _run(assets, 0, "seed0_a"), _run(assets, 0, "seed0_b"), _run(assets, 1, "seed1")
    a, b, c = (load_file(run / "lora.safetensors") for run in (first, again, other))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    assert losses(first) == losses(again)
    assert losses(first) != losses(other)
    initial = {}
    for seed in (0, 1):  # another LoRA initialisation...
        config = yaml.safe_load(_params_for_seed(assets, seed, f"i{seed}").read_text())["trainer"]["init"][
            "model"
        ]
        model = load_hf_model(assets["hf"])
        apply_sparse_lora_(
            model,
            SparseLoRAConfig(**{**config["sparse_lora"], "dense_baseline": True, "mask_path": None}),
            {},
        )
        initial[seed] = {k: v for k, v in lora_state_dict(model).items() if k.endswith("lora_A.weight")}
    assert not any(torch.equal(initial[0][k], initial[1][k]) for k in initial[0])
    orders = {}
    for seed in (0, 1):  # ...and another data order
        loader = yaml.safe_load(_params_for_seed(assets, seed, f"o{seed}").read_text())["trainer"]["fit"][
            "train_dataloader"
        ]
        batches = global_batches(24, loader["batch_size"], loader["shuffle"], loader["shuffle_seed"])
        orders[seed] = [next(batches) for _ in range(3)]
    assert orders[0] != orders[1]
