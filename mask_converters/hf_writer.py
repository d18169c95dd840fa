"""Write a HF model's tensors as safetensors shards, one shard in memory at a time.

Same layout as `save_pretrained`: `model.safetensors` when everything fits in one shard,
otherwise `model-0000i-of-0000N.safetensors` plus `model.safetensors.index.json`.
The directory is the caller's temporary one (`atomic_dir`); shards are written as
`.shard-N.safetensors` and get their final names (and the index) in `close()`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from modelzoo_ext.errors import UserError

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


def parse_size(text: str) -> int:
    """'5GB', '200MB', '500KB' or a byte count -> bytes."""
    units = {"KB": 1024, "MB": 1024**2, "GB": 1024**3}
    text = text.strip().upper()
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    if text.isdigit():
        return int(text)
    raise UserError(f"cannot read the size {text!r}", fix="write e.g. 5GB, 200MB or 500KB")


class ShardedSafetensorsWriter:
    """`add(name, tensor)` tensors, then `close()`; a shard is flushed when it reaches `max_shard_bytes`."""

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor (copied to contiguous CPU memory)."""
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().contiguous().cpu()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = self.out_dir / f".shard-{len(self._shards) + 1:05d}.safetensors"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[Path]:
        """Write the last shard, give shards their final names (and the index); returns the files."""
        if self._pending:
            self._flush()
        if not self._shards:
            raise UserError("no tensors to write", where=str(self.out_dir))
        if len(self._shards) == 1:
            final = self.out_dir / "model.safetensors"
            self._shards[0][0].rename(final)
            return [final]
        count = len(self._shards)
        weight_map, files = {}, []
        for index, (path, names) in enumerate(self._shards, start=1):
            final = self.out_dir / f"model-{index:05d}-of-{count:05d}.safetensors"
            path.rename(final)
            files.append(final)
            weight_map.update(dict.fromkeys(names, final.name))
        index_doc = {
            "metadata": {"total_size": self.total_bytes},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index_doc, indent=2) + "\n")
        return files
