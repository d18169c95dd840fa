"""One safetensors file as this package reads it: the header parsed, each tensor's bytes located.

A safetensors file is an 8-byte little-endian header length, a JSON header (`__metadata__`, a
string map, and per tensor its dtype, shape and `data_offsets` relative to the data section),
then the data. `read_header` parses it with the checks `safetensors.safe_open` makes (0.4.5),
so a truncated or corrupt file is one UserError naming the file wherever it is opened: the
header fits the file, the tensors' byte ranges are contiguous from the start of the data to the
end of the file, and each range is its dtype's size times its shape.

`read_bytes` reads one tensor's raw bytes (row-major, little-endian) with `os.preadv` into a
numpy buffer: the read releases the GIL, so a thread can read the next tensor while others
compute. Nothing here imports torch.

`DTYPES` is the one table of safetensors dtypes: their name in torch and numpy ("bfloat16", ...;
`getattr(torch, name)` is the torch dtype) and their size.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modelzoo_ext.errors import UserError

# safetensors dtype -> (torch's name, bytes per element): every dtype safetensors 0.4.5 writes.
DTYPES = {
    "BOOL": ("bool", 1),
    "U8": ("uint8", 1),
    "I8": ("int8", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "I16": ("int16", 2),
    "U16": ("uint16", 2),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I32": ("int32", 4),
    "U32": ("uint32", 4),
    "F32": ("float32", 4),
    "F64": ("float64", 8),
    "I64": ("int64", 8),
    "U64": ("uint64", 8),
}
MAX_HEADER_BYTES = 100_000_000  # safetensors refuses larger headers (HeaderTooLarge)


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


@dataclass(frozen=True)
class Header:
    """A parsed safetensors header: the tensors (name -> entry, in file order) and `__metadata__`."""

    path: Path
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]


def _corrupt(path: Path, what: str) -> UserError:
    return UserError(
        f"cannot read the weights file (truncated or corrupt: {what})",
        where=str(path),
        fix="re-download or re-save the checkpoint (safetensors), and check the disk is not full",
    )


def _header_json(path: Path) -> tuple[dict, int, int]:
    """(the header's JSON object, where the data starts, the file size)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _corrupt(path, "shorter than its 8-byte header length")
            length = int.from_bytes(prefix, "little")
            if length > min(size - 8, MAX_HEADER_BYTES):
                raise _corrupt(path, f"header length {length} exceeds the file size {size}")
            header = json.loads(f.read(length).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _corrupt(path, f"header is not JSON ({exc})") from exc
    except OSError as exc:
        raise _corrupt(path, str(exc)) from exc
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    return header, 8 + length, size


def _entry(path: Path, name: str, info, data_start: int) -> TensorEntry:
    try:
        dtype, itemsize = DTYPES[info["dtype"]]
        shape = tuple(int(d) for d in info["shape"])
        begin, end = (data_start + int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError) as exc:
        raise _corrupt(path, f"tensor {name!r} has an unreadable or unsupported entry {info!r}") from exc
    entry = TensorEntry(name, path, dtype, shape, begin, end)
    if min(shape, default=0) < 0 or entry.nbytes != entry.numel * itemsize:
        raise _corrupt(path, f"tensor {name!r} has byte range [{begin}, {end}) inconsistent with {info!r}")
    return entry


def read_header(path: str | Path) -> Header:
    """Parse and check a safetensors file's header (UserError naming the file when it is bad)."""
    path = Path(path)
    raw, data_start, size = _header_json(path)
    metadata = raw.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _corrupt(path, "__metadata__ is not a map of strings")
    entries = sorted(
        (_entry(path, name, info, data_start) for name, info in raw.items()), key=lambda e: (e.begin, e.end)
    )
    position = data_start
    for entry in entries:  # contiguous from the start of the data, as safetensors requires
        if entry.begin != position:
            raise _corrupt(path, f"tensor {entry.name!r} does not start where the previous one ends")
        position = entry.end
    if position != size:
        raise _corrupt(path, f"the tensors end at byte {position}, the file at {size}")
    return Header(path, {entry.name: entry for entry in entries}, metadata)


def read_bytes(entry: TensorEntry, out: np.ndarray | None = None) -> np.ndarray:
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
