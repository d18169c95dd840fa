"""`make tiny-assets`: everything `model_configs/params_sparse_lora_tiny*.yaml` needs, under one folder.

    python -m modelzoo_ext.study.tiny_assets --out build/tiny
    python -m modelzoo_ext.study.tiny_assets --out build/tiny_mixtral --family mixtral

writes (each item atomically):

    build/tiny/hf/                      tiny random HF Llama (2 layers, hidden 64, GQA 4/2 heads),
                                        pruned: its targeted weights are zero off the mask
    build/tiny/masks_hf.safetensors     50% per-tensor magnitude masks of the 14 targeted linears (HF naming)
    build/tiny/cs/model.mdl             the same weights as a CS checkpoint (`mask_converters`'
                                        `convert_hf_to_cs`: ModelZoo naming, q/k rows permuted),
                                        with its provenance record
    build/tiny/data/train/*.h5          fine-tuning samples in ModelZoo's HDF5 layout (N, 3, msl)

The tiny YAMLs' `model:` section matches `modelzoo_ext.tiny_models.tiny_config("llama")`; the GPU
reference trainer reads the same `hf/`, mask file and data, which is what its parity test uses.
`--family mixtral` writes the same for the tiny Mixtral (4 experts, top-2; masks on attention and
on every expert's w1/w2/w3, never the router) that `params_sparse_lora_tiny_mixtral*.yaml` use.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch

from modelzoo_ext.atomic import atomic_dir
from modelzoo_ext.data.hdf5 import write_samples
from modelzoo_ext.hf_checkpoint import HFCheckpoint
from modelzoo_ext.masks.format import save_masks
from modelzoo_ext.masks.provenance import source_record
from modelzoo_ext.masks.select import kept_count

FAMILY = "llama"
TARGET_SUFFIXES = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "w1",
    "w2",
    "w3",
)
SPARSITY = 0.5
MAX_SEQ_LENGTH = 32
NUM_SAMPLES = 8
PROMPT_TOKENS = 4


def magnitude_masks(state: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """Per-tensor magnitude masks (exact kept counts) of the targeted linear weights [out, in]."""
    masks = {}
    for name, weight in state.items():
        module = name.rsplit(".", 2)[-2] if name.endswith(".weight") else ""
        if module in TARGET_SUFFIXES:
            kept = kept_count(weight.numel(), sparsity)
            order = torch.argsort(
                weight.abs().flatten(), descending=True, stable=True
            )  # ties: earliest first
            mask = torch.zeros(weight.numel(), dtype=torch.bool)
            mask[order[:kept]] = True
            masks[name] = mask.reshape(weight.shape)
    return masks


def write_hf_model(
    out_dir: Path, sparsity: float, seed: int, tokenizer_from: Path | None = None, family: str = FAMILY
) -> tuple[dict[str, torch.Tensor], dict]:
    """Save a tiny random HF model pruned by its magnitude masks; returns (masks, config dict)."""
    from safetensors.torch import load_file, save_file

    from modelzoo_ext.tiny_models import save_tiny_model

    with atomic_dir(out_dir) as tmp:
        save_tiny_model(tmp, family, seed=seed, tokenizer_from=tokenizer_from)
        weights_file = tmp / "model.safetensors"
        state = load_file(weights_file)
        masks = magnitude_masks(state, sparsity)
        for name, mask in masks.items():
            state[name] = state[name] * mask  # a pruned model: zero exactly off the mask
        save_file(state, weights_file, metadata={"format": "pt"})
        config = json.loads((tmp / "config.json").read_text())
    return masks, config


def training_samples(vocab_size: int, seed: int) -> np.ndarray:
    """int32 [N, 3, msl]: counting sequences with a per-sample stride (learnable), loss on all but the prompt."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(100, vocab_size - 1000, size=NUM_SAMPLES)
    strides = rng.integers(1, 7, size=NUM_SAMPLES)
    tokens = starts[:, None] + strides[:, None] * np.arange(MAX_SEQ_LENGTH + 1)[None, :]
    loss_mask = np.ones((NUM_SAMPLES, MAX_SEQ_LENGTH), dtype=np.int32)
    loss_mask[:, :PROMPT_TOKENS] = 0
    return np.stack([tokens[:, :-1], loss_mask, tokens[:, 1:]], axis=1).astype(np.int32)


def make_tiny_assets(
    out: str | Path,
    *,
    sparsity: float = SPARSITY,
    seed: int = 0,
    tokenizer_from: str | Path | None = None,
    family: str = FAMILY,
) -> dict[str, Path]:
    """Write the tiny HF model, mask file, CS checkpoint and HDF5 data under `out`; returns their paths.

    `tokenizer_from`: a folder with saved tokenizer files to copy (saves building the tokenizer).
    """
    from mask_converters.hf_to_cs import CHECKPOINT_NAME, convert_hf_to_cs

    out = Path(out)
    paths = {
        "hf": out / "hf",
        "masks": out / "masks_hf.safetensors",
        "cs_checkpoint": out / "cs" / CHECKPOINT_NAME,
        "data": out / "data" / "train",
    }
    masks, hf_config = write_hf_model(paths["hf"], sparsity, seed, tokenizer_from, family)
    # The saved model is already pruned by these masks (W*M == W): they describe it, so it is their source.
    save_masks(
        paths["masks"],
        masks,
        {
            "method": "magnitude",
            "structure": "unstructured",
            "scope": "per_tensor",
            "sparsity": sparsity,
            "source_model": source_record(HFCheckpoint(paths["hf"])),
            "seed": seed,
        },
        naming="hf",
    )
    # The base checkpoint without masks: the run takes them from the mask file (HF naming, converted on the fly).
    convert_hf_to_cs(paths["hf"], paths["cs_checkpoint"].parent, family)
    with atomic_dir(paths["data"]) as tmp:
        write_samples(tmp / "data-0.h5", training_samples(hf_config["vocab_size"], seed))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m modelzoo_ext.study.tiny_assets",
        description="Write the tiny model, masks, CS checkpoint and data the tiny ModelZoo configs use.",
    )
    parser.add_argument("--out", default="build/tiny", help="output folder (default: build/tiny)")
    parser.add_argument("--sparsity", type=float, default=SPARSITY, help="mask sparsity (default 0.5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random model and data")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    parser.add_argument("--family", default=FAMILY, choices=("llama", "mixtral"), help="tiny model family")
    args = parser.parse_args(argv)
    if Path(args.out).exists() and any(Path(args.out).iterdir()):
        if not args.force:
            print(f"{args.out} exists; nothing written (pass --force to rebuild)")
            return 0
        shutil.rmtree(args.out)
    for key, path in make_tiny_assets(
        args.out, sparsity=args.sparsity, seed=args.seed, family=args.family
    ).items():
        print(f"{key:>14}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
