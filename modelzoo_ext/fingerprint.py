"""A cheap fingerprint of a checkpoint's weight files, for the provenance checks at every run start.

Hashing a 16 GB checkpoint costs seconds to minutes per run; the question asked at run start is
only "is this the checkpoint the masks were made for (or its pruned output)?". The fingerprint
answers it from well under a megabyte of reads:

- safetensors files (HF checkpoints): the header (every tensor's name, dtype, shape and offsets)
  and, for every tensor, three 256-byte windows of its data (start, middle, end). Two checkpoints
  of one architecture with other weights differ in every tensor; a pruned checkpoint differs
  from its source in every pruned tensor; a tensor edited after the fact changes its windows.
- other files (a CS `.mdl`): the first 64 KiB and 256 windows of 4 KiB spread over the file.

It is not a commitment to every byte: a change confined to a few weights between the windows goes
unseen. The full per-weight checksums in a mask file are (`sparse-lora masks validate --model`).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable
from pathlib import Path

FINGERPRINT_SCHEME = "sparse-lora-fingerprint/v1"
TENSOR_WINDOW = 256
FILE_HEAD = 64 * 1024
FILE_WINDOW = 4096
FILE_WINDOWS = 256


def _safetensors_header(f) -> tuple[bytes, int] | None:
    """(header bytes, start of the data) of an open safetensors file, or None when it is not one."""
    raw = f.read(8)
    if len(raw) < 8:
        return None
    (length,) = struct.unpack("<Q", raw)
    header = f.read(length)
    return (header, 8 + length) if len(header) == length else None


def _tensor_windows(header: bytes, data_start: int) -> list[int]:
    """Offsets of three windows per tensor (start, middle, end of its data), in header order."""
    offsets = []
    for name, entry in json.loads(header).items():
        if name == "__metadata__":
            continue
        begin, end = (data_start + o for o in entry["data_offsets"])
        if end > begin:
            last = max(begin, end - TENSOR_WINDOW)
            offsets += [begin, begin + (last - begin) // 2, last]
    return offsets


def _file_windows(size: int) -> list[int]:
    """Start offsets of evenly spread windows after the head, the last one ending at the file's end."""
    if size <= FILE_HEAD:
        return []
    last = size - FILE_WINDOW
    return [FILE_HEAD + (last - FILE_HEAD) * i // (FILE_WINDOWS - 1) for i in range(FILE_WINDOWS)]


def _digest_file(path: Path, digest) -> None:
    size = path.stat().st_size
    digest.update(f"\0{path.name}\0{size}\0".encode())
    with open(path, "rb") as f:
        parsed = _safetensors_header(f) if path.suffix == ".safetensors" else None
        if parsed is not None:
            header, data_start = parsed
            digest.update(header)
            reads = [(o, TENSOR_WINDOW) for o in _tensor_windows(header, data_start)]
        else:
            f.seek(0)
            digest.update(f.read(FILE_HEAD))
            reads = [(o, FILE_WINDOW) for o in _file_windows(size)]
        for offset, length in reads:
            f.seek(offset)
            digest.update(f.read(length))


def fingerprint_files(files: Iterable[str | Path]) -> str:
    """`<scheme>:<32 hex>` over the files (order-independent: sorted by name)."""
    digest = hashlib.blake2b(FINGERPRINT_SCHEME.encode(), digest_size=16)
    for path in sorted((Path(f) for f in files), key=lambda p: p.name):
        _digest_file(path, digest)
    return f"{FINGERPRINT_SCHEME}:{digest.hexdigest()}"
