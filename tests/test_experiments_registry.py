"""The run registry: round trip, updates, bad input, and 8 concurrent writer processes losing nothing."""

from __future__ import annotations

import multiprocessing as mp

import pytest

from modelzoo_ext.errors import UserError
from modelzoo_ext.study.registry import Registry, RunRecord


def _record(run_id: str, **kw) -> RunRecord:
    base = dict(
        model="tiny",
        task="boolq",
        method="magnitude",
        structure="unstructured",
        sparsity=0.5,
        mode="s2s",
        backend="cpu",
        seed=0,
        config_hash="c" * 16,
        git_rev="abc123",
        mask_sha256="m" * 64,
    )
    return RunRecord(run_id, **{**base, **kw})


def test_round_trip_keeps_every_field(tmp_path):
    reg = Registry(tmp_path / "r.sqlite")
    rec = _record(
        "a", metrics={"boolq/acc": 0.625}, artifacts={"merged": "/x/merged"}, throughput_tokens_per_s=12.5
    )
    reg.put(rec)
    got = reg.get("a")
    assert got.metrics == {"boolq/acc": 0.625}
    assert got.artifacts == {"merged": "/x/merged"}
    assert (got.sparsity, got.mode, got.config_hash, got.mask_sha256) == (0.5, "s2s", "c" * 16, "m" * 64)
    assert got.throughput_tokens_per_s == 12.5
    assert reg.get("missing") is None


def test_update_merges_metrics_and_keeps_created_at(tmp_path):
    reg = Registry(tmp_path / "r.sqlite")
    reg.put(_record("a", metrics={"boolq/acc": 0.5}))
    created = reg.get("a").created_at
    reg.update("a", status="succeeded", metrics={"hellaswag/acc_norm": 0.25}, attempts=2)
    got = reg.get("a")
    assert got.status == "succeeded" and got.attempts == 2
    assert got.metrics == {"boolq/acc": 0.5, "hellaswag/acc_norm": 0.25}
    reg.put(_record("a"))  # replace keeps the original creation time
    assert reg.get("a").created_at == created
    assert [r.run_id for r in reg.runs(status="planned")] == ["a"]


def test_a_registry_of_the_previous_version_gains_the_new_columns(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as conn:  # the schema before protocols, seeds and throughput details
        conn.execute(
            "CREATE TABLE runs (run_id TEXT PRIMARY KEY, status TEXT NOT NULL, model TEXT, task TEXT, method TEXT, "
            "structure TEXT, sparsity REAL, mode TEXT, backend TEXT, seed INTEGER, config_hash TEXT, git_rev TEXT, "
            "mask_sha256 TEXT, metrics_json TEXT NOT NULL DEFAULT '{}', throughput_tokens_per_s REAL, "
            "artifacts_json TEXT NOT NULL DEFAULT '{}', attempts INTEGER NOT NULL DEFAULT 0, error TEXT, "
            "created_at REAL NOT NULL, updated_at REAL NOT NULL, started_at REAL, finished_at REAL)"
        )
        conn.execute(
            "INSERT INTO runs (run_id, status, created_at, updated_at) VALUES ('old', 'succeeded', 1, 1)"
        )
    reg = Registry(path)
    old = reg.get("old")
    assert old.status == "succeeded" and old.protocol is None and old.seeds == {} and old.throughput == {}
    reg.put(
        _record(
            "new", protocol="official", seeds={"sweep": 1, "lora_init": 7}, throughput={"tokens_per_s": 3.0}
        )
    )
    new = reg.get("new")
    assert (
        new.protocol == "official" and new.seeds["lora_init"] == 7 and new.throughput == {"tokens_per_s": 3.0}
    )


def test_bad_input_is_a_user_error(tmp_path):
    reg = Registry(tmp_path / "r.sqlite")
    with pytest.raises(UserError, match="status"):
        _record("a", status="done")
    with pytest.raises(UserError, match="no run"):
        reg.update("nope", status="failed")
    reg.put(_record("a"))
    with pytest.raises(UserError, match="unknown registry field"):
        reg.update("a", colour="red")
    with pytest.raises(UserError, match="mode"):
        reg.update("a", mode="sparse")
    assert reg.get("a").mode == "s2s"  # the failed update changed nothing
    with pytest.raises(UserError, match="unknown registry column"):
        reg.runs(colour="red")


def test_wal_mode(tmp_path):
    import sqlite3

    Registry(tmp_path / "r.sqlite")
    with sqlite3.connect(tmp_path / "r.sqlite") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def _writer(path: str, worker: int, n: int) -> None:
    reg = Registry(path)
    for i in range(n):
        run_id = f"w{worker}-{i:03d}"
        reg.put(_record(run_id, seed=worker, metrics={"i": i}))
        reg.update(run_id, status="succeeded", metrics={"worker": worker})


def test_eight_processes_times_100_runs_lose_nothing(tmp_path):
    path = str(tmp_path / "r.sqlite")
    Registry(path)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, w, 100)) for w in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0] * 8
    runs = Registry(path).runs()
    assert len(runs) == 800
    assert {r.run_id for r in runs} == {f"w{w}-{i:03d}" for w in range(8) for i in range(100)}
    assert all(r.status == "succeeded" for r in runs)
    assert all(r.metrics == {"i": int(r.run_id[-3:]), "worker": r.seed} for r in runs)
