"""Cerebras checkpoints (`.mdl`, HDF5 written by `cstorch.save`): streaming write, lazy read.

Writing: `cstorch.save` takes a whole state dict. To keep memory at a few tensors (a 7B model
does not fit twice in RAM), each value handed to it is a `DeferredComputedTensor`: a cstorch
deferred tensor (no storage) whose value is produced only when the saver serializes it (read
from a safetensors shard, renamed, permuted) and dropped right after it is written.

Reading: `cstorch.load` returns deferred tensors that read from the file on first use, so
`CSCheckpoint.get(name)` loads one tensor at a time. `EmbeddedMasks` shows a checkpoint's
`<param>_mask` entries as a mask source, for `MaskView` to show in HF naming like a mask file.

cerebras-pytorch is imported lazily; without it these functions raise a UserError that says
how to install it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from modelzoo_ext.atomic import atomic_file
from modelzoo_ext.errors import UserError
from modelzoo_ext.name_map import MASK_SUFFIX, canonical_cs_names


def _cstorch():
    try:
        import cerebras.pytorch as cstorch
    except ImportError as exc:
        raise UserError(
            "reading or writing a Cerebras .mdl checkpoint needs cerebras-pytorch",
            fix="pip install -e '.[cs]' (cerebras-pytorch 2.10.0, Python 3.11)",
        ) from exc
    return cstorch


def _deferred_class():
    from cerebras.pytorch.storage.serializers import DeferredTensor

    class DeferredComputedTensor(DeferredTensor):
        """A cstorch deferred tensor whose value `produce()` computes when the saver asks for it."""

        def __new__(cls, shape, dtype, produce):
            return cls._make_subclass(cls, torch.empty(shape, dtype=dtype), require_grad=False)

        def __init__(self, shape, dtype, produce):
            super().__init__()
            self._produce = produce
            self._cache_tensor = False  # drop the value once it is written

        def _to_cpu(self) -> torch.Tensor:
            value = self._produce()
            if tuple(value.shape) != tuple(self.shape) or value.dtype != self.dtype:
                raise RuntimeError(
                    f"produced {value.dtype} {tuple(value.shape)}, declared {self.dtype} {tuple(self.shape)}"
                )
            return value

        def _clone(self):
            return DeferredComputedTensor(self.shape, self.dtype, self._produce)

        def _serialize(self, context):  # never reached: save() runs with materialization on
            raise RuntimeError("DeferredComputedTensor must be materialized when saved")

    return DeferredComputedTensor


class LazyTensor:
    """What goes into `save_cs_checkpoint`: shape, dtype and a function producing the value."""

    def __init__(
        self, shape: tuple[int, ...], dtype: torch.dtype, produce: Callable[[], torch.Tensor]
    ) -> None:
        self.shape, self.dtype, self.produce = tuple(shape), dtype, produce


def cs_format_version() -> str:
    """'cs-X.Y' of the installed cerebras-pytorch (what ModelZoo's `cs-auto` reads back)."""
    version = _cstorch().__version__.split("+")[0].split(".")
    return f"cs-{version[0]}.{version[1]}"


def save_cs_checkpoint(
    path: str | Path, model_state: dict[str, LazyTensor], model_section: dict[str, Any]
) -> Path:
    """Write `{"model": state, "__metadata__": [...]}` to `path` with `cstorch.save`, atomically.

    `model_state`: CS name -> LazyTensor; each value is produced, written and freed in turn.
    The metadata entry is what ModelZoo's converters write (version, params), so
    `cszoo checkpoint convert --src-fmt cs-auto` recognises the file.
    """
    cstorch = _cstorch()
    from cerebras.pytorch.storage.serializers import materialize_deferred_tensors

    deferred = _deferred_class()
    state = {name: deferred(t.shape, t.dtype, t.produce) for name, t in model_state.items()}
    metadata = [
        {"version": cs_format_version()[3:] + ".0", "model_name": "", "params": {"model": model_section}}
    ]
    path = Path(path)
    with atomic_file(path) as tmp, materialize_deferred_tensors(True):
        tmp.unlink()  # cstorch's writer refuses an existing file
        cstorch.save({"model": state, "__metadata__": metadata}, str(tmp))
    return path


class CSCheckpoint:
    """A `.mdl` file: its model state under canonical CS names (`model.` prefix), read lazily."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError("CS checkpoint not found", where=str(self.path), fix="pass the .mdl file")
        cstorch = _cstorch()
        try:
            checkpoint = cstorch.load(str(self.path))
        except Exception as exc:  # h5py/cstorch raise several types for truncated files
            raise UserError(f"cannot read CS checkpoint ({exc})", where=str(self.path)) from exc
        if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
            raise UserError("the checkpoint has no 'model' state dict", where=str(self.path))
        state = checkpoint["model"]
        self._state = {canonical: state[key] for key, canonical in canonical_cs_names(state).items()}
        self.metadata = checkpoint.get("__metadata__", [])

    def keys(self) -> list[str]:
        """Canonical CS names, sorted."""
        return sorted(self._state)

    def __contains__(self, name: str) -> bool:
        return name in self._state

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape without reading the data."""
        return tuple(self._state[name].shape)

    def get(self, name: str) -> torch.Tensor:
        """One tensor as a plain CPU tensor."""
        if name not in self._state:
            raise UserError(f"tensor {name!r} is not in the checkpoint", where=str(self.path))
        value = self._state[name]
        if not isinstance(value, torch.Tensor):
            raise UserError(f"entry {name!r} is a {type(value).__name__}, not a tensor", where=str(self.path))
        return value.detach()  # a deferred tensor reads its data here (not cached)


class EmbeddedMasks:
    """The `<param>_mask` entries of a CS checkpoint as a `modelzoo_ext.masks.view.MaskSource`:
    CS naming, keyed by parameter name, each read (as bool) when asked for."""

    naming = "cs"

    def __init__(self, checkpoint: CSCheckpoint, mask_keys: list[str]) -> None:
        self.path = checkpoint.path
        self._checkpoint = checkpoint
        self._names = sorted(key[: -len(MASK_SUFFIX)] for key in mask_keys)

    def keys(self) -> list[str]:
        """The masked parameter names, sorted."""
        return list(self._names)

    def get(self, name: str) -> torch.Tensor:
        """The mask of parameter `name` as stored (bool, CS row order)."""
        return self._checkpoint.get(name + MASK_SUFFIX).bool()

    def info(self, name: str) -> dict[str, Any]:
        """Shape, kept and numel of one mask (read to count)."""
        mask = self.get(name)
        return {"shape": list(mask.shape), "kept": int(mask.sum()), "numel": mask.numel()}

    def source_checksum(self, name: str) -> str | None:
        """None: a checkpoint records no checksum of the weight a mask was computed for."""
        return None

    def provenance(self) -> dict[str, Any]:
        """What a mask file written from these masks records: the checkpoint they came from."""
        return {"converted_from": {"path": str(self.path)}}
