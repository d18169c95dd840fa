"""Pruning masks: compute, store (bit-packed safetensors), validate, apply, import."""

from modelzoo_ext.masks.format import MaskFile, MaskWriter, load_masks, save_masks

__all__ = ["MaskFile", "MaskWriter", "load_masks", "save_masks"]
