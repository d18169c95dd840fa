"""A mask file seen in either naming: the one view every reader of masks uses.

A mask file holds its masks in the naming of the checkpoint they were computed on: Hugging Face
(`model.layers.0.self_attn.q_proj.weight`, q/k rows in rotate-half RoPE order) or Cerebras
(`model.transformer_decoder.layers.0.self_attn.proj_q_dense_layer.weight`, rows interleaved).
`MaskView(file, naming="cs", ...)` shows the masks of a file in CS naming whatever the file
holds: names go through the family's rule table (`modelzoo_ext.name_map`) and q/k masks get the
RoPE row permutation their weights get; CS keys are shown with the `model.` prefix whether the
file stores it or not. Masks are read (checksum verified) and converted one at a time, when
asked for.

Users: the ModelZoo model and its sparsity algorithm (CS naming), the reference trainer (HF),
the converters (both) and `validate`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from modelzoo_ext.errors import UserError
from modelzoo_ext.masks.format import NAMINGS, MaskFile
from modelzoo_ext.name_map import (
    RopeLayout,
    canonical_cs_names,
    cs_to_hf_name,
    hf_to_cs_name,
    rope_kind,
    to_cs,
    to_hf,
)


class MaskView:
    """The masks of one file, named and row-ordered as in `naming` ("hf" or "cs").

    Args:
        file: the mask file (or its path).
        naming: the naming to show.
        family: the model family (its rule table); needed only when the file is in the other naming.
        layout: the attention layout for the q/k row permutation; likewise.
    """

    def __init__(
        self,
        file: MaskFile | str | Path,
        naming: str,
        family: str | None = None,
        layout: RopeLayout | None = None,
    ) -> None:
        if naming not in NAMINGS:
            raise UserError(f"unknown mask naming {naming!r}", fix=f"use one of {NAMINGS}")
        self.file = file if isinstance(file, MaskFile) else MaskFile(file)
        self.naming = naming
        self.family = family
        self.layout = layout
        self.converted = self.file.naming != naming
        if self.converted and (family is None or layout is None):
            raise UserError(
                f"the mask file is in {self.file.naming!r} naming; reading it in {naming!r} naming needs the "
                "model family and attention layout",
                where=str(self.file.path),
            )
        self._file_key = {self._shown_name(key): key for key in self.file.keys()}  # noqa: SIM118

    def _shown_name(self, key: str) -> str:
        if self.naming == "hf":
            return cs_to_hf_name(canonical_cs_names([key])[key], self.family) if self.converted else key
        cs_name = hf_to_cs_name(key, self.family) if self.converted else key
        return canonical_cs_names([cs_name])[cs_name]

    @property
    def path(self) -> Path:
        return self.file.path

    @property
    def origin(self) -> str:
        """Where the masks come from (for messages)."""
        return str(self.file.path)

    def keys(self) -> list[str]:
        """Parameter names in this view's naming, sorted."""
        return sorted(self._file_key)

    def __contains__(self, name: str) -> bool:
        return name in self._file_key

    def __len__(self) -> int:
        return len(self._file_key)

    def file_key(self, name: str) -> str:
        """The key under which the file stores the mask shown as `name`."""
        if name not in self._file_key:
            raise UserError(f"no mask for {name!r}", where=str(self.file.path))
        return self._file_key[name]

    def info(self, name: str) -> dict[str, Any]:
        """The file's per-tensor metadata of the mask shown as `name` (shape in the file's row order)."""
        return self.file.info(self.file_key(name))

    def density(self, name: str) -> float:
        """Fraction of kept weights, from the metadata (no mask is read)."""
        info = self.info(name)
        return info["kept"] / info["numel"]

    def get(self, name: str) -> torch.Tensor:
        """The mask of parameter `name`: bool [out, in] in this view's row order (checksum verified)."""
        key = self.file_key(name)
        mask = self.file.get(key)
        if not self.converted:
            return mask
        if self.naming == "cs":
            return to_cs(key, mask, self.family, self.layout)[1].contiguous()
        return to_hf(canonical_cs_names([key])[key], mask, self.family, self.layout)[1].contiguous()

    def source_checksum(self, name: str) -> str | None:
        """The recorded checksum of the source weight, or None where the view permutes the mask's
        rows (a permuted mask no longer describes the source weight's byte order)."""
        key = self.file_key(name)
        hf_name = name if self.naming == "hf" else key
        if self.converted and rope_kind(hf_name, self.family) is not None:
            return None
        return self.file.source_checksum(key)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, mask) for every mask, one at a time."""
        for name in self.keys():
            yield name, self.get(name)

    def as_dict(self) -> dict[str, torch.Tensor]:
        """Every mask at once: {name: bool [out, in]} (for models that hold their masks anyway)."""
        return dict(self.items())
