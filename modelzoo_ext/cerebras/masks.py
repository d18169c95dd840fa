"""The masks of a ModelZoo model, read from a mask file in either naming.

A mask file written in Hugging Face naming (`sparse-lora masks compute` on an HF checkpoint) is
converted on the fly with the one rule table in `mask_converters.rules`: names are mapped and the
rows of q/k masks are permuted from rotate-half to interleaved RoPE order, exactly as the q/k
weights were when the checkpoint was converted. A file in Cerebras naming is used as it is
(keys with or without the `model.` prefix).

Imports neither cerebras-pytorch nor ModelZoo.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mask_converters.rules import CS_PREFIX, RopeLayout, hf_to_cs_name, to_cs
from modelzoo_ext.errors import UserError
from modelzoo_ext.masks.format import MaskFile


class CSMaskSource:
    """A mask file seen in CS naming; masks are read (and converted) one at a time, on demand.

    Args:
        mask_path: the mask file.
        family: "llama" or "mistral" (picks the rule table).
        model_section: the `model:` config (dict) giving the attention layout for q/k rows.
    """

    def __init__(self, mask_path: str | Path, family: str, model_section: Mapping[str, Any]) -> None:
        path = Path(mask_path)
        if not path.is_file():
            raise UserError(
                "sparse_lora.mask_path does not exist",
                where=str(path),
                fix="run `sparse-lora masks compute` (or `make tiny-assets` for the tiny config), or fix "
                "the path (relative paths are taken from the directory cszoo runs in)",
            )
        self.path = path
        self.family = family
        self.layout = RopeLayout.from_cs_config(dict(model_section))
        self.file = MaskFile(path)
        self._file_key = {self._cs_name(key): key for key in self.file.keys()}  # noqa: SIM118 (no __iter__)

    def _cs_name(self, key: str) -> str:
        if self.file.naming == "hf":
            return hf_to_cs_name(key, self.family)
        return key if key.startswith(CS_PREFIX) else CS_PREFIX + key

    def names(self) -> list[str]:
        """CS parameter names (`model.`-prefixed) of every mask in the file."""
        return list(self._file_key)

    def get(self, cs_name: str) -> torch.Tensor:
        """The mask of CS parameter `cs_name`: bool [out, in] in CS row order."""
        key = self._file_key[cs_name]
        mask = self.file.get(key)
        if self.file.naming == "hf":
            mask = to_cs(key, mask, self.family, self.layout)[1]
        return mask.contiguous()

    def density(self, cs_name: str) -> float:
        """Fraction of kept weights of one mask, from the file's metadata (no mask is read)."""
        info = self.file.info(self._file_key[cs_name])
        return info["kept"] / info["numel"]


def read_cs_masks(
    mask_path: str | Path, family: str, model_section: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """All masks of the file: {CS parameter name (`model.`-prefixed): bool [out, in]} in CS row order."""
    source = CSMaskSource(mask_path, family, model_section)
    return {name: source.get(name) for name in source.names()}
