"""A reference run's record, `RUN_DIR/run.json`: the trainer writes it last (`train.finish`), after
the exports, so its `complete: true` is what marks a run finished (the trainer refuses to train
into a finished run directory; the sweep skips finished training)."""

from __future__ import annotations

import json
from pathlib import Path

RUN_RECORD = "run.json"


def is_complete(run_dir: str | Path) -> bool:
    """Does `run_dir` hold a finished reference run (its record says `complete: true`)?"""
    record = Path(run_dir) / RUN_RECORD
    return record.is_file() and bool(json.loads(record.read_text()).get("complete"))
