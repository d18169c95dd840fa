"""The registry as an index of a sweep's run records: rebuilt by one process, never written by a run.

`rebuild_index(DIR)` reads every planned run's `record.json` and makes `DIR/registry.sqlite` hold
exactly those records, in one transaction. `sweep plan`, `sweep status`, `report` (given a sweep's
registry) and the local runner call it; a run's stage (`executor.execute_stage`, a cluster task)
never opens the database, so nothing shared is written by many.

A sweep directory planned before runs kept their own records has rows in its registry and no
`record.json`: the first rebuild writes each such row out as the run's record, so no result is lost.
"""

from __future__ import annotations

from pathlib import Path

from modelzoo_ext.study.registry import Registry
from modelzoo_ext.study.sweep.plan import PLAN_FILE, load_spec
from modelzoo_ext.study.sweep.records import RECORD_FILE, read_record, write_record

REGISTRY_FILE = "registry.sqlite"


def run_dirs(sweep_dir: Path) -> list[Path]:
    """The planned runs' directories, ordered by run id."""
    return sorted(path.parent for path in (sweep_dir / "runs").glob(f"*/{PLAN_FILE}"))


def rebuild_index(sweep_dir: str | Path) -> Registry:
    """Rebuild `DIR/registry.sqlite` from the run records of the sweep in `DIR`; returns it."""
    sweep_dir = Path(sweep_dir).resolve()
    load_spec(sweep_dir)  # a planned sweep directory, or a clear error
    dirs = run_dirs(sweep_dir)
    _adopt_rows_without_records(sweep_dir / REGISTRY_FILE, dirs)
    registry = Registry(sweep_dir / REGISTRY_FILE)
    registry.replace_all([record for record in map(read_record, dirs) if record is not None])
    return registry


def _adopt_rows_without_records(path: Path, dirs: list[Path]) -> None:
    """A registry row of a run that has no record file yet becomes its record (older sweep directories)."""
    orphans = [d for d in dirs if not (d / RECORD_FILE).is_file()]
    if not orphans or not path.is_file():
        return
    registry = Registry(path)
    for run_dir in orphans:
        row = registry.get(run_dir.name)
        if row is not None:
            write_record(run_dir, row)
