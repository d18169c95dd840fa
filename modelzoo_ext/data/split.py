"""The deterministic train / held-out split, by sha256 of an example's key.

An example's side depends only on its key, the held-out fraction and a salt: never on the
order of the data, the machine, or which other examples exist. Training (`data prepare
--split train`) and evaluation (`--split heldout`) import this one function, so the two parts
never overlap.
"""

from __future__ import annotations

import hashlib

from modelzoo_ext.errors import UserError

SPLITS = ("train", "heldout")
DEFAULT_SALT = "sparse-lora-split-v1"
DEFAULT_HELD_OUT_FRACTION = 0.2


def split_of(example_key: str, held_out_fraction: float, salt: str = DEFAULT_SALT) -> str:
    """`"heldout"` or `"train"` for an example: sha256(salt + key) read as a number in [0, 1)."""
    if not 0.0 <= held_out_fraction <= 1.0:
        raise UserError(
            f"held-out fraction must lie in [0, 1], got {held_out_fraction}",
            fix="pass e.g. --held-out-fraction 0.2",
        )
    digest = hashlib.sha256(f"{salt}\x00{example_key}".encode()).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    return "heldout" if position < held_out_fraction else "train"
