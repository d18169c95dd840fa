"""The mask file: one definition, read and written only here.

A safetensors file (no pickle) holding one uint8 tensor per masked weight: the boolean mask
[out, in] flattened row-major and bit-packed, 1 bit per weight (numpy `packbits`,
little-endian bit order; True = kept). The header's `__metadata__["sparse_lora_masks"]` is a
JSON document:

    {
      "format": "sparse-lora-masks", "format_version": 2,
      "naming": "hf" | "cs",                 # whose parameter names the keys are
      "tensors": {name: {"shape": [out, in], "numel": n, "kept": k, "sparsity": s,
                         "mask_checksum": "blake3:<hex>",                 # of the packed bytes
                         "source_checksum": "blake3:<hex>" | "sha256:<hex>" | null}},
      "achieved_sparsity": s,                # over all tensors in the file
      ... provenance given by the writer (method, structure, scope, target rule, seed,
          requested sparsity, calibration, source model, tool version, creation time) ...
      "metadata_sha256": hex                 # over the canonical JSON of everything above
    }

Every checksum names its algorithm (`checksum.py`): this tool writes BLAKE3; a source checksum
carried over from an older file keeps its sha256. The metadata digest stays sha256: the header
is small, and other stages record it as the file's identity.

Format version 1 (files written before BLAKE3) is still read and verified: its tensors hold
`mask_sha256` / `source_sha256` (bare sha256 hex); `MaskFile.mask_checksum()` and
`source_checksum()` give both versions as `algorithm:hex`.

Every mask's packed bytes and the metadata itself carry a checksum, so a single flipped bit
anywhere in the file is detected when it is read. Reading and writing need numpy only;
`MaskFile.get` returns a torch tensor (torch is imported then). Writing holds one mask at a
time (`MaskWriter` spools them to disk).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from safetensors import safe_open

from modelzoo_ext.atomic import atomic_file
from modelzoo_ext.errors import UserError
from modelzoo_ext.masks import checksum

if TYPE_CHECKING:
    import torch

FORMAT_NAME = "sparse-lora-masks"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
METADATA_KEY = "sparse_lora_masks"
NAMINGS = ("hf", "cs")
# Metadata entries `MaskWriter.write` computes itself; everything else is provenance.
_RECOMPUTED_KEYS = {
    "format", "format_version", "naming", "tensors", "achieved_sparsity", "metadata_sha256", "created",
}  # fmt: skip


def tool_version() -> str:
    """This package's version string (recorded in every file it writes)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("modelzoo-sparse-lora")
    except PackageNotFoundError:
        return "unknown"


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 (bare hex) of a tensor's raw bytes (row-major), whatever its dtype."""
    return checksum.tensor_checksum(tensor, "sha256").removeprefix("sha256:")


def pack_bits(mask: np.ndarray) -> np.ndarray:
    """Bool array of any shape -> uint8 [ceil(numel / 8)], 1 bit per element, little-endian bits."""
    return np.packbits(mask.reshape(-1), bitorder="little")


def unpack_bits(packed: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of `pack_bits`: uint8 [ceil(numel / 8)] -> bool array of `shape`."""
    numel = int(np.prod(shape)) if shape else 1
    return np.unpackbits(packed, count=numel, bitorder="little").view(bool).reshape(shape)


def _as_bool_array(mask) -> np.ndarray:
    """A numpy bool array from a numpy array or a torch tensor; anything else is refused."""
    if not isinstance(mask, np.ndarray):
        mask = mask.detach().contiguous().cpu().numpy()
    if mask.dtype != np.bool_:
        raise UserError(f"masks must be bool, got {mask.dtype}", fix="pass `weight != 0` or a bool tensor")
    return mask


@dataclass(frozen=True)
class PackedMask:
    """One mask ready for the file: packed bits, shape, kept count and checksum of the packed bytes.

    Made where the mask is computed (e.g. a worker thread), then handed to `MaskWriter.add_packed`.
    """

    packed: np.ndarray
    shape: tuple[int, ...]
    kept: int
    checksum: str

    @classmethod
    def of_packed(cls, packed: np.ndarray, shape: tuple[int, ...], kept: int) -> PackedMask:
        """From bits packed like `pack_bits` and their count (known exactly where they were set)."""
        return cls(packed, tuple(shape), kept, checksum.array_checksum(packed))

    @classmethod
    def of(cls, mask) -> PackedMask:
        """Pack a bool mask (numpy array or torch tensor) and count what it keeps."""
        mask = _as_bool_array(mask)
        packed = pack_bits(mask)
        kept = int(np.count_nonzero(mask))
        return cls(packed, tuple(mask.shape), kept, checksum.array_checksum(packed))


def _safetensors_header(sizes: dict[str, int], metadata: dict[str, str]) -> bytes:
    """The bytes before the data of a safetensors file of 1-D uint8 tensors (`sizes`: name ->
    bytes), as safetensors' serializer writes them: 8-byte little-endian header length, the JSON
    header (`__metadata__`, then the tensors in name order with contiguous data offsets) padded
    with spaces to a multiple of 8. The data follows in name order."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name in sorted(sizes):
        header[name] = {"dtype": "U8", "shape": [sizes[name]], "data_offsets": [offset, offset + sizes[name]]}
        offset += sizes[name]
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    encoded += b" " * (-len(encoded) % 8)
    return len(encoded).to_bytes(8, "little") + encoded


def _metadata_digest(metadata: dict[str, Any]) -> str:
    body = {k: v for k, v in metadata.items() if k != "metadata_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class MaskWriter:
    """Collects masks one tensor at a time (packed at once, 1 bit per weight) and writes the file atomically.

    Lifecycle:
        with MaskWriter("masks.safetensors", naming="hf", metadata={"method": "magnitude", ...}) as w:
            w.add("model.layers.0.self_attn.q_proj.weight", mask, source_checksum=...)
        # the file appears on a clean exit; an exception leaves nothing under the name

    Memory holds one mask at a time: each packed mask goes to an anonymous spool file beside the
    output as it is added, and `write` assembles the safetensors file from it (Mixtral-8x7B's
    masks are 5.6 GB packed, more than the bound of `masks compute`'s peak memory): byte for
    byte what `safetensors.numpy.save_file` writes (`tests/test_masks_format.py`). `write_to`
    writes to a temporary path the caller renames (several files committed together).
    """

    def __init__(self, path: str | Path, *, naming: str, metadata: dict[str, Any] | None = None) -> None:
        if naming not in NAMINGS:
            raise UserError(f"unknown mask naming {naming!r}", fix=f"use one of {NAMINGS}")
        self.path = Path(path)
        self.naming = naming
        self.metadata = dict(metadata or {})
        self.tensors: dict[str, dict[str, Any]] = {}
        self._spooled: dict[str, tuple[int, int]] = {}  # name -> (offset in the spool, bytes)
        self._spool = None  # opened on the first add, beside the output (same file system)

    def _spool_file(self):
        if self._spool is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".spool", dir=self.path.parent)
            os.unlink(name)  # anonymous: gone with the writer, whatever happens
            self._spool = os.fdopen(fd, "w+b")
        return self._spool

    def add(
        self,
        name: str,
        mask,
        *,
        source_checksum: str | None = None,
        source_sha256: str | None = None,
    ) -> None:
        """Add one mask (bool numpy array or torch tensor, True = kept) under its parameter name.

        `source_checksum` (`algorithm:hex`) identifies the weight the mask was computed for;
        `source_sha256` (bare hex) is the same for callers that hold a sha256.
        """
        if source_sha256 is not None:
            if source_checksum is not None:
                raise ValueError("pass source_checksum or source_sha256, not both")
            source_checksum = checksum.from_v1(source_sha256)
        self.add_packed(name, PackedMask.of(mask), source_checksum=source_checksum)

    def add_packed(self, name: str, mask: PackedMask, *, source_checksum: str | None = None) -> None:
        """Add a mask packed by `PackedMask.of` (the cheap part, for the thread that writes)."""
        if name in self.tensors:
            raise UserError(f"mask {name!r} added twice", where=str(self.path))
        if source_checksum is not None:
            checksum.algorithm_of(source_checksum)
        spool = self._spool_file()
        self._spooled[name] = (spool.seek(0, os.SEEK_END), mask.packed.size)
        spool.write(memoryview(np.ascontiguousarray(mask.packed)))
        numel = int(np.prod(mask.shape)) if mask.shape else 1
        self.tensors[name] = {
            "shape": list(mask.shape),
            "numel": numel,
            "kept": mask.kept,
            "sparsity": 1.0 - mask.kept / max(numel, 1),
            "mask_checksum": mask.checksum,
            "source_checksum": source_checksum,
        }

    def write(self) -> dict[str, Any]:
        """Write the file (temporary name, then rename) and return its metadata."""
        metadata = self._file_metadata()
        with atomic_file(self.path) as tmp:
            self._write_file(tmp, metadata)
        return metadata

    def write_to(self, target: Path) -> dict[str, Any]:
        """Write the file to `target` (a temporary path the caller renames onto `path`, e.g. with
        `atomic.atomic_files`) and return its metadata."""
        metadata = self._file_metadata()
        self._write_file(target, metadata)
        return metadata

    def _file_metadata(self) -> dict[str, Any]:
        if not self.tensors:
            raise UserError(
                "no masks to write", where=str(self.path), fix="check the target rule matched tensors"
            )
        numel = sum(t["numel"] for t in self.tensors.values())
        kept = sum(t["kept"] for t in self.tensors.values())
        metadata = {
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "tool_version": tool_version(),
            **self.metadata,
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "naming": self.naming,
            "achieved_sparsity": 1.0 - kept / numel,
            "tensors": self.tensors,
        }
        metadata["metadata_sha256"] = _metadata_digest(metadata)
        return metadata

    def _write_file(self, target: Path, metadata: dict[str, Any]) -> None:
        """The safetensors file from the spool, then the spool dropped."""
        sizes = {name: size for name, (_, size) in self._spooled.items()}
        with open(target, "wb") as out:
            out.write(_safetensors_header(sizes, {METADATA_KEY: json.dumps(metadata, sort_keys=True)}))
            for name in sorted(self._spooled):
                start, size = self._spooled[name]
                self._spool.seek(start)
                _copy_bytes(self._spool, out, size)
        self.close()

    def close(self) -> None:
        """Drop the spool (the written file, if any, stays)."""
        if self._spool is not None:
            self._spool.close()
        self._spool, self._spooled = None, {}

    def __enter__(self) -> MaskWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.write()
        self.close()


def _copy_bytes(source, target, size: int, chunk: int = 1 << 24) -> None:
    """Copy `size` bytes from `source`'s position to `target`, 16 MiB at a time."""
    while size:
        data = source.read(min(chunk, size))
        if not data:
            raise UserError("the mask spool file ended early", fix="check the disk is not full")
        target.write(data)
        size -= len(data)


class MaskFile:
    """Lazy reader: metadata at once, each mask only when asked for (checksum verified on read)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError("mask file not found", where=str(self.path), fix="check the path")
        if self.path.suffix in (".pt", ".pth", ".bin", ".pkl", ".npz"):
            raise UserError(
                f"{self.path.suffix} is not a mask file of this tool",
                where=str(self.path),
                fix="bring it in with `sparse-lora masks import`",
            )
        try:
            self._handle = safe_open(str(self.path), framework="numpy")
            raw = (self._handle.metadata() or {}).get(METADATA_KEY)
            self.metadata: dict[str, Any] = json.loads(raw) if raw is not None else {}
        except Exception as exc:  # safetensors raises several types for truncated/corrupt files
            raise UserError(
                f"cannot read mask file (truncated or corrupt: {exc})",
                where=str(self.path),
                fix="recompute it with `sparse-lora masks compute`",
            ) from exc
        self._check_metadata()

    def _check_metadata(self) -> None:
        meta = self.metadata
        if meta.get("format") != FORMAT_NAME:
            raise UserError(
                "not a sparse-lora mask file (no mask metadata in the header)",
                where=str(self.path),
                fix="bring foreign masks in with `sparse-lora masks import`",
            )
        if meta.get("format_version") not in READABLE_VERSIONS:
            raise UserError(
                f"mask format version {meta.get('format_version')} is not supported (this tool reads "
                f"{', '.join(map(str, READABLE_VERSIONS))})",
                where=str(self.path),
                fix="upgrade modelzoo-sparse-lora",
            )
        if meta.get("metadata_sha256") != _metadata_digest(meta):
            raise UserError(
                "mask file metadata checksum mismatch (the header was modified or corrupted)",
                where=str(self.path),
                fix="recompute the masks",
            )
        on_disk = set(self._handle.keys())
        declared = set(meta["tensors"])
        if on_disk != declared:
            raise UserError(
                f"tensors in the file differ from its metadata: {sorted(on_disk ^ declared)[:10]}",
                where=str(self.path),
                fix="recompute the masks",
            )

    @property
    def naming(self) -> str:
        """'hf' or 'cs': whose parameter names the keys are."""
        return self.metadata["naming"]

    def require_naming(self, naming: str, user: str) -> MaskFile:
        """This file, when its keys are in `naming`; a UserError saying how to convert it otherwise.

        `user`: who needs that naming (for the message), e.g. "the reference trainer"."""
        if self.naming != naming:
            command = "cs-to-hf" if naming == "hf" else "hf-to-cs"
            raise UserError(
                f"{user} needs masks in {naming.upper()} naming; this file is in {self.naming.upper()} naming",
                where=str(self.path),
                fix=f"convert it with `sparse-lora masks {command}` first",
            )
        return self

    def keys(self) -> list[str]:
        """Masked parameter names, sorted."""
        return sorted(self.metadata["tensors"])

    def __contains__(self, name: str) -> bool:
        return name in self.metadata["tensors"]

    def __len__(self) -> int:
        return len(self.metadata["tensors"])

    @property
    def version(self) -> int:
        """The file's format version (1: sha256 checksums; 2: checksums name their algorithm)."""
        return self.metadata["format_version"]

    def info(self, name: str) -> dict[str, Any]:
        """Per-tensor metadata as stored: shape, numel, kept, sparsity and checksums."""
        if name not in self:
            raise UserError(f"no mask for {name!r}", where=str(self.path))
        return self.metadata["tensors"][name]

    def mask_checksum(self, name: str) -> str:
        """`algorithm:hex` of the packed mask bytes (version 1 files: `sha256:hex`)."""
        info = self.info(name)
        value = checksum.from_v1(info.get("mask_sha256")) if self.version == 1 else info.get("mask_checksum")
        if not isinstance(value, str):
            raise UserError(f"mask {name!r} has no checksum", where=str(self.path), fix="recompute the masks")
        return value

    def source_checksum(self, name: str) -> str | None:
        """`algorithm:hex` of the weight the mask was computed for, or None when not recorded."""
        info = self.info(name)
        return (
            checksum.from_v1(info.get("source_sha256")) if self.version == 1 else info.get("source_checksum")
        )

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of the unpacked mask."""
        return tuple(self.info(name)["shape"])

    def packed(self, name: str, *, verify: bool = True) -> np.ndarray:
        """One mask's packed bytes (uint8), checksum verified first."""
        info = self.info(name)
        packed = self._handle.get_tensor(name)
        expected_bytes = (info["numel"] + 7) // 8
        if packed.dtype != np.uint8 or packed.size != expected_bytes:
            raise UserError(
                f"mask {name!r} has {packed.size} bytes of {packed.dtype}, expected {expected_bytes} uint8",
                where=str(self.path),
                fix="recompute the masks",
            )
        expected = self.mask_checksum(name)
        if verify and checksum.array_checksum(packed, checksum.algorithm_of(expected)) != expected:
            raise UserError(
                f"checksum mismatch for mask {name!r} (the file was modified or corrupted)",
                where=str(self.path),
                fix="recompute the masks",
            )
        return packed

    def get_array(self, name: str, *, verify: bool = True) -> np.ndarray:
        """One mask as a numpy bool array [out, in] (True = kept); the checksum is verified first."""
        return unpack_bits(self.packed(name, verify=verify), self.shape(name))

    def get(self, name: str, *, verify: bool = True) -> torch.Tensor:
        """One mask as a bool tensor [out, in] (True = kept); the checksum is verified first."""
        import torch

        return torch.from_numpy(self.get_array(name, verify=verify))

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, mask) for every mask, one unpacked at a time."""
        for name in self.keys():
            yield name, self.get(name)

    def provenance(self) -> dict[str, Any]:
        """What a file derived from this one carries over: every metadata entry the writer does
        not recompute (method, sparsity, seed, source model, ...), plus where it came from."""
        carried = {k: v for k, v in self.metadata.items() if k not in _RECOMPUTED_KEYS}
        # The same masks under another naming keep the identity of the file first written.
        carried["mask_identity"] = self.metadata.get("mask_identity") or self.metadata.get("metadata_sha256")
        carried["converted_from"] = {
            "path": str(self.path),
            "naming": self.naming,
            "metadata_sha256": self.metadata.get("metadata_sha256"),
        }
        return carried


def save_masks(
    path: str | Path,
    masks: dict[str, torch.Tensor],
    metadata: dict[str, Any] | None = None,
    *,
    naming: str = "hf",
    source_sha256: dict[str, str] | None = None,
    source_checksums: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Write `masks` (name -> bool [out, in], True = kept) to `path`; returns the file's metadata.

    Source weights are identified by `source_checksums` (`algorithm:hex`) or `source_sha256` (hex).
    """
    sources = dict(source_checksums or {})
    sources.update({n: checksum.from_v1(h) for n, h in (source_sha256 or {}).items()})
    writer = MaskWriter(path, naming=naming, metadata=metadata)
    for name in sorted(masks):
        writer.add(name, masks[name], source_checksum=sources.get(name))
    return writer.write()


def load_masks(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read every mask (checksums verified): (name -> bool [out, in] with True = kept, metadata)."""
    mask_file = MaskFile(path)
    return dict(mask_file.items()), mask_file.metadata
