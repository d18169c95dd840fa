"""`sparse-lora train` and `sparse-lora parity`.

Heavy imports (torch, transformers, h5py) happen inside the handlers so `--help` stays fast.
"""

from __future__ import annotations

import argparse


def _train(args: argparse.Namespace) -> int:
    from gpu_reference.train import run_train

    return run_train(args)


def _parity(args: argparse.Namespace) -> int:
    from gpu_reference.parity import run_parity

    return run_parity(args)


def register(subparsers: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    """Add this stage's subcommands to `sparse-lora`."""
    from gpu_reference.train_args import add_train_arguments

    train = subparsers.add_parser(
        "train",
        help="train sparse LoRA with the pure-PyTorch reference trainer (GPU or CPU; torchrun for DDP)",
        description="Read the same params_sparse_lora*.yaml and HDF5 data as the Cerebras run and train "
        "the HF model with the shared sparse-LoRA kernels. Same as `python -m gpu_reference.train`.",
    )
    add_train_arguments(train)
    train.set_defaults(func=_train)

    parity = subparsers.add_parser(
        "parity",
        help="compare the per-step losses of a Cerebras (cszoo fit) run and a gpu_reference run",
        description="Align both loss curves by step, print a table, write a PNG of both curves, and print "
        "the largest relative difference as the last line; exit status 1 above --rtol.",
    )
    parity.add_argument(
        "--cs-run",
        required=True,
        metavar="DIR",
        help="the ModelZoo model_dir (tensorboard events under train/)",
    )
    parity.add_argument(
        "--gpu-run", required=True, metavar="DIR", help="the gpu_reference run directory (metrics.jsonl)"
    )
    parity.add_argument(
        "--rtol", type=float, default=1e-4, help="largest allowed relative difference [default: 1e-4]"
    )
    parity.add_argument("--plot", metavar="PNG", help="where to write the plot [default: GPU_RUN/parity.png]")
    parity.set_defaults(func=_parity)
