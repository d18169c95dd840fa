"""Tensor-by-tensor, read-only access to a Hugging Face model directory.

A 7B checkpoint is ~15 GB in bf16: nothing in this package loads a whole model to look at its
weights. `HFCheckpoint` opens shards with `safetensors.safe_open` (memory-mapped) and hands out
one tensor at a time, grouped by shard so each shard is opened once per pass.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from modelzoo_ext.errors import UserError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


class HFCheckpoint:
    """A Hugging Face model directory with safetensors weights (one file, or shards + index)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise UserError(
                "model directory not found",
                where=str(self.directory),
                fix="pass a Hugging Face model directory (config.json + *.safetensors)",
            )
        self.key_to_shard = self._read_layout()

    def _read_layout(self) -> dict[str, Path]:
        index = self.directory / INDEX_FILE
        single = self.directory / SINGLE_FILE
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            layout = {key: self.directory / shard for key, shard in weight_map.items()}
            missing = sorted({str(p) for p in layout.values() if not p.exists()})
            if missing:
                raise UserError(
                    f"shards named in {INDEX_FILE} are missing: {missing}",
                    where=str(index),
                    fix="re-download or re-save the checkpoint",
                )
            return layout
        if single.exists():
            with safe_open(str(single), framework="pt") as f:
                return {key: single for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        if any((self.directory / name).exists() for name in PICKLE_FILES):
            raise UserError(
                "this checkpoint stores weights as pickle (.bin); pickle files are not loaded",
                where=str(self.directory),
                fix="re-save it as safetensors: AutoModelForCausalLM.from_pretrained(dir)"
                ".save_pretrained(out, safe_serialization=True)",
            )
        raise UserError(
            f"no {SINGLE_FILE} or {INDEX_FILE}",
            where=str(self.directory),
            fix="pass a Hugging Face model directory saved with safetensors",
        )

    @property
    def config(self) -> dict:
        """The model's config.json as a dict (empty when the file is absent)."""
        path = self.directory / "config.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def keys(self) -> list[str]:
        """All tensor names, sorted."""
        return sorted(self.key_to_shard)

    def shards(self) -> dict[Path, list[str]]:
        """Shard file -> the tensor names it holds (in file order of first appearance)."""
        grouped: dict[Path, list[str]] = {}
        for key, shard in self.key_to_shard.items():
            grouped.setdefault(shard, []).append(key)
        return grouped

    def _require(self, key: str) -> Path:
        if key not in self.key_to_shard:
            raise UserError(
                f"tensor {key!r} is not in the checkpoint",
                where=str(self.directory),
                fix="check the tensor names (e.g. `model.layers.0.self_attn.q_proj.weight`)",
            )
        return self.key_to_shard[key]

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of one tensor, read from the shard header (no data loaded)."""
        with safe_open(str(self._require(key)), framework="pt") as f:
            return tuple(f.get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        """Load one tensor."""
        with safe_open(str(self._require(key)), framework="pt") as f:
            return f.get_tensor(key)

    def iter_tensors(self, keys: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) for `keys` (default: all), shard by shard, one tensor in memory at a time."""
        wanted = set(self.keys() if keys is None else keys)
        for key in wanted:
            self._require(key)
        for shard, shard_keys in self.shards().items():
            selected = [k for k in shard_keys if k in wanted]
            if not selected:
                continue
            with safe_open(str(shard), framework="pt") as f:
                for key in selected:
                    yield key, f.get_tensor(key)
