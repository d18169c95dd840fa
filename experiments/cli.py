"""Subcommands of this stage (filled in by its issue)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    """Add this stage's subcommands to `sparse-lora`."""
