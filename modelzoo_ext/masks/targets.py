"""Which weights get a mask: the target rule.

By default the attention and MLP projections of Llama/Mistral/Mixtral decoders are pruned
(q, k, v, o, gate, up, down; Mixtral experts w1, w2, w3). Embeddings, norms, `lm_head` and the
MoE router (`block_sparse_moe.gate`) never match the default. `--include REGEX` replaces the
default pattern, `--exclude REGEX` removes matches; the rule used is recorded in every mask file
(`TargetRule.describe()`), so `validate` can check that each targeted tensor has its mask.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from modelzoo_ext.errors import UserError

# Parameter names as Hugging Face writes them, e.g. `model.layers.0.self_attn.q_proj.weight`,
# `model.layers.3.block_sparse_moe.experts.7.w2.weight`.
DEFAULT_INCLUDE = (
    r"\.layers\.\d+\.("
    r"self_attn\.(q|k|v|o)_proj"
    r"|mlp\.(gate|up|down)_proj"
    r"|block_sparse_moe\.experts\.\d+\.w[123]"
    r")\.weight$"
)


def _compile(pattern: str, option: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise UserError(f"invalid regular expression {pattern!r}: {exc}", where=option) from exc


@dataclass(frozen=True)
class TargetRule:
    """Tensor names matching `include` (default: decoder projections) and not matching `exclude`."""

    include: str | None = None
    exclude: str | None = None

    def __post_init__(self) -> None:
        _compile(self.include_pattern, "--include")
        if self.exclude:
            _compile(self.exclude, "--exclude")

    @property
    def include_pattern(self) -> str:
        return self.include or DEFAULT_INCLUDE

    def matches(self, name: str) -> bool:
        """True when the rule targets the tensor `name` (regexes use `re.search`)."""
        if not re.search(self.include_pattern, name):
            return False
        return not (self.exclude and re.search(self.exclude, name))

    def select(self, shapes: dict[str, tuple[int, ...]], *, where: str) -> list[str]:
        """Sorted targeted names among `shapes` (name -> shape); every one must be a 2-D weight."""
        names = sorted(name for name in shapes if self.matches(name))
        if not names:
            raise UserError(
                f"the target rule matched no tensor ({self.describe()})",
                where=where,
                fix="check --include/--exclude against the checkpoint's tensor names",
            )
        not_2d = [name for name in names if len(shapes[name]) != 2]
        if not_2d:
            raise UserError(
                f"targeted tensors must be 2-D weights [out, in]; these are not: {not_2d[:5]}",
                where=where,
                fix="narrow --include or add --exclude for them",
            )
        return names

    def missing(self, names: Iterable[str], masked: Iterable[str]) -> list[str]:
        """Targeted names among `names` that have no mask in `masked`."""
        masked = set(masked)
        return sorted(name for name in names if self.matches(name) and name not in masked)

    def describe(self) -> dict[str, Any]:
        """JSON-able record of the rule (stored in the mask file's metadata)."""
        return {"include": self.include_pattern, "exclude": self.exclude, "default": self.include is None}

    @classmethod
    def from_metadata(cls, record: dict[str, Any] | None) -> TargetRule | None:
        """The rule recorded by `describe()`, or None when the file records none."""
        if not record:
            return None
        include = None if record.get("default") else record.get("include")
        return cls(include=include, exclude=record.get("exclude"))
