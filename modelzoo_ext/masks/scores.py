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
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from modelzoo_ext.errors import UserError

METHODS = ("magnitude", "random", "wanda", "gradient", "taylor")
DATA_DRIVEN = ("wanda", "gradient", "taylor")

# Bit patterns at and above these are inf/nan once the sign bit is cleared.
_NON_FINITE_KEY = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00, torch.float32: 0x7F800000}


def magnitude_keys(weight: torch.Tensor) -> torch.Tensor:
    """|W| as integer keys, same shape: int16 for bf16/fp16 (15 bits), int32 for fp32 (31 bits).

    Computed in numpy (clearing the sign bit): its vectorised bitwise ops were several times
    faster than torch's on the CPUs measured.
    """
    if weight.dtype in (torch.bfloat16, torch.float16):
        bits = weight.contiguous().view(torch.int16).numpy()
        return torch.from_numpy(np.bitwise_and(bits, np.int16(0x7FFF)))
    if weight.dtype != torch.float32:
        weight = weight.float()  # fp64 and others: scored at fp32 precision
    bits = weight.contiguous().view(torch.int32).numpy()
    return torch.from_numpy(np.bitwise_and(bits, np.int32(0x7FFFFFFF)))


def float_keys(scores: torch.Tensor) -> torch.Tensor:
    """Non-negative fp32 scores [out, in] -> int32 keys in the same order."""
    return scores.float().abs().view(torch.int32)


def non_finite_count(weight: torch.Tensor, magnitude: torch.Tensor | None = None) -> int:
    """How many entries of `weight` are inf or nan (`magnitude`: its `magnitude_keys`, if known)."""
    limit = _NON_FINITE_KEY.get(weight.dtype)
    if limit is None:
        return int(torch.count_nonzero(~torch.isfinite(weight)))
    keys = magnitude_keys(weight) if magnitude is None else magnitude
    return int(np.count_nonzero(keys.numpy() >= limit))


def require_finite(
    name: str, weight: torch.Tensor, where: str, magnitude: torch.Tensor | None = None
) -> None:
    """Refuse a weight with inf/nan: no score is meaningful for it."""
    bad = non_finite_count(weight, magnitude)
    if bad:
        raise UserError(
            f"tensor {name!r} has {bad} non-finite values (inf/nan)",
            where=where,
            fix="repair the checkpoint, or --exclude this tensor",
        )


def random_keys(seed: int, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Seeded 31-bit int32 keys [shape] from a PCG64 stream keyed by sha256(seed, tensor name)."""
    digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    generator = np.random.PCG64(int.from_bytes(digest[:16], "little"))
    raw = generator.random_raw(int(np.prod(shape)))
    return torch.from_numpy((raw >> np.uint64(33)).astype(np.int32)).reshape(shape)


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
    method: str, name: str, weight: torch.Tensor, *, seed: int, statistic: torch.Tensor | None
) -> torch.Tensor:
    """Integer keys [out, in] of one weight under `method` (`statistic`: input norms or gradient)."""
    if method == "magnitude":
        return magnitude_keys(weight)
    if method == "random":
        return random_keys(seed, name, tuple(weight.shape))
    if statistic is None:
        raise UserError(f"{method} needs calibration statistics for {name!r}", where=name)
    if method == "wanda":
        return float_keys(wanda_scores(weight, statistic))
    if method == "gradient":
        return float_keys(gradient_scores(statistic))
    if method == "taylor":
        return float_keys(taylor_scores(weight, statistic))
    raise UserError(f"unknown method {method!r}", where="--method", fix=f"use one of {METHODS}")


def line_scores_source(method: str, name: str, weight: torch.Tensor, *, seed: int, statistic) -> torch.Tensor:
    """Float element scores [out, in] whose row/column sums rank whole rows/columns."""
    if method == "magnitude":
        return weight.float().abs()
    keys = score_keys(method, name, weight, seed=seed, statistic=statistic)
    return keys.double() if method == "random" else keys.view(torch.float32)
