"""Mask files between naming schemes: `sparse-lora masks hf-to-cs | cs-to-hf`.

A mask in CS naming applies directly to the CS weight of the same name: its key is the CS
parameter name and its q/k rows are permuted like the weight's. The view that renames and
permutes is the core's `MaskView`; this module writes what a view shows as a new file (the view
of a mask file, or of a `.mdl`'s embedded masks for `convert cs-to-hf`). Provenance (method,
sparsity, seed, source checkpoint, ...) is carried over; the per-tensor source checksum is kept
where the mask was neither permuted nor stacked or split (such a mask no longer describes the
original weight's bytes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from modelzoo_ext.errors import UserError
from modelzoo_ext.masks.format import MaskFile, MaskWriter
from modelzoo_ext.masks.view import MaskView
from modelzoo_ext.name_map import RopeLayout


def write_view(
    view: MaskView, out_path: str | Path, metadata: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write the masks `view` shows, in its naming, to `out_path` (atomically); returns the metadata.

    `metadata` defaults to the source file's provenance (`MaskFile.provenance`).
    """
    writer = MaskWriter(
        out_path, naming=view.naming, metadata=view.source.provenance() if metadata is None else metadata
    )
    for name in view.keys():  # noqa: SIM118 (not a dict)
        writer.add(name, view.get(name), source_checksum=view.source_checksum(name))
    return writer.write()


def convert_mask_file(
    in_path: str | Path, out_path: str | Path, family: str, layout: RopeLayout, *, to_naming: str
) -> dict[str, Any]:
    """Write the masks of `in_path` in `to_naming` to `out_path` (atomically); returns its metadata."""
    masks = MaskFile(in_path)
    if masks.naming == to_naming:
        raise UserError(
            f"the mask file is already in {to_naming} naming",
            where=str(in_path),
            fix="use it as it is, or convert in the other direction",
        )
    return write_view(MaskView(masks, to_naming, family, layout), out_path)
