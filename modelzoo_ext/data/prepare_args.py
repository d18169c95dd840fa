"""Command-line arguments of `sparse-lora data prepare` (no heavy imports: `--help` stays fast)."""

from __future__ import annotations

import argparse

from modelzoo_ext.data.split import DEFAULT_HELD_OUT_FRACTION, DEFAULT_SALT
from modelzoo_ext.data.templates import TASKS


def add_prepare_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of `sparse-lora data prepare`."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--input",
        metavar="JSONL",
        help="prompt/completion JSONL (keys 'prompt', 'completion', optional 'id')",
    )
    src.add_argument("--task", choices=TASKS, help="a task rendered through its versioned template")
    p.add_argument(
        "--source",
        default="bundled",
        help="for --task: 'hub', a data directory in the hub datasets' schema (DIR/<task>/<split>.jsonl|"
        ".parquet, a save_to_disk folder, or a DatasetDict; see docs/data.md), or 'bundled' (the "
        "offline copy of the evaluation split) [default: bundled]",
    )
    p.add_argument(
        "--protocol",
        choices=("official", "offline"),
        help="official: --split train is the task's training split, heldout its whole evaluation "
        "split; offline: both are parts of the evaluation split (--held-out-fraction, --split-salt) "
        "[default: official for hub or a directory, offline for bundled]",
    )
    p.add_argument("--tokenizer", required=True, metavar="HF_DIR", help="a Hugging Face tokenizer directory")
    p.add_argument(
        "--max-seq-length", type=int, required=True, metavar="N", help="sequence length of the samples"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (written atomically)")
    p.add_argument(
        "--split",
        choices=("train", "heldout", "all"),
        default="train",
        help="train: what fine-tuning reads; heldout: what evaluation scores; all: the whole "
        "evaluation split (offline protocol) [default: train]",
    )
    p.add_argument(
        "--held-out-fraction",
        type=float,
        default=DEFAULT_HELD_OUT_FRACTION,
        metavar="F",
        help=f"offline protocol: fraction of the evaluation split held out [default: {DEFAULT_HELD_OUT_FRACTION}]",
    )
    p.add_argument(
        "--split-salt",
        default=DEFAULT_SALT,
        metavar="SALT",
        help="salt of the split's hash: another salt gives another, equally deterministic split; "
        f"evaluate with the same `sparse-lora eval --split-salt` [default: {DEFAULT_SALT}]",
    )
