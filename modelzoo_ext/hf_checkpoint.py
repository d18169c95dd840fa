"""A Hugging Face model directory, read tensor by tensor: a torch-free layout from the safetensors
headers, and a thin torch reader on top.

A 7B checkpoint is ~15 GB in bf16: nothing in this package loads a whole model to look at its
weights. `HFCheckpoint(directory)` finds the weight files (`model.safetensors`, or the shards
its index names) and parses each shard's header once (`safetensors_file.read_header`, the one
guarded open: a truncated or corrupt file is one UserError naming it), so a bad file stops a
command before it has computed or written anything. Everything else is answered from those
headers without torch: names, shapes, dtypes (`keys`, `shape`, `shapes`, `entry`), where each
tensor's bytes lie (`entries`, in reading order) and the bytes themselves (`read`: `os.preadv`
into a numpy buffer, which releases the GIL), so a torch-free command (`masks compute` with
magnitude scores) never imports torch.

The torch reader (`get`, `iter_tensors`) reads through safetensors' own torch reader
(`open_shard`: `safe_open(framework="pt")`, memory-mapped, guarded the same way), one tensor in
memory at a time, each shard opened once per pass; torch is imported there only.

transformers 5 stores Mixtral's experts fused (`mlp.experts.gate_up_proj` [E, 2I, H], ...; only
when saved with `save_original_format=False`). Such a checkpoint is shown under the per-expert
names of transformers 4.57 (`block_sparse_moe.experts.{e}.w1.weight`, via
`modelzoo_ext.name_map.hf_fused_parts`): every method sees one naming whichever way the file
stores the experts, and an expert's entry is its slice of the stored tensor (a contiguous byte
range), so `get` and `read` read only that slice. `stored_parts` tells the writers
(`masks apply`) which slice of a stored tensor a name is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors import safe_open

from modelzoo_ext.errors import UserError
from modelzoo_ext.families import family_of_hf_config
from modelzoo_ext.fingerprint import fingerprint_files
from modelzoo_ext.name_map import FusedPart, hf_fused_parts
from modelzoo_ext.safetensors_file import TensorEntry, read_bytes, read_header

if TYPE_CHECKING:
    import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
CONFIG_FILE = "config.json"


@contextlib.contextmanager
def open_shard(path: str | Path) -> Iterator:
    """`safe_open(path, framework="pt")` (imports torch) with unreadable files (truncated, corrupt,
    not safetensors) as one UserError."""
    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as exc:  # safetensors raises SafetensorError, OSError, ... for bad files
        raise UserError(
            f"cannot read the weights file (truncated or corrupt: {exc})",
            where=str(path),
            fix="re-download or re-save the checkpoint (safetensors), and check the disk is not full",
        ) from exc
    with handle as f:
        yield f


def read_json(path: Path, what: str) -> dict:
    """A JSON file of the model directory, as a dict (UserError when it is not valid JSON)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(
            f"cannot read {what} ({exc})", where=str(path), fix="re-download or re-save the checkpoint"
        ) from exc
    if not isinstance(data, dict):
        raise UserError(f"{what} is not a JSON object", where=str(path))
    return data


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
        self._stored = self._read_layout()  # stored tensor name -> its entry, in index (or file) order
        self._parts = self._fused_parts()  # per-expert name -> (stored name, index) of v5 tensors

    # ------------------------------------------------------------------ layout (no torch)

    def _read_layout(self) -> dict[str, TensorEntry]:
        index = self.directory / INDEX_FILE
        single = self.directory / SINGLE_FILE
        if index.exists():
            weight_map = read_json(index, INDEX_FILE).get("weight_map") or {}
            return self._indexed_entries(
                index, {key: self.directory / shard for key, shard in weight_map.items()}
            )
        if single.exists():
            return dict(read_header(single).tensors)
        if any((self.directory / name).exists() for name in PICKLE_FILES):
            raise UserError(
                "this checkpoint stores weights as pickle (.bin); pickle files are not loaded",
                where=str(self.directory),
                fix="re-save it as safetensors: AutoModelForCausalLM.from_pretrained(dir)"
                ".save_pretrained(out, safe_serialization=True)",
            )
        raise UserError(
            f"no weights: neither {SINGLE_FILE} nor {INDEX_FILE}",
            where=str(self.directory),
            fix="pass a Hugging Face model directory saved with safetensors (config.json alone is not a model)",
        )

    @staticmethod
    def _indexed_entries(index: Path, layout: dict[str, Path]) -> dict[str, TensorEntry]:
        """The entries the index places in each shard: every shard named exists, parses, and holds them."""
        missing = sorted({str(p) for p in layout.values() if not p.exists()})
        if missing:
            raise UserError(
                f"shards named in {INDEX_FILE} are missing: {missing}",
                where=str(index),
                fix="re-download or re-save the checkpoint",
            )
        headers = {shard: read_header(shard).tensors for shard in sorted(set(layout.values()))}
        for shard, tensors in headers.items():
            absent = sorted(key for key, s in layout.items() if s == shard and key not in tensors)
            if absent:
                raise UserError(
                    f"{len(absent)} tensors the index places in this shard are not in it: {absent[:5]}",
                    where=str(shard),
                    fix="re-download or re-save the checkpoint",
                )
        return {key: headers[shard][key] for key, shard in layout.items()}

    def _fused_parts(self) -> dict[str, FusedPart]:
        """The per-expert names of a transformers-5 MoE checkpoint's fused tensors (else empty)."""
        family = family_of_hf_config(self.config)
        if family is None or not family.has_experts:
            return {}
        parts: dict[str, FusedPart] = {}
        for key, entry in self._stored.items():
            parts.update(hf_fused_parts(key, entry.shape) or {})
        clash = sorted(set(parts) & set(self._stored))
        if clash:
            raise UserError(
                f"the checkpoint stores experts both per expert and fused (e.g. {clash[0]})",
                where=str(self.directory),
                fix="re-save it with one transformers version",
            )
        return parts

    @property
    def config(self) -> dict:
        """The model's config.json as a dict (empty when the file is absent)."""
        path = self.directory / CONFIG_FILE
        return read_json(path, CONFIG_FILE) if path.exists() else {}

    def require_config(self) -> dict:
        """The model's config.json as a dict (UserError when absent)."""
        if not (self.directory / CONFIG_FILE).is_file():
            raise UserError(
                f"{CONFIG_FILE} is missing", where=str(self.directory), fix="pass a HF model directory"
            )
        return self.config

    def keys(self) -> list[str]:
        """All tensor names (experts per expert, see the module docstring), sorted."""
        fused = {key for key, _ in self._parts.values()}
        return sorted([k for k in self._stored if k not in fused] + list(self._parts))

    def stored_parts(self, stored: str) -> dict[str, tuple]:
        """Name -> index into the stored tensor `stored`, for the per-expert names it holds
        (transformers 5 fused experts); {stored: ()} for a tensor stored under its own name."""
        found = {name: index for name, (key, index) in self._parts.items() if key == stored}
        return found or {stored: ()}

    def weight_files(self) -> list[Path]:
        """The safetensors files holding the weights."""
        return sorted({entry.shard for entry in self._stored.values()})

    def fingerprint(self) -> str:
        """The cheap fingerprint of the weight files (`modelzoo_ext.fingerprint`)."""
        return fingerprint_files(self.weight_files())

    def shards(self) -> dict[Path, list[str]]:
        """Shard file -> the stored tensor names it holds (in index order, or file order)."""
        grouped: dict[Path, list[str]] = {}
        for key, entry in self._stored.items():
            grouped.setdefault(entry.shard, []).append(key)
        return grouped

    def _stored_of(self, key: str) -> tuple[str, tuple]:
        """(stored name, index into it) of a tensor name (UserError for a name the checkpoint lacks)."""
        if key in self._parts:
            return self._parts[key]
        if key not in self._stored:
            raise UserError(
                f"tensor {key!r} is not in the checkpoint",
                where=str(self.directory),
                fix="check the tensor names (e.g. `model.layers.0.self_attn.q_proj.weight`)",
            )
        return key, ()

    def entry(self, key: str) -> TensorEntry:
        """Where one tensor's bytes lie, with its dtype and shape (an expert's: its slice)."""
        stored, index = self._stored_of(key)
        return _part_entry(self._stored[stored], key, index)

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of one tensor, from the shard header (no data loaded)."""
        return self.entry(key).shape

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """name -> shape for every tensor, from the headers."""
        return {key: self.shape(key) for key in self.keys()}

    def entries(self, keys: Iterable[str]) -> list[TensorEntry]:
        """The entries of `keys` in reading order: shard by shard (the index's order), by file offset."""
        order = {shard: i for i, shard in enumerate(self.shards())}
        found = [self.entry(key) for key in set(keys)]
        return sorted(found, key=lambda e: (order[e.shard], e.begin, e.name))

    def read(self, entry: TensorEntry, out: np.ndarray | None = None) -> np.ndarray:
        """One tensor's raw bytes (`safetensors_file.read_bytes`: uint8 [nbytes], into `out` when given)."""
        return read_bytes(entry, out)

    # ------------------------------------------------------------------ torch reader

    def get(self, key: str) -> torch.Tensor:
        """Load one tensor (of a fused transformers-5 tensor, only the slice it names)."""
        with open_shard(self.entry(key).shard) as f:
            return _read(f, *self._stored_of(key))

    def iter_tensors(self, keys: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) for `keys` (default: all) in reading order (`entries`), each shard
        opened once, one tensor in memory at a time."""
        entries = self.entries(self.keys() if keys is None else keys)
        for shard, in_shard in itertools.groupby(entries, key=lambda e: e.shard):
            with open_shard(shard) as f:
                for entry in in_shard:
                    yield entry.name, _read(f, *self._stored_of(entry.name))


def _read(handle, stored: str, index: tuple) -> torch.Tensor:
    """The tensor `stored` of an open shard, or only `stored[index]` (read from the file alone)."""
    if not index:
        return handle.get_tensor(stored)
    return handle.get_slice(stored)[index].contiguous()


def _indexed_shape(shape: tuple[int, ...], index: tuple) -> tuple[int, ...]:
    """The shape of `tensor[index]` for a tensor of `shape` (ints drop a dim, slices cut it)."""
    out = list(shape)
    for dim in reversed(range(len(index))):
        item = index[dim]
        if isinstance(item, int):
            del out[dim]
        else:
            out[dim] = len(range(*item.indices(shape[dim])))
    return tuple(out)


def _part_entry(entry: TensorEntry, name: str, index: tuple) -> TensorEntry:
    """The entry of `stored[index]`, named `name`, where index is () (the whole tensor, e.g. the
    renamed router) or (e,) or (e, slice(a, b)) of a row-major [E, R, C] tensor: bytes [e, a, 0]
    up to [e, b, 0], contiguous in the file."""
    if not index:
        return dataclasses.replace(entry, name=name)
    experts, rows, cols = entry.shape
    first, last = (0, rows) if len(index) == 1 else index[1].indices(rows)[:2]
    itemsize = entry.nbytes // entry.numel
    begin = entry.begin + (index[0] * rows + first) * cols * itemsize
    shape = _indexed_shape(entry.shape, index)
    return TensorEntry(name, entry.shard, entry.dtype, shape, begin, begin + (last - first) * cols * itemsize)
