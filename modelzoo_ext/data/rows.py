"""Reading raw rows from local files: JSONL (line by line, errors with their line), JSON,
parquet, and `datasets.save_to_disk` folders."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from modelzoo_ext.errors import UserError


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """One dict per non-empty line; a UserError naming the line for invalid JSON."""
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"invalid JSON ({exc.msg})", where=f"{path}:{line_no}") from exc


def rows_from_path(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a local dataset: a `save_to_disk` folder, or a .jsonl/.json/.parquet file."""
    if path.is_dir():
        from datasets import load_from_disk

        yield from load_from_disk(str(path))
    elif path.suffix == ".jsonl":
        yield from read_jsonl(path)
    elif path.suffix in (".json", ".parquet"):
        from datasets import load_dataset

        yield from load_dataset(path.suffix[1:], data_files=str(path), split="train")
    else:
        raise UserError(
            "unsupported data source",
            where=str(path),
            fix="pass a save_to_disk folder or a .jsonl/.json/.parquet file",
        )
