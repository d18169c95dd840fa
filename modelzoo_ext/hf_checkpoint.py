"""Tensor-by-tensor, read-only access to a Hugging Face model directory: the one reader of HF weights.

A 7B checkpoint is ~15 GB in bf16: nothing in this package loads a whole model to look at its
weights. `HFCheckpoint` opens shards with `safetensors.safe_open` (memory-mapped) and hands out
one tensor at a time, grouped by shard so each shard is opened once per pass.

transformers 5 stores Mixtral's experts fused (`mlp.experts.gate_up_proj` [E, 2I, H], ...; only
when saved with `save_original_format=False`). Such a checkpoint is shown under the per-expert
names of transformers 4.57 (`block_sparse_moe.experts.{e}.w1.weight`, via
`modelzoo_ext.name_map.hf_fused_parts`): `keys`, `shape`, `get` and `iter_tensors` see one
naming whichever way the file stores the experts, and `get` reads only that expert's slice.
`stored_parts` tells the writers (`masks apply`) which slice of a stored tensor a name is.

Every shard is opened through `open_shard`, the one guarded open: a truncated or corrupt file
(safetensors checks that its header and data fit the file) becomes a UserError naming the file,
and every shard is opened once when the checkpoint is constructed, so a bad file stops a command
before it has computed or written anything.

`entries()` and `read()` give the same tensors without torch: the location of each tensor's
bytes from the safetensors header, read with `os.preadv` into a numpy buffer (the read releases
the GIL, so a thread can read the next tensor while others compute), so a torch-free command
(`masks compute` with magnitude scores) does not pay torch's import. Header-only questions
(keys, shapes, dtypes) open shards with the numpy framework for the same reason.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors import safe_open

from modelzoo_ext.errors import UserError
from modelzoo_ext.families import family_of_hf_config
from modelzoo_ext.fingerprint import fingerprint_files
from modelzoo_ext.name_map import FusedPart, hf_fused_parts

if TYPE_CHECKING:
    import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
CONFIG_FILE = "config.json"


@contextlib.contextmanager
def open_shard(path: str | Path, framework: str = "pt") -> Iterator:
    """`safe_open(path, framework)` with unreadable files (truncated, corrupt, not safetensors) as
    one UserError. framework="numpy" for header-only work (keys, shapes, dtypes): no torch import."""
    try:
        handle = safe_open(str(path), framework=framework)
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
        self.key_to_shard = self._read_layout()  # stored tensor names -> shard
        self._parts = self._fused_parts()  # per-expert name -> (stored name, index) of v5 tensors

    def _read_layout(self) -> dict[str, Path]:
        index = self.directory / INDEX_FILE
        single = self.directory / SINGLE_FILE
        if index.exists():
            weight_map = read_json(index, INDEX_FILE).get("weight_map") or {}
            layout = {key: self.directory / shard for key, shard in weight_map.items()}
            missing = sorted({str(p) for p in layout.values() if not p.exists()})
            if missing:
                raise UserError(
                    f"shards named in {INDEX_FILE} are missing: {missing}",
                    where=str(index),
                    fix="re-download or re-save the checkpoint",
                )
            for shard in sorted(set(layout.values())):
                self._check_shard(shard, [k for k, s in layout.items() if s == shard])
            return layout
        if single.exists():
            with open_shard(single, framework="numpy") as f:
                return {key: single for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
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

    def _fused_parts(self) -> dict[str, FusedPart]:
        """The per-expert names of a transformers-5 MoE checkpoint's fused tensors (else empty)."""
        family = family_of_hf_config(self.config)
        if family is None or not family.has_experts:
            return {}
        parts: dict[str, FusedPart] = {}
        for shard, keys in self.shards().items():
            with open_shard(shard) as f:
                for key in keys:
                    found = hf_fused_parts(key, tuple(f.get_slice(key).get_shape()))
                    parts.update(found or {})
        clash = sorted(set(parts) & set(self.key_to_shard))
        if clash:
            raise UserError(
                f"the checkpoint stores experts both per expert and fused (e.g. {clash[0]})",
                where=str(self.directory),
                fix="re-save it with one transformers version",
            )
        return parts

    def stored_parts(self, stored: str) -> dict[str, tuple]:
        """Name -> index into the stored tensor `stored`, for the per-expert names it holds
        (transformers 5 fused experts); {stored: ()} for a tensor stored under its own name."""
        found = {name: index for name, (key, index) in self._parts.items() if key == stored}
        return found or {stored: ()}

    @staticmethod
    def _check_shard(shard: Path, indexed: list[str]) -> None:
        """The shard opens, and holds every tensor the index places in it."""
        with open_shard(shard, framework="numpy") as f:
            absent = sorted(set(indexed) - set(f.keys()))
        if absent:
            raise UserError(
                f"{len(absent)} tensors the index places in this shard are not in it: {absent[:5]}",
                where=str(shard),
                fix="re-download or re-save the checkpoint",
            )

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
        return sorted([k for k in self.key_to_shard if k not in fused] + list(self._parts))

    def weight_files(self) -> list[Path]:
        """The safetensors files holding the weights."""
        return sorted(set(self.key_to_shard.values()))

    def fingerprint(self) -> str:
        """The cheap fingerprint of the weight files (`modelzoo_ext.fingerprint`)."""
        return fingerprint_files(self.weight_files())

    def describe(self) -> dict:
        """What files derived from this checkpoint record about it: the name and revision its
        config.json gives, its directory, and the fingerprint the provenance checks compare."""
        config = self.config
        return {
            "name": config.get("_name_or_path") or self.directory.name,
            "revision": config.get("_commit_hash") or config.get("transformers_version"),
            "directory": str(self.directory.resolve()),
            "model_type": config.get("model_type"),
            "fingerprint": self.fingerprint(),
        }

    def shards(self) -> dict[Path, list[str]]:
        """Shard file -> the stored tensor names it holds (in file order of first appearance)."""
        grouped: dict[Path, list[str]] = {}
        for key, shard in self.key_to_shard.items():
            grouped.setdefault(shard, []).append(key)
        return grouped

    def _stored(self, key: str) -> tuple[str, tuple]:
        """(stored name, index into it) of a tensor name."""
        self._require(key)
        return self._parts.get(key, (key, ()))

    def _require(self, key: str) -> Path:
        if key in self._parts:
            return self.key_to_shard[self._parts[key][0]]
        if key not in self.key_to_shard:
            raise UserError(
                f"tensor {key!r} is not in the checkpoint",
                where=str(self.directory),
                fix="check the tensor names (e.g. `model.layers.0.self_attn.q_proj.weight`)",
            )
        return self.key_to_shard[key]

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of one tensor, read from the shard header (no data loaded)."""
        stored, index = self._stored(key)
        with open_shard(self._require(key), framework="numpy") as f:
            return _indexed_shape(tuple(f.get_slice(stored).get_shape()), index)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """name -> shape for every tensor, reading each shard's header once."""
        stored_shapes = {}
        for shard, keys in self.shards().items():
            with open_shard(shard, framework="numpy") as f:
                for key in keys:
                    stored_shapes[key] = tuple(f.get_slice(key).get_shape())
        return {
            key: _indexed_shape(stored_shapes[s], index)
            for key in self.keys()
            for s, index in [self._stored(key)]
        }

    def dtype_name(self, key: str) -> str:
        """The safetensors dtype of one tensor ("BF16", "F32", ...), from the header."""
        with open_shard(self._require(key), framework="numpy") as f:
            return f.get_slice(self._stored(key)[0]).get_dtype()

    def get(self, key: str) -> torch.Tensor:
        """Load one tensor (of a fused transformers-5 tensor, only the slice it names)."""
        with open_shard(self._require(key)) as f:
            return _read(f, *self._stored(key))

    def iter_tensors(self, keys: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) for `keys` (default: all), shard by shard, one tensor in memory at a time."""
        wanted = sorted(set(self.keys() if keys is None else keys))
        by_shard: dict[Path, list[str]] = {}
        for key in wanted:
            by_shard.setdefault(self._require(key), []).append(key)
        order = {key: i for i, key in enumerate(self.key_to_shard)}  # file order within a shard
        for shard in self.shards():
            selected = sorted(by_shard.get(shard, []), key=lambda k: (order[self._stored(k)[0]], k))
            if not selected:
                continue
            with open_shard(shard) as f:
                for key in selected:
                    yield key, _read(f, *self._stored(key))

    def entries(self, keys: Iterable[str]) -> list[TensorEntry]:
        """Where each of `keys` lies on disk, in reading order: shard by shard, by file offset.
        A per-expert name of a fused transformers-5 tensor is its slice (a contiguous range)."""
        wanted = set(keys)
        by_shard: dict[Path, list[str]] = {}
        for key in sorted(wanted):
            by_shard.setdefault(self._require(key), []).append(key)
        located = []
        for shard in self.shards():  # the index's shard order
            if shard in by_shard:
                header = read_safetensors_header(shard)
                found = [
                    _part_entry(header[self._stored(k)[0]], k, self._stored(k)[1]) for k in by_shard[shard]
                ]
                located += sorted(found, key=lambda e: e.begin)
        return located

    def read(self, entry: TensorEntry, out: np.ndarray | None = None) -> np.ndarray:
        """One tensor's raw bytes (uint8 [nbytes], row-major, little-endian) read with `os.preadv`
        (into `out`, a uint8 array of exactly `entry.nbytes`, when given)."""
        buffer = np.empty(entry.nbytes, dtype=np.uint8) if out is None else out
        if buffer.dtype != np.uint8 or buffer.size != entry.nbytes:
            raise ValueError(f"out must be uint8 [{entry.nbytes}], got {buffer.dtype} [{buffer.size}]")
        view = memoryview(buffer)
        done = 0
        with open(entry.shard, "rb", buffering=0) as f:
            while done < entry.nbytes:
                got = os.preadv(f.fileno(), [view[done:]], entry.begin + done)
                if got == 0:
                    raise UserError(
                        f"shard ends inside tensor {entry.name!r} (truncated file)",
                        where=str(entry.shard),
                        fix="re-download or re-save the checkpoint",
                    )
                done += got
        return buffer


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


def _read(handle, stored: str, index: tuple) -> torch.Tensor:
    """The tensor `stored` of an open shard, or only `stored[index]` (read from the file alone)."""
    if not index:
        return handle.get_tensor(stored)
    return handle.get_slice(stored)[index].contiguous()


def _part_entry(entry: TensorEntry, name: str, index: tuple) -> TensorEntry:
    """The entry of `stored[index]` where index is (e,) or (e, slice(a, b)) of a row-major
    [E, R, C] tensor: bytes [e, a, 0] up to [e, b, 0], contiguous in the file."""
    if not index:
        return entry
    experts, rows, cols = entry.shape
    first, last = (0, rows) if len(index) == 1 else index[1].indices(rows)[:2]
    itemsize = entry.nbytes // entry.numel
    begin = entry.begin + (index[0] * rows + first) * cols * itemsize
    shape = _indexed_shape(entry.shape, index)
    return TensorEntry(name, entry.shard, entry.dtype, shape, begin, begin + (last - first) * cols * itemsize)


# safetensors dtype -> (torch dtype name, bytes per element)
SAFETENSORS_DTYPES = {
    "BF16": ("bfloat16", 2),
    "F16": ("float16", 2),
    "F32": ("float32", 4),
    "F64": ("float64", 8),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "I16": ("int16", 2),
    "I32": ("int32", 4),
    "I64": ("int64", 8),
    "BOOL": ("bool", 1),
}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes lie: shard file, [begin, end) absolute offsets, dtype and shape."""

    name: str
    shard: Path
    dtype: str  # torch's name: "bfloat16", "float32", ...
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


def read_safetensors_header(path: str | Path) -> dict[str, TensorEntry]:
    """Parse a safetensors header (8-byte little-endian length, then JSON) into `TensorEntry`s.

    Checked: the header fits the file, each tensor's byte range lies inside the data section
    and matches its dtype and shape; anything else is a corrupt or truncated shard.
    """
    path = Path(path)

    def corrupt(what: str) -> UserError:
        return UserError(
            f"not a valid safetensors file: {what}", where=str(path), fix="re-download or re-save it"
        )

    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise corrupt("shorter than its 8-byte header length")
        length = int.from_bytes(prefix, "little")
        if length > size - 8:
            raise corrupt(f"header length {length} exceeds the file size {size}")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise corrupt(f"header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    data_start, entries = 8 + length, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, itemsize = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (data_start + int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise corrupt(f"tensor {name!r} has an unreadable or unsupported entry {info!r}") from exc
        entry = TensorEntry(name, path, dtype, shape, begin, end)
        if not (data_start <= begin <= end <= size) or entry.nbytes != entry.numel * itemsize:
            raise corrupt(f"tensor {name!r} has byte range [{begin}, {end}) inconsistent with {info!r}")
        entries[name] = entry
    return entries
