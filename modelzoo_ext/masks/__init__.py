"""Pruning masks: compute, store (bit-packed safetensors), validate, apply, import.

The public names below are loaded on first use (PEP 562), so `sparse-lora --help`, which
imports this package for its CLI module, does not pay for importing torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "MaskFile": "modelzoo_ext.masks.format",
    "MaskWriter": "modelzoo_ext.masks.format",
    "load_masks": "modelzoo_ext.masks.format",
    "save_masks": "modelzoo_ext.masks.format",
    "tensor_sha256": "modelzoo_ext.masks.format",
    "tensor_checksum": "modelzoo_ext.masks.checksum",
    "DEFAULT_INCLUDE": "modelzoo_ext.masks.targets",
    "TargetRule": "modelzoo_ext.masks.targets",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'modelzoo_ext.masks' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
