"""`sparse-lora`: the one console command, with a subcommand per pipeline stage.

The top layer of the package (docs/layers.md): it imports each stage's command module, and
nothing imports it. Each command module exposes `register(subparsers, groups)`; it adds its
subcommands and sets `func` on each parser. `groups` lets a module add subcommands to a group
another module created (e.g. `masks hf-to-cs` lives with the converters). Command modules import
heavy libraries inside their handlers, so `sparse-lora --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys

from gpu_reference import cli as reference_trainer_cli
from mask_converters import cli as converters_cli
from modelzoo_ext import __version__
from modelzoo_ext.cerebras import cli as modelzoo_cli
from modelzoo_ext.data import cli as data_cli
from modelzoo_ext.errors import UserError
from modelzoo_ext.masks import cli as masks_cli
from modelzoo_ext.study import cli as study_cli
from modelzoo_ext.study.cluster import cli as cluster_cli
from modelzoo_ext.study.preflight import cli as preflight_cli

# Order matters: a module may extend a group registered by an earlier one.
COMMAND_MODULES = (
    masks_cli,  # masks compute|validate|apply|import
    converters_cli,  # convert hf-to-cs|cs-to-hf, masks hf-to-cs|cs-to-hf, validate
    modelzoo_cli,  # install-hook, modelzoo status
    data_cli,  # data prepare
    reference_trainer_cli,  # train, parity
    study_cli,  # eval, sweep plan|run|eval|assets|status, report, demo
    preflight_cli,  # preflight, sweep preflight
    cluster_cli,  # sweep submit|cancel (SLURM / PBS job arrays)
)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (all subcommands registered)."""
    parser = argparse.ArgumentParser(
        prog="sparse-lora",
        description="Prune LLMs, fine-tune them with sparse-to-dense or sparse-to-sparse LoRA on "
        "Cerebras ModelZoo or GPUs, convert between Hugging Face and Cerebras formats, and evaluate.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for module in COMMAND_MODULES:
        module.register(subparsers, groups)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, dispatch, and turn `UserError` into one line on stderr and exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        status = args.func(args)
    except UserError as exc:
        print(f"sparse-lora: error: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("sparse-lora: interrupted; no partial output was kept under a final name", file=sys.stderr)
        return 130
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
