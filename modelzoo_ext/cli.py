"""`sparse-lora`: the one console command, with a subcommand per pipeline stage.

Each stage's module exposes `register(subparsers, groups)`; it adds its subcommands and sets
`func` on each parser. `groups` lets a module add subcommands to a group another module created
(e.g. `masks hf-to-cs` lives with the converters). Command modules import heavy libraries
inside their handlers, so `sparse-lora --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from modelzoo_ext import __version__
from modelzoo_ext.errors import UserError

# Order matters: a module may extend a group registered by an earlier one.
COMMAND_MODULES = (
    "modelzoo_ext.masks.cli",  # masks compute|validate|apply|import
    "mask_converters.cli",  # convert hf-to-cs|cs-to-hf, masks hf-to-cs|cs-to-hf, validate
    "modelzoo_ext.cerebras.cli",  # install-hook, modelzoo status
    "gpu_reference.cli",  # train, data prepare, parity
    "experiments.cli",  # eval, sweep plan|run|status, report, demo
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
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers, groups)
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
