"""A run's own record, `runs/<run_id>/record.json`: the one place its progress and results are written.

The record is a `registry.RunRecord` (grid point, status, attempts, error, provenance, metrics
with their intervals, seeds, throughput, artifact paths and checksums, software versions per
stage) as JSON. Only the process executing the run's stage writes it, always atomically (a
temporary file renamed over it), so a record is read whole or not at all, also on NFS or Lustre,
and no lock or database is shared between runs. `sweep plan` writes the first one (`planned`);
the registry is an index rebuilt from the records (`index.py`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from modelzoo_ext.atomic import atomic_file
from modelzoo_ext.errors import UserError
from modelzoo_ext.study.registry import RunRecord
from modelzoo_ext.study.sweep.plan import RunPlan

RECORD_FILE = "record.json"


def read_record(run_dir: Path) -> RunRecord | None:
    """The run's record (None before `sweep plan` wrote one)."""
    path = Path(run_dir) / RECORD_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(
            f"unreadable run record ({exc.msg})", where=str(path), fix="replan the sweep"
        ) from exc
    return RunRecord.from_json(data, str(path))


def write_record(run_dir: Path, record: RunRecord) -> RunRecord:
    """Write `record` atomically (stamping `updated_at`, and `created_at` on the first write)."""
    now = time.time()
    record = record.with_changes(updated_at=now, created_at=record.created_at or now)
    with atomic_file(Path(run_dir) / RECORD_FILE) as tmp:
        tmp.write_text(json.dumps(record.to_json(), indent=2, sort_keys=True) + "\n")
    return record


def update_record(run_dir: Path, **changes: Any) -> RunRecord:
    """Change some fields of the run's record (JSON fields merged, as `Registry.update` does)."""
    record = read_record(run_dir)
    if record is None:
        raise UserError("no run record", where=str(Path(run_dir) / RECORD_FILE), fix="run `sweep plan` first")
    return write_record(run_dir, record.with_changes(**changes))


def planned_record(plan: RunPlan, git_rev: str) -> RunRecord:
    """The record of a run just planned: its grid point and provenance, status `planned`."""
    return RunRecord(
        plan.run_id, status="planned", config_hash=plan.config_hash, git_rev=git_rev, protocol=plan.protocol,
        seeds=plan.seeds, artifacts={"run_dir": str(plan.run_dir)}, **plan.grid_point(),
    )  # fmt: skip


def artifact_checksums(sweep_dir: Path, paths: list[str | Path]) -> dict[str, str]:
    """`sha256:hex` of each file under `sweep_dir` among `paths` (a directory: every file in it), keyed
    by its path relative to `sweep_dir` (files elsewhere, e.g. a shared base model, are left out)."""
    from modelzoo_ext.masks.checksum import file_sha256

    files = []
    for path in map(Path, paths):
        files += (
            sorted(p for p in path.rglob("*") if p.is_file())
            if path.is_dir()
            else [path]
            if path.is_file()
            else []
        )
    return {
        str(f.relative_to(sweep_dir)): f"sha256:{file_sha256(f)}"
        for f in files
        if f.is_relative_to(sweep_dir)
    }
