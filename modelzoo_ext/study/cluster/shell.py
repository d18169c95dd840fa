"""The one way text reaches a job script: every literal is shell-quoted, expansions are named.

A job script is bash. Anything that came from a user (paths, run ids, the interpreter path) is
written through `quote` (POSIX single quotes: bash expands nothing inside them, newlines included).
The few values only known when the task runs (its array index, the first node of its allocation)
are written as `Var("name")`, which expands the named shell variable inside double quotes; the
names are ours, never user text.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

_SHELL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Var:
    """A shell variable (or `$((arithmetic))` expression) expanded when the script runs."""

    name: str

    def __post_init__(self) -> None:
        if not _SHELL_NAME.match(self.name):
            raise ValueError(f"not a shell variable name: {self.name!r}")

    def render(self) -> str:
        return f'"${{{self.name}}}"'


def quote(text: str) -> str:
    """`text` as one shell word that bash takes literally."""
    return shlex.quote(str(text))


def join(words: list[str]) -> str:
    """Literal words as a shell command line (each quoted)."""
    return shlex.join(str(w) for w in words)


def concat(*parts: str | Var) -> str:
    """One shell word made of literal text and variable expansions, e.g. for an `export` value.

    `concat("--rdzv-endpoint=", Var("head_node"), ":29500")` -> `'--rdzv-endpoint='"${head_node}"':29500'`.
    """
    return "".join(p.render() if isinstance(p, Var) else quote(p) for p in parts if p != "")
