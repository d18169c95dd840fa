"""The mask file: one definition, read and written only here.

A safetensors file (no pickle) holding one uint8 tensor per masked weight: the boolean mask
[out, in] flattened row-major and bit-packed, 1 bit per weight (numpy `packbits`,
little-endian bit order; True = kept). The header's `__metadata__["sparse_lora_masks"]` is a
JSON document:

    {
      "format": "sparse-lora-masks", "format_version": 1,
      "naming": "hf" | "cs",                 # whose parameter names the keys are
      "tensors": {name: {"shape": [out, in], "numel": n, "kept": k, "sparsity": s,
                         "mask_sha256": hex, "source_sha256": hex | null}},
      "achieved_sparsity": s,                # over all tensors in the file
      ... provenance given by the writer (method, structure, scope, target rule, seed,
          requested sparsity, calibration, source model, tool version, creation time) ...
      "metadata_sha256": hex                 # over the canonical JSON of everything above
    }

Every mask's packed bytes and the metadata itself carry a sha256, so a single flipped bit
anywhere in the file is detected when it is read.

Writing streams: `MaskWriter.add` appends each packed mask to a spool file beside the output, and
`write` assembles the safetensors file from it (the layout `safetensors.save_file` writes, byte
for byte), so memory holds one mask at a time, not the whole file (Mixtral-8x7B's masks are
5.6 GB packed).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from modelzoo_ext.atomic import atomic_file
from modelzoo_ext.errors import UserError

FORMAT_NAME = "sparse-lora-masks"
FORMAT_VERSION = 1
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
    """sha256 of a tensor's raw bytes (row-major), whatever its dtype."""
    flat = tensor.detach().contiguous().reshape(-1).cpu()
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    return hashlib.sha256(flat.view(torch.uint8).numpy()).hexdigest()  # buffer protocol: no copy


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bool mask of any shape -> uint8 [ceil(numel / 8)], 1 bit per element, little-endian bits."""
    if mask.dtype != torch.bool:
        raise UserError(
            f"masks must be torch.bool, got {mask.dtype}", fix="pass `weight != 0` or a bool tensor"
        )
    bits = mask.detach().contiguous().reshape(-1).cpu().numpy()
    return torch.from_numpy(np.packbits(bits, bitorder="little"))


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `pack_mask`: uint8 [ceil(numel / 8)] -> bool tensor of `shape`."""
    numel = int(np.prod(shape)) if shape else 1
    bits = np.unpackbits(packed.numpy(), count=numel, bitorder="little").astype(bool)
    return torch.from_numpy(bits).reshape(shape)


def _sha256_bytes(packed: torch.Tensor) -> str:
    return hashlib.sha256(packed.numpy()).hexdigest()


def _metadata_digest(metadata: dict[str, Any]) -> str:
    body = {k: v for k, v in metadata.items() if k != "metadata_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class MaskWriter:
    """Collects masks one tensor at a time (packed at once, 1 bit per weight) and writes the file atomically.

    Lifecycle:
        with MaskWriter("masks.safetensors", naming="hf", metadata={"method": "magnitude", ...}) as w:
            w.add("model.layers.0.self_attn.q_proj.weight", mask, source_sha256=...)
        # the file appears on a clean exit; an exception leaves nothing under the name
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

    def add(self, name: str, mask: torch.Tensor, *, source_sha256: str | None = None) -> None:
        """Add one mask (bool, True = kept) under its parameter name."""
        if name in self.tensors:
            raise UserError(f"mask {name!r} added twice", where=str(self.path))
        packed = pack_mask(mask)
        kept = int(np.count_nonzero(mask.detach().cpu().numpy()))  # far faster than torch's bool .sum()
        spool = self._spool_file()
        self._spooled[name] = (spool.seek(0, os.SEEK_END), packed.numel())
        spool.write(packed.numpy().tobytes())
        self.tensors[name] = {
            "shape": list(mask.shape),
            "numel": mask.numel(),
            "kept": kept,
            "sparsity": 1.0 - kept / max(mask.numel(), 1),
            "mask_sha256": _sha256_bytes(packed),
            "source_sha256": source_sha256,
        }

    def write(self) -> dict[str, Any]:
        """Write the file (temporary name, then rename) and return its metadata."""
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
        with atomic_file(self.path) as tmp, open(tmp, "wb") as out:
            self._write_safetensors(out, json.dumps(metadata, sort_keys=True))
        self._spool.close()
        self._spool, self._spooled = None, {}
        return metadata

    def _write_safetensors(self, out, metadata_json: str) -> None:
        """The safetensors layout `save_file` writes for uint8 tensors: an 8-byte little-endian
        header size, the JSON header (metadata first, tensors by name, padded with spaces to 8
        bytes), then each tensor's bytes in name order, copied from the spool in chunks."""
        header: dict[str, Any] = {"__metadata__": {METADATA_KEY: metadata_json}}
        offset = 0
        for name in sorted(self._spooled):
            size = self._spooled[name][1]
            header[name] = {"dtype": "U8", "shape": [size], "data_offsets": [offset, offset + size]}
            offset += size
        encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        encoded += b" " * (-len(encoded) % 8)
        out.write(len(encoded).to_bytes(8, "little"))
        out.write(encoded)
        for name in sorted(self._spooled):
            start, size = self._spooled[name]
            self._spool.seek(start)
            _copy_bytes(self._spool, out, size)

    def __enter__(self) -> MaskWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.write()


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
            self._handle = safe_open(str(self.path), framework="pt")
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
        if meta.get("format_version") != FORMAT_VERSION:
            raise UserError(
                f"mask format version {meta.get('format_version')} is not supported (this tool reads {FORMAT_VERSION})",
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

    def info(self, name: str) -> dict[str, Any]:
        """Per-tensor metadata: shape, numel, kept, sparsity, mask_sha256, source_sha256."""
        if name not in self:
            raise UserError(f"no mask for {name!r}", where=str(self.path))
        return self.metadata["tensors"][name]

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of the unpacked mask."""
        return tuple(self.info(name)["shape"])

    def get(self, name: str, *, verify: bool = True) -> torch.Tensor:
        """One mask as a bool tensor [out, in] (True = kept); the checksum is verified first."""
        info = self.info(name)
        packed = self._handle.get_tensor(name)
        expected_bytes = (info["numel"] + 7) // 8
        if packed.dtype != torch.uint8 or packed.numel() != expected_bytes:
            raise UserError(
                f"mask {name!r} has {packed.numel()} bytes of {packed.dtype}, expected {expected_bytes} uint8",
                where=str(self.path),
                fix="recompute the masks",
            )
        if verify and _sha256_bytes(packed) != info["mask_sha256"]:
            raise UserError(
                f"checksum mismatch for mask {name!r} (the file was modified or corrupted)",
                where=str(self.path),
                fix="recompute the masks",
            )
        return unpack_mask(packed, tuple(info["shape"]))

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
) -> dict[str, Any]:
    """Write `masks` (name -> bool [out, in], True = kept) to `path`; returns the file's metadata."""
    writer = MaskWriter(path, naming=naming, metadata=metadata)
    for name in sorted(masks):
        writer.add(name, masks[name], source_sha256=(source_sha256 or {}).get(name))
    return writer.write()


def load_masks(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read every mask (checksums verified): (name -> bool [out, in] with True = kept, metadata)."""
    mask_file = MaskFile(path)
    return dict(mask_file.items()), mask_file.metadata
