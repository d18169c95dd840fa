"""Checksums of tensors and masks, written as `algorithm:hex` so every value names its algorithm.

- `blake3` (the default since mask format version 2): a cryptographic hash, ~4 GB/s on one core
  here, so hashing every source weight costs a fraction of reading it from disk.
- `sha256`: mask format version 1 recorded bare sha256 hex digests; files written then are
  still read and verified (`from_v1` turns their values into `sha256:hex`).

Why not xxh3-128 (~6x faster still)? It is not collision-resistant: anyone can make a
different checkpoint with the same xxh3 digest, and these checksums are what `masks apply` and
`masks validate --model` trust to say "these are the weights the masks were computed for".
BLAKE3 keeps that guarantee at a cost well below the read (docs/masks.md has the numbers).

Whole files (a mask file, an imported source) are named by their bare sha256 hex digest
(`file_sha256`), as the provenance records and the run registry have always stored them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import blake3
import numpy as np

from modelzoo_ext.errors import UserError

DEFAULT = "blake3"
ALGORITHMS = ("blake3", "sha256")


def _hasher(algorithm: str):
    if algorithm == "blake3":
        return blake3.blake3()
    if algorithm == "sha256":
        return hashlib.sha256()
    raise UserError(
        f"unknown checksum algorithm {algorithm!r}",
        fix=f"this tool knows {ALGORITHMS}; upgrade modelzoo-sparse-lora if the file is newer",
    )


def digest(data: Any, algorithm: str = DEFAULT) -> str:
    """`algorithm:hex` of a bytes-like object (a contiguous numpy array is hashed without a copy)."""
    hasher = _hasher(algorithm)
    hasher.update(data)  # blake3 and hashlib release the GIL on large buffers
    return f"{algorithm}:{hasher.hexdigest()}"


def array_checksum(array: np.ndarray, algorithm: str = DEFAULT) -> str:
    """Checksum of an array's raw bytes in row-major order, whatever its dtype."""
    return digest(np.ascontiguousarray(array).reshape(-1).view(np.uint8), algorithm)


def file_sha256(path: str | Path) -> str:
    """The sha256 hex digest of a file's bytes, streamed (`hashlib.file_digest`)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def tensor_checksum(tensor: Any, algorithm: str = DEFAULT) -> str:
    """Checksum of a torch tensor's (or numpy array's) raw bytes, row-major: equal for equal bytes."""
    if isinstance(tensor, np.ndarray):
        return array_checksum(tensor, algorithm)
    import torch  # a torch tensor was given, so torch is loaded already

    flat = tensor.detach().contiguous().reshape(-1).cpu()
    return digest(flat.view(torch.uint8).numpy(), algorithm)  # buffer protocol: no copy


def algorithm_of(checksum: str) -> str:
    """The algorithm named by `algorithm:hex` (a UserError for a malformed or unknown one)."""
    algorithm, sep, hexdigest = checksum.partition(":")
    if not sep or algorithm not in ALGORITHMS or not hexdigest:
        raise UserError(
            f"malformed or unknown checksum {checksum[:40]!r}",
            fix=f"checksums are written as one of {ALGORITHMS} followed by ':' and hex digits",
        )
    return algorithm


def from_v1(hexdigest: str | None) -> str | None:
    """A format-version-1 value (bare sha256 hex) as `sha256:hex`."""
    return None if hexdigest is None else f"sha256:{hexdigest}"


def matches(checksum: str, data: Any) -> bool:
    """True when `data` (numpy array or torch tensor) hashes to `checksum` under its algorithm."""
    algorithm = algorithm_of(checksum)
    return tensor_checksum(data, algorithm) == checksum
