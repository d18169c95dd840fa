"""Training checkpoints of the reference trainer: enough to resume bit-exactly.

`RUN_DIR/checkpoints/step_<N>.pt` holds the LoRA factors, the optimizer state, the step, the
RNG states and the hash of the run config; written under a temporary name and renamed. Only
the LoRA factors are saved (the frozen base comes from --hf-model), so checkpoints stay small.
Resuming with a different config is refused.

Retention is ModelZoo's `KeepNCheckpoints` (`CheckpointRetention`): after each save, the oldest
checkpoints this process saved beyond the newest n are deleted; checkpoints already in the run
directory when it started (the one a resumed run continues from) are left alone, as ModelZoo
leaves those of earlier runs.
"""

from __future__ import annotations

import re
from collections import deque
from pathlib import Path
from typing import Any

import torch

from modelzoo_ext.atomic import atomic_file
from modelzoo_ext.errors import UserError

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"step_(\d+)\.pt$")


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step_{step}.pt"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint with the highest step in RUN_DIR, or None."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    found = [(int(m.group(1)), p) for p in folder.glob("step_*.pt") if (m := _NAME.search(p.name))]
    return max(found)[1] if found else None


class CheckpointRetention:
    """Keep the newest `keep` checkpoints this process saved (None: keep all), as ModelZoo's
    `KeepNCheckpoints(n)` does: the oldest is deleted right after the save that makes n + 1."""

    def __init__(self, keep: int | None) -> None:
        self.keep = keep
        self.saved: deque[Path] = deque()

    def record(self, path: Path) -> None:
        """Note a checkpoint just saved; delete the oldest beyond `keep`."""
        self.saved.append(Path(path))
        while self.keep is not None and len(self.saved) > self.keep:
            self.saved.popleft().unlink(missing_ok=True)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write a checkpoint atomically (state: step, lora, optimizer, rng, config_sha256)."""
    with atomic_file(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, config_sha256: str) -> dict[str, Any]:
    """Read a checkpoint; refuse one written for another run config."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("config_sha256") != config_sha256:
        raise UserError(
            "the run directory holds a checkpoint of a different run config",
            where=str(path),
            fix="pass a new --out, or rerun with the config that wrote it",
        )
    return state
