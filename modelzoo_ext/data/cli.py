"""`sparse-lora data prepare` (no heavy imports at module level: `--help` stays fast)."""

from __future__ import annotations

import argparse


def _prepare(args: argparse.Namespace) -> int:
    from modelzoo_ext.data.prepare import run_prepare

    return run_prepare(args)


def register(subparsers: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    """Add `data prepare` to `sparse-lora`."""
    from modelzoo_ext.data.prepare_args import add_prepare_arguments

    if "data" not in groups:
        data = subparsers.add_parser("data", help="prepare fine-tuning data (ModelZoo's HDF5 layout)")
        groups["data"] = data.add_subparsers(dest="data_command", metavar="COMMAND", required=True)
    prepare = groups["data"].add_parser(
        "prepare",
        help="tokenize prompt/completion JSONL or BoolQ/HellaSwag/GSM8K into ModelZoo's fine-tuning HDF5",
        description="Write the HDF5 layout GptHDF5MapDataProcessor reads (data: [N, 3, msl] int32 = "
        "input_ids, loss mask, labels), with lm-eval's prompt templates and a deterministic "
        "train/held-out split by sha256 of each example's key.",
    )
    add_prepare_arguments(prepare)
    prepare.set_defaults(func=_prepare)
