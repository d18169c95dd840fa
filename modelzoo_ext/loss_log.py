"""The per-step loss log of a `cszoo fit` run: `<model_dir>/sparse_lora_losses.jsonl`.

Written by the `SparseLoRALossLog` callback (ModelZoo face), read by `sparse-lora parity` (loss
parity with the reference trainer) and by the sweep (CS-3 throughput). One JSON object per
training step, appended as the step's loss arrives on the host:

    {"step": 12, "loss": 2.3456789, "time_s": 0.84}

`step` is the trainer's global step after the update (counting from 1), `loss` the training
loss at full precision, `time_s` the host seconds since the previous row (for the first step,
since setup: it includes compilation). A resumed run appends to the same file, so a step may
appear twice: the last row of a step wins.

Stdlib only (and the data layer's JSONL reader), so readers need neither torch nor cerebras-pytorch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from modelzoo_ext.data.rows import read_jsonl

LOSS_LOG_NAME = "sparse_lora_losses.jsonl"


@dataclass(frozen=True)
class LossRow:
    """One training step of the log."""

    step: int
    loss: float
    time_s: float | None = None


def loss_log_path(model_dir: str | Path) -> Path:
    """Where a run's loss log lives."""
    return Path(model_dir) / LOSS_LOG_NAME


def append_row(path: str | Path, row: LossRow) -> None:
    """Append one step (the file is created on the first row)."""
    record = {"step": int(row.step), "loss": float(row.loss)}
    if row.time_s is not None:
        record["time_s"] = float(row.time_s)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_loss_log(path: str | Path) -> dict[int, LossRow]:
    """step -> its row (the last row of a step wins); {} when the file does not exist."""
    path = Path(path)
    if not path.is_file():
        return {}
    rows: dict[int, LossRow] = {}
    for raw in read_jsonl(path):
        time_s = raw.get("time_s")
        rows[int(raw["step"])] = LossRow(
            int(raw["step"]), float(raw["loss"]), None if time_s is None else float(time_s)
        )
    return rows
