"""The run registry: one SQLite row per run, the index the report and `sweep status` read.

A sweep's runs do not write it: each run keeps its own record (`RunRecord`, written atomically as
`runs/<run_id>/record.json` by `modelzoo_ext.study.sweep.records`), and one process rebuilds this
index from those records (`sweep status`, `report`, the local runner at its end), so tasks on
many nodes never open a database on a shared filesystem. Every number the report prints comes from
here, with its provenance (config hash, git revision, mask checksum, software versions, artifact
checksums). The database itself stays safe for concurrent writers on one machine (the demo, tests):
SQLite in WAL mode lets readers proceed while one writer writes; writers take the write lock up
front (`BEGIN IMMEDIATE`), wait for it (`busy_timeout`), and retry with backoff if the wait runs out.

Columns that identify a run in the grid (model, task, method, structure, sparsity, mode, backend,
seed) and its data protocol (`official` or `offline`) are plain columns so the report can group by
them; metrics (each a value with its stderr and 95% interval), the derived seeds, throughput,
artifact paths, artifact checksums and software versions are JSON. Modes: `s2s`, `s2d`
(sparse-LoRA fine-tunes), `lora` (plain LoRA on the dense model: the dense baseline), `none` (no
fine-tune: the dense model at sparsity 0, the pruned model otherwise). Statuses: planned -> running
-> trained (exports checked) -> succeeded (evaluated); failed or stopped at any point. A registry
written by an older version gains the new columns when it is opened.
"""

from __future__ import annotations

import dataclasses
import json
import random
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelzoo_ext.errors import UserError

STATUSES = ("planned", "running", "trained", "succeeded", "failed", "stopped")
MODES = ("s2s", "s2d", "lora", "none")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    model TEXT, task TEXT, method TEXT, structure TEXT, sparsity REAL, mode TEXT,
    backend TEXT, seed INTEGER, protocol TEXT,
    config_hash TEXT, git_rev TEXT, mask_sha256 TEXT,
    metrics_json TEXT NOT NULL DEFAULT '{}',
    throughput_tokens_per_s REAL,
    throughput_json TEXT NOT NULL DEFAULT '{}',
    seeds_json TEXT NOT NULL DEFAULT '{}',
    artifacts_json TEXT NOT NULL DEFAULT '{}',
    checksums_json TEXT NOT NULL DEFAULT '{}',
    versions_json TEXT NOT NULL DEFAULT '{}',
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    created_at REAL NOT NULL, updated_at REAL NOT NULL, started_at REAL, finished_at REAL
)
"""


@dataclass
class RunRecord:
    """One run: where it sits in the grid, its provenance, its results and artifact paths."""

    run_id: str
    status: str = "planned"
    model: str | None = None
    task: str | None = None
    method: str | None = None
    structure: str | None = None
    sparsity: float | None = None
    mode: str | None = None
    backend: str | None = None
    seed: int | None = None
    protocol: str | None = None
    config_hash: str | None = None
    git_rev: str | None = None
    mask_sha256: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    throughput_tokens_per_s: float | None = None
    throughput: dict[str, Any] = field(default_factory=dict)
    seeds: dict[str, int] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    checksums: dict[str, str] = field(default_factory=dict)  # artifact (path under the sweep) -> sha256:hex
    versions: dict[str, dict[str, str | None]] = field(default_factory=dict)  # stage -> software -> version
    attempts: int = 0
    error: str | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise UserError(f"run status must be one of {STATUSES}, got {self.status!r}", where=self.run_id)
        if self.mode is not None and self.mode not in MODES:
            raise UserError(f"run mode must be one of {MODES}, got {self.mode!r}", where=self.run_id)

    def with_changes(self, **changes: Any) -> RunRecord:
        """A copy with some fields changed; JSON fields (`metrics`, `artifacts`, ...) are merged."""
        record = dataclasses.replace(self, **{name: dict(getattr(self, name)) for name in JSON_FIELDS})
        for name, value in changes.items():
            if name in JSON_FIELDS:
                getattr(record, name).update(value)
            elif name in RunRecord.__dataclass_fields__:
                setattr(record, name, value)
            else:
                raise UserError(f"unknown registry field {name!r}", fix=f"use one of {_COLUMNS}")
        record.__post_init__()
        return record

    def to_json(self) -> dict[str, Any]:
        """Every field, JSON-ready (a run's record file)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> RunRecord:
        """A record from `to_json`'s dict; a UserError naming `where` for a field this version lacks."""
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise UserError(
                f"run record with unknown field(s) {sorted(unknown)}", where=where,
                fix="read it with the version of modelzoo-sparse-lora that wrote it (or a newer one)",
            )  # fmt: skip
        return cls(**data)

    def to_row(self) -> dict[str, Any]:
        row = dataclasses.asdict(self)
        for name in JSON_FIELDS:
            row[f"{name}_json"] = json.dumps(row.pop(name), sort_keys=True)
        return row

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> RunRecord:
        values = dict(row)
        for name in JSON_FIELDS:
            values[name] = json.loads(values.pop(f"{name}_json"))
        return cls(**values)


JSON_FIELDS = ("metrics", "throughput", "seeds", "artifacts", "checksums", "versions")
_COLUMNS = [f.name for f in dataclasses.fields(RunRecord) if f.name not in JSON_FIELDS] + [
    f"{name}_json" for name in JSON_FIELDS
]
# Columns added after the first registries were written: (name, SQL type and default).
_ADDED_COLUMNS = {
    "protocol": "TEXT",
    "throughput_json": "TEXT NOT NULL DEFAULT '{}'",
    "seeds_json": "TEXT NOT NULL DEFAULT '{}'",
    "checksums_json": "TEXT NOT NULL DEFAULT '{}'",
    "versions_json": "TEXT NOT NULL DEFAULT '{}'",
}


class Registry:
    """A SQLite run registry at `path` (created on first use).

    Each call opens its own connection, so one `Registry` may be shared by threads and a path by
    processes. Writes are atomic per call.
    """

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 60.0, max_retries: int = 20) -> None:
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self.max_retries = max_retries
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._write() as conn:
            conn.execute(_SCHEMA)
            present = {row[1] for row in conn.execute("PRAGMA table_info(runs)")}
            for name, sql_type in _ADDED_COLUMNS.items():
                if name not in present:
                    conn.execute(f"ALTER TABLE runs ADD COLUMN {name} {sql_type}")
        with self._connect() as conn:
            conn.execute("PRAGMA journal_mode=WAL")

    # -- writing ---------------------------------------------------------------------------------
    def put(self, record: RunRecord) -> None:
        """Insert `record`, or replace the row with its `run_id` (keeping the original `created_at`)."""
        now = time.time()
        row = record.to_row()
        row["updated_at"] = now
        with self._write() as conn:
            existing = conn.execute(
                "SELECT created_at FROM runs WHERE run_id = ?", (record.run_id,)
            ).fetchone()
            row["created_at"] = existing[0] if existing else (record.created_at or now)
            placeholders = ", ".join(f":{c}" for c in _COLUMNS)
            conn.execute(f"INSERT OR REPLACE INTO runs ({', '.join(_COLUMNS)}) VALUES ({placeholders})", row)

    def update(self, run_id: str, **changes: Any) -> RunRecord:
        """Change some fields of an existing run in one transaction; `metrics`/`artifacts` are merged."""
        with self._write() as conn:
            found = conn.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if found is None:
                raise UserError(f"no run {run_id!r} in the registry", where=str(self.path))
            record = RunRecord.from_row(found).with_changes(**changes)
            row = record.to_row()
            row["updated_at"] = time.time()
            conn.execute(
                f"UPDATE runs SET {', '.join(f'{c} = :{c}' for c in _COLUMNS)} WHERE run_id = :run_id", row
            )
        return record

    def replace_all(self, records: list[RunRecord]) -> None:
        """Make the registry hold exactly `records`, as they are (timestamps included), in one transaction."""
        placeholders = ", ".join(f":{c}" for c in _COLUMNS)
        with self._write() as conn:
            conn.execute("DELETE FROM runs")
            conn.executemany(
                f"INSERT INTO runs ({', '.join(_COLUMNS)}) VALUES ({placeholders})",
                [r.to_row() for r in records],
            )

    # -- reading ---------------------------------------------------------------------------------
    def get(self, run_id: str) -> RunRecord | None:
        with self._connect() as conn:
            row = conn.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return RunRecord.from_row(row) if row else None

    def runs(self, **where: Any) -> list[RunRecord]:
        """All runs (ordered by `run_id`) whose columns equal the given values, e.g. `status="succeeded"`."""
        unknown = [k for k in where if k not in _COLUMNS]
        if unknown:
            raise UserError(f"unknown registry column(s) {unknown}", fix=f"use one of {_COLUMNS}")
        clause = " AND ".join(f"{k} = :{k}" for k in where)
        sql = "SELECT * FROM runs" + (f" WHERE {clause}" if clause else "") + " ORDER BY run_id"
        with self._connect() as conn:
            return [RunRecord.from_row(r) for r in conn.execute(sql, where).fetchall()]

    # -- connections -----------------------------------------------------------------------------
    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
        try:
            yield conn
        finally:
            conn.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that holds the write lock from its start (so it cannot deadlock midway).

        Taking the lock is retried with jittered backoff when the database stays busy past the
        busy timeout; once taken, the body runs exactly once and commits or rolls back.
        """
        with self._connect() as conn:
            self._begin_immediate(conn)
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _begin_immediate(self, conn: sqlite3.Connection) -> None:
        for attempt in range(self.max_retries + 1):
            try:
                conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or attempt == self.max_retries:
                    raise
                time.sleep(min(2.0, 0.01 * 2**attempt) * (0.5 + random.random()))


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    message = str(exc).lower()
    return "locked" in message or "busy" in message
