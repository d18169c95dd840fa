"""Masks seen in either naming: the one view every reader of masks uses.

Masks are stored in the naming of the checkpoint they were computed on: Hugging Face
(`model.layers.0.self_attn.q_proj.weight`, q/k rows in rotate-half RoPE order) or Cerebras
(`model.transformer_decoder.layers.0.self_attn.proj_q_dense_layer.weight`, rows interleaved).
Their source is a mask file (`MaskFile`) or anything else with its reading interface
(`MaskSource`: the `<param>_mask` entries of a CS checkpoint are one, in `mask_converters`).
`MaskView(source, naming="cs", ...)` shows the masks in CS naming whatever the source holds:
names go through the family's rule table (`modelzoo_ext.name_map`) and q/k masks get the RoPE row
permutation their weights get; CS keys are shown with the `model.` prefix whether the source
stores it or not (all keys or none: `canonical_cs_names`). Mixtral's experts: an HF source's
per-expert masks are shown in CS naming as the fused `expert_weights` mask [out, E, in] (stacked
on dim 1, as the weights are), and a CS source's fused mask as E per-expert masks in HF naming
(read and unstacked once for its E experts when they are asked for in turn). Masks are read
(a file's checksum verified) and converted one at a time, when asked for.

Users: the ModelZoo model and its sparsity algorithm (CS naming), the reference trainer (HF),
the converters (both) and `validate`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch

from modelzoo_ext.errors import UserError
from modelzoo_ext.masks.format import NAMINGS, MaskFile
from modelzoo_ext.name_map import (
    RopeLayout,
    canonical_cs_names,
    cs_to_hf_names,
    group_by_cs,
    rope_kind,
    to_cs_stacked,
    to_hf_parts,
)


class MaskSource(Protocol):
    """Stored masks as a view reads them (`MaskFile` is one): parameter names in one naming, each
    mask a bool tensor, its metadata and the checksum of the weight it was computed for."""

    path: Path

    @property
    def naming(self) -> str: ...

    def keys(self) -> list[str]: ...

    def get(self, name: str) -> torch.Tensor: ...

    def info(self, name: str) -> dict[str, Any]: ...

    def source_checksum(self, name: str) -> str | None: ...

    def provenance(self) -> dict[str, Any]: ...


class MaskView:
    """The masks of one source, named and row-ordered as in `naming` ("hf" or "cs").

    Args:
        source: a `MaskSource`, or the path of a mask file.
        naming: the naming to show.
        family: the model family (its rule table); needed only when the source is in the other naming.
        layout: the attention layout for the q/k row permutation; likewise.
    """

    def __init__(
        self,
        source: MaskSource | str | Path,
        naming: str,
        family: str | None = None,
        layout: RopeLayout | None = None,
    ) -> None:
        if naming not in NAMINGS:
            raise UserError(f"unknown mask naming {naming!r}", fix=f"use one of {NAMINGS}")
        self.source = MaskFile(source) if isinstance(source, str | Path) else source
        self.naming = naming
        self.family = family
        self.layout = layout
        self.converted = self.source.naming != naming
        if self.converted and (family is None or layout is None):
            raise UserError(
                f"the masks are in {self.source.naming!r} naming; reading them in {naming!r} naming needs the "
                "model family and attention layout",
                where=str(self.source.path),
            )
        keys = list(self.source.keys())  # noqa: SIM118 (not a dict)
        self._cs_names = canonical_cs_names(keys) if self.source.naming == "cs" else {}
        self._parts = self._shown_parts(keys)
        self._unstacked: tuple[str, list[torch.Tensor]] | None = None  # the last CS mask shown in HF

    def _shown_parts(self, keys: list[str]) -> dict[str, list[tuple[str, int | None]]]:
        """Shown name -> the stored keys it is made of, each with the expert it takes (or None).

        Same naming: each key shows itself. HF source in CS naming: a fused tensor is all its
        experts' keys, stacked. CS source in HF naming: a fused key shows as E names, one expert each.
        """
        if not self.converted:
            shown = self._cs_names or {key: key for key in keys}
            return {shown[key]: [(key, None)] for key in keys}
        if self.naming == "cs":
            groups = group_by_cs(keys, self.family, self.layout.num_experts, where=str(self.source.path))
            return {cs: [(k, None) for k in parts] for cs, parts in groups.items()}
        shown: dict[str, list[tuple[str, int | None]]] = {}
        for key in keys:
            names = cs_to_hf_names(self._cs_names[key], self.family, self.layout.num_experts)
            for e, name in enumerate(names):
                shown[name] = [(key, e if len(names) > 1 else None)]
        return shown

    @property
    def path(self) -> Path:
        return self.source.path

    @property
    def origin(self) -> str:
        """Where the masks come from (for messages)."""
        return str(self.source.path)

    def keys(self) -> list[str]:
        """Parameter names in this view's naming, sorted."""
        return sorted(self._parts)

    def __contains__(self, name: str) -> bool:
        return name in self._parts

    def __len__(self) -> int:
        return len(self._parts)

    def _require(self, name: str) -> list[tuple[str, int | None]]:
        if name not in self._parts:
            raise UserError(f"no mask for {name!r}", where=str(self.source.path))
        return self._parts[name]

    def info(self, name: str) -> dict[str, Any]:
        """The per-tensor metadata of the mask shown as `name`: the source's own for a mask shown
        as stored; for a stacked or unstacked expert mask, its `shape`, `kept` and `numel`."""
        parts = self._require(name)
        if len(parts) == 1 and parts[0][1] is None:
            return self.source.info(parts[0][0])
        if len(parts) > 1:
            infos = [self.source.info(key) for key, _ in parts]
            out, inner = infos[0]["shape"]
            return {
                "shape": [out, len(parts), inner],
                "kept": sum(i["kept"] for i in infos),
                "numel": sum(i["numel"] for i in infos),
            }
        mask = self.get(name)
        return {"shape": list(mask.shape), "kept": int(mask.sum()), "numel": mask.numel()}

    def density(self, name: str) -> float:
        """Fraction of kept weights, from the metadata (no mask is read, except an unstacked expert's)."""
        info = self.info(name)
        return info["kept"] / info["numel"]

    def get(self, name: str) -> torch.Tensor:
        """The mask of parameter `name`: bool [out, in] (fused experts: [out, E, in]) in this view's
        row order (checksum verified)."""
        parts = self._require(name)
        if not self.converted:
            return self.source.get(parts[0][0])
        if self.naming == "cs":
            masks = [(key, self.source.get(key)) for key, _ in parts]
            return to_cs_stacked(name, masks, self.family, self.layout).contiguous()
        key, expert = parts[0]
        return self._hf_parts(key)[expert or 0]

    def _hf_parts(self, key: str) -> list[torch.Tensor]:
        """The HF masks a CS key shows as (rows permuted, a fused mask unstacked); the last key's
        are kept, so a fused mask is read once for its E experts."""
        if self._unstacked is None or self._unstacked[0] != key:
            parts = to_hf_parts(self._cs_names[key], self.source.get(key), self.family, self.layout)
            self._unstacked = (key, [mask.contiguous() for _, mask in parts])
        return self._unstacked[1]

    def source_checksum(self, name: str) -> str | None:
        """The recorded checksum of the source weight, or None where the view permutes the mask's
        rows or stacks/unstacks experts (the mask then no longer describes the source weight's bytes)."""
        parts = self._require(name)
        if len(parts) > 1 or parts[0][1] is not None:
            return None
        key = parts[0][0]
        hf_name = name if self.naming == "hf" else key
        if self.converted and rope_kind(hf_name, self.family) is not None:
            return None
        return self.source.source_checksum(key)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, mask) for every mask, one at a time."""
        for name in self.keys():
            yield name, self.get(name)

    def as_dict(self) -> dict[str, torch.Tensor]:
        """Every mask at once: {name: bool [out, in]} (for models that hold their masks anyway)."""
        return dict(self.items())
