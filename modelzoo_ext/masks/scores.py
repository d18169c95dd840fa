"""Importance scores of a weight, as integer keys that `select.py` turns into exact masks.

Methods (W: weight [out, in]):
- magnitude: |W|.
- random: a seeded stream per tensor; the same (seed, tensor name) gives the same mask on any
  machine (numpy's PCG64 raw output is fixed by its specification, unlike library samplers).
- wanda: |W| * ||X_j||_2, X_j the j-th input channel's activations over calibration text.
- gradient: |G|, G = dL/dW accumulated over calibration batches.
- taylor: |W * G| (first-order Taylor estimate of the loss change when w is removed).

Keys: a non-negative float read as an integer keeps its order, so |x| in bf16/fp16 becomes a
15-bit int16 key and |x| in fp32 a 31-bit int32 key with no rounding at all.

Weights arrive as numpy (`Weight`: bf16 as its int16 bit patterns), so magnitude and random
keys need no torch; the data-driven scores are computed with torch exactly as the calibration
statistics are (torch is imported only for those methods).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from modelzoo_ext.errors import UserError

if TYPE_CHECKING:
    import torch

    from modelzoo_ext.safetensors_file import TensorEntry

METHODS = ("magnitude", "random", "wanda", "gradient", "taylor")
DATA_DRIVEN = ("wanda", "gradient", "taylor")

# Bit patterns at and above these are inf/nan once the sign bit is cleared.
_NON_FINITE_KEY = {"bfloat16": 0x7F80, "float16": 0x7C00, "float32": 0x7F800000}
_NUMPY = {"float16": np.float16, "float32": np.float32, "float64": np.float64, "bfloat16": np.int16}


@dataclass(frozen=True)
class Weight:
    """One weight as numpy: `array` holds its values ([out, in]; bf16 as int16 bit patterns)."""

    name: str
    dtype: str  # torch's name: "bfloat16", "float16", "float32", "float64"
    array: np.ndarray

    @classmethod
    def from_raw(cls, entry: TensorEntry, raw: np.ndarray) -> Weight:
        """The tensor `entry` describes, from its raw bytes (no copy)."""
        if entry.dtype not in _NUMPY:
            raise UserError(
                f"tensor {entry.name!r} is {entry.dtype}; masks are computed for floating-point weights",
                where=str(entry.shard),
                fix="exclude it with --exclude",
            )
        return cls(entry.name, entry.dtype, raw.view(_NUMPY[entry.dtype]).reshape(entry.shape))

    @classmethod
    def from_torch(cls, name: str, tensor: torch.Tensor) -> Weight:
        """A CPU torch tensor as a `Weight` (shares memory)."""
        import torch

        dtype = str(tensor.dtype).removeprefix("torch.")
        tensor = tensor.detach().contiguous().cpu()
        if dtype == "bfloat16":
            return cls(name, dtype, tensor.view(torch.int16).numpy())
        if dtype not in _NUMPY:
            tensor, dtype = tensor.float(), "float32"  # other types are scored at fp32 precision
        return cls(name, dtype, tensor.numpy())

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    def torch(self) -> torch.Tensor:
        """The weight as a torch tensor of its dtype (shares memory)."""
        import torch

        tensor = torch.from_numpy(self.array)
        return tensor.view(torch.bfloat16) if self.dtype == "bfloat16" else tensor


def as_weight(weight: Weight | Any) -> Weight:
    """A `Weight`, or a torch tensor turned into one."""
    return weight if isinstance(weight, Weight) else Weight.from_torch("", weight)


def magnitude_keys(weight: Weight | Any, out: np.ndarray | None = None) -> np.ndarray:
    """|W| as integer keys, same shape: int16 for bf16/fp16 (15 bits), int32 for fp32 (31 bits).

    Clearing the sign bit of the bit pattern: one vectorised numpy pass, no float arithmetic.
    `out`: a flat buffer of the key dtype and at least the weight's size to write the keys into.
    """
    weight = as_weight(weight)
    if weight.dtype in ("bfloat16", "float16"):
        bits, mask = weight.array.view(np.int16), np.int16(0x7FFF)
    else:
        values = (
            weight.array if weight.dtype == "float32" else weight.array.astype(np.float32)
        )  # fp64: at fp32
        bits, mask = values.view(np.int32), np.int32(0x7FFFFFFF)
    if out is None:
        return np.bitwise_and(bits, mask)
    keys = out[: bits.size].reshape(bits.shape)
    return np.bitwise_and(bits, mask, out=keys)


def key_dtype(dtype: str) -> type:
    """numpy dtype of the magnitude keys of a weight of `dtype`."""
    return np.int16 if dtype in ("bfloat16", "float16") else np.int32


def float_keys(scores: torch.Tensor) -> np.ndarray:
    """Non-negative fp32 torch scores [out, in] -> int32 keys in the same order."""
    import torch

    return scores.float().abs().view(torch.int32).numpy()


def non_finite_count(weight: Weight | Any, magnitude: np.ndarray | None = None) -> int:
    """How many entries of `weight` are inf or nan (`magnitude`: its `magnitude_keys`, if known)."""
    weight = as_weight(weight)
    limit = _NON_FINITE_KEY.get(weight.dtype)
    if limit is None:
        return int(np.count_nonzero(~np.isfinite(weight.array)))
    keys = magnitude_keys(weight) if magnitude is None else magnitude
    if keys.size == 0 or keys.max() < limit:  # the common case: one cheap pass
        return 0
    return int(np.count_nonzero(keys >= limit))


def require_finite(name: str, weight: Weight | Any, where: str, magnitude: np.ndarray | None = None) -> None:
    """Refuse a weight with inf/nan: no score is meaningful for it."""
    bad = non_finite_count(weight, magnitude)
    if bad:
        raise UserError(
            f"tensor {name!r} has {bad} non-finite values (inf/nan)",
            where=where,
            fix="repair the checkpoint, or --exclude this tensor",
        )


def random_keys(seed: int, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Seeded 31-bit int32 keys [shape] from a PCG64 stream keyed by sha256(seed, tensor name)."""
    digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    generator = np.random.PCG64(int.from_bytes(digest[:16], "little"))
    raw = generator.random_raw(int(np.prod(shape)))
    return (raw >> np.uint64(33)).astype(np.int32).reshape(shape)


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """fp32 [out, in]: |W| * ||X_j||_2 (input_norms: fp32 [in])."""
    return weight.float().abs() * input_norms.float()[None, :]


def gradient_scores(gradient: torch.Tensor) -> torch.Tensor:
    """fp32 [out, in]: |G|."""
    return gradient.float().abs()


def taylor_scores(weight: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """fp32 [out, in]: |W * G|."""
    return (weight.float() * gradient.float()).abs()


def score_keys(
    method: str, weight: Weight, *, seed: int, statistic: torch.Tensor | None, out: np.ndarray | None = None
) -> np.ndarray:
    """Integer keys [out, in] of one weight under `method` (`statistic`: input norms or gradient;
    `out`: a buffer for magnitude keys, see `magnitude_keys`)."""
    if method == "magnitude":
        return magnitude_keys(weight, out)
    if method == "random":
        return random_keys(seed, weight.name, weight.shape)
    if method not in DATA_DRIVEN:
        raise UserError(f"unknown method {method!r}", where="--method", fix=f"use one of {METHODS}")
    if statistic is None:
        raise UserError(f"{method} needs calibration statistics for {weight.name!r}", where=weight.name)
    if method == "wanda":
        return float_keys(wanda_scores(weight.torch(), statistic))
    if method == "gradient":
        return float_keys(gradient_scores(statistic))
    return float_keys(taylor_scores(weight.torch(), statistic))


def line_scores_source(method: str, weight: Weight, *, seed: int, statistic) -> torch.Tensor:
    """Float element scores [out, in] (torch) whose row/column sums rank whole rows/columns."""
    import torch

    if method == "magnitude":
        return weight.torch().float().abs()
    keys = torch.from_numpy(score_keys(method, weight, seed=seed, statistic=statistic))
    return keys.double() if method == "random" else keys.view(torch.float32)
