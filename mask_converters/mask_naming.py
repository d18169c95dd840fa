"""Mask files between naming schemes: HF names and rotate-half q/k rows <-> CS names and interleaved rows.

A mask in CS naming applies directly to the CS weight of the same name: its key is the CS
parameter name and its q/k rows are permuted like the weight's. Provenance (method, sparsity,
seed, ...) is carried over; per-tensor source checksums are kept where the tensor was not permuted
(a permuted mask no longer describes the original byte order).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from mask_converters.rules import (
    RopeLayout,
    canonical_cs_names,
    cs_to_hf_name,
    hf_to_cs_name,
    rope_kind,
    to_cs,
    to_hf,
)
from modelzoo_ext.errors import UserError
from modelzoo_ext.masks.format import MaskFile, MaskWriter

# Keys of the mask metadata that the writer recomputes; everything else is provenance.
_FORMAT_KEYS = {
    "format",
    "format_version",
    "naming",
    "tensors",
    "achieved_sparsity",
    "metadata_sha256",
    "created",
}


def converted_masks(
    masks: MaskFile, family: str, layout: RopeLayout, *, to_naming: str
) -> Iterator[tuple[str, torch.Tensor, str | None]]:
    """(name, mask, source checksum) of every mask in `to_naming` ("hf" or "cs"), one at a time."""
    if masks.naming == to_naming:
        for name in masks.keys():  # noqa: SIM118 (not a dict)
            yield name, masks.get(name), masks.source_checksum(name)
        return
    names = masks.keys()
    cs_names = canonical_cs_names(names) if to_naming == "hf" else {}
    for name in names:
        if to_naming == "hf":
            new_name, mask = to_hf(cs_names[name], masks.get(name), family, layout)
            hf_name = new_name
        else:
            new_name, mask = to_cs(name, masks.get(name), family, layout)
            hf_name = name
        permuted = rope_kind(hf_name, family) is not None
        yield new_name, mask, None if permuted else masks.source_checksum(name)


def provenance(masks: MaskFile) -> dict[str, Any]:
    """The provenance part of a mask file's metadata, plus where the conversion came from."""
    carried = {k: v for k, v in masks.metadata.items() if k not in _FORMAT_KEYS}
    carried["converted_from"] = {
        "path": str(masks.path),
        "naming": masks.naming,
        "metadata_sha256": masks.metadata.get("metadata_sha256"),
    }
    return carried


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
    writer = MaskWriter(out_path, naming=to_naming, metadata=provenance(masks))
    for name, mask, source in converted_masks(masks, family, layout, to_naming=to_naming):
        writer.add(name, mask, source_checksum=source)
    return writer.write()


class LazyMasks:
    """Masks in one naming, converted one at a time on `get`: name -> producer.

    `file` is the MaskFile they come from (None when they come from a checkpoint).
    """

    def __init__(self, origin: str, file: MaskFile | None = None) -> None:
        self.producers: dict[str, Callable[[], torch.Tensor]] = {}
        self.origin = origin
        self.file = file

    def keys(self) -> list[str]:
        return sorted(self.producers)

    def __contains__(self, name: str) -> bool:
        return name in self.producers

    def __len__(self) -> int:
        return len(self.producers)

    def get(self, name: str) -> torch.Tensor:
        return self.producers[name]()

    @classmethod
    def from_file(cls, path: str | Path, family: str, layout: RopeLayout, *, naming: str) -> LazyMasks:
        """The masks of a file (either naming) seen in `naming` ("hf" or "cs", `model.`-prefixed)."""
        masks = MaskFile(path)
        out = cls(str(path), masks)
        if masks.naming == naming:
            names = canonical_cs_names(masks.keys()) if naming == "cs" else {n: n for n in masks.keys()}  # noqa: SIM118 (not a dict)
            for name, new in names.items():
                out.producers[new] = lambda n=name: masks.get(n)
        elif naming == "hf":
            for name, cs_name in canonical_cs_names(masks.keys()).items():
                out.producers[cs_to_hf_name(cs_name, family)] = lambda n=name, c=cs_name: to_hf(
                    c, masks.get(n), family, layout
                )[1]
        else:
            for name in masks.keys():  # noqa: SIM118 (not a dict)
                out.producers[hf_to_cs_name(name, family)] = lambda n=name: to_cs(
                    n, masks.get(n), family, layout
                )[1]
        return out
