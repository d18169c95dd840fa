"""The raw paths into a params dict (ModelZoo trainer layout) that the study reads, in one place.

Writes go through `modelzoo_ext.run_config.params` (`set_max_steps`, ...). These readers dig into
the dict by hand until `run_config` offers accessors for them; they are kept here so that swapping
them is one edit.
"""

from __future__ import annotations

from typing import Any


def planned_max_steps(params: dict[str, Any]) -> int | None:
    """`trainer.init.loop.max_steps` (None when the params leave it out)."""
    return params["trainer"]["init"]["loop"].get("max_steps")


def train_dataloader(params: dict[str, Any]) -> dict[str, Any]:
    """`trainer.fit.train_dataloader`, as written."""
    return params["trainer"]["fit"]["train_dataloader"]
