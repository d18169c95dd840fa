"""A real sweep through `sparse-lora sweep submit` on the single-node SLURM cluster (issue 20's
acceptance): the tiny example sweep (2 CPU fine-tunes, 2 no-fine-tune baselines; 2 training steps,
4 evaluated examples) as an assets job, a training array, its task-wise evaluation array and the
baselines' evaluation array, each task the real entry point (`python -m modelzoo_ext.study.sweep.task`).

One training task fails, another is cancelled while it runs; `sweep status` names each state beside
each run's record; a second `submit` takes exactly those two (no assets job: all built) and they
finish; the report equals the local runner's on the same sweep. Neither the tasks (nor anything they
start) nor `submit` open the registry database: the tasks run with tests/fixtures/task_site on
PYTHONPATH (SLURM exports the submitting environment), whose sitecustomize kills any process that
opens `registry.sqlite` (status 97, a marker file), and also makes a trainer fail or wait on request;
the database's bytes are unchanged until `sweep status` rebuilds it; an audit hook in this process
sees `submit` open no database and `sweep status` open it.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import yaml
from conftest import all_tasks_ended, task_summary, wait_for_tasks

from modelzoo_ext.cli import main
from modelzoo_ext.study.cluster.submit import read_ledger
from modelzoo_ext.study.sweep.records import read_record

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
TINY_PARAMS = REPO / "model_configs" / "params_sparse_lora_tiny.yaml"
TASK_SITE = Path(__file__).parent / "fixtures" / "task_site"
S2S, S2D = (f"tiny__boolq__magnitude__unstructured__s50__{m}__cpu__seed0" for m in ("s2s", "s2d"))
PRUNED = "tiny__boolq__magnitude__unstructured__s50__none__eval__seed0"
DENSE = "tiny__boolq__dense__dense__s00__none__eval__seed0"
TIMEOUT_S = 900  # two shared cores: the whole round takes a few minutes
_wait = partial(wait_for_tasks, timeout_s=TIMEOUT_S, poll_s=1)

_opened: list[str] = []  # databases this process opened (sqlite3.connect), in order


def _watch_sqlite(event: str, args: tuple) -> None:
    if event == "sqlite3.connect":
        _opened.append(str(args[0]))


sys.addaudithook(_watch_sqlite)  # audit hooks stay for the process; this one only records


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _status_lines(sweep: Path, capsys) -> dict[str, str]:
    capsys.readouterr()
    assert main(["sweep", "status", str(sweep)]) == 0
    return {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}


def _db(sweep: Path) -> tuple[bytes, int]:
    path = sweep / "registry.sqlite"
    return path.read_bytes(), path.stat().st_mtime_ns


def test_tiny_sweep_as_job_arrays_fails_cancels_resubmits_and_reports_as_the_local_runner(
    tmp_path, tiny_llama_dir, slurm_cluster, monkeypatch, capsys
):
    spec = yaml.safe_load((REPO / "modelzoo_ext" / "study" / "examples" / "sweep_tiny.yaml").read_text())
    spec["models"] = {"tiny": {"hf_dir": str(tiny_llama_dir), "params": str(TINY_PARAMS)}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(spec))
    local, sweep = tmp_path / "local", tmp_path / "cluster"
    for out in (local, sweep):
        assert main(["sweep", "plan", str(tmp_path / "sweep.yaml"), "--out", str(out)]) == 0

    control = tmp_path / "control"  # the sitecustomize's folder: fail/RUN, hold/RUN, registry-opened
    (control / "fail").mkdir(parents=True)
    (control / "hold").mkdir()
    monkeypatch.setenv("SPARSE_LORA_TEST_DIR", str(control))
    monkeypatch.setenv("PYTHONPATH", f"{TASK_SITE}:{REPO}")
    guarded = subprocess.run(
        [sys.executable, "-c", f"import sqlite3; sqlite3.connect({str(sweep / 'registry.sqlite')!r})"]
    )
    assert guarded.returncode == 97 and (control / "registry-opened").is_file()  # the guard works
    (control / "registry-opened").unlink()
    (control / "fail" / S2D).touch()
    (control / "hold" / S2S).touch()
    db_planned = _db(sweep)
    submit = ["sweep", "submit", str(sweep), "--scheduler", "slurm", "--backend", "cpu", "--job-name", "t",
              "--time", "20:00", "--eval-time", "20:00", "--assets-time", "20:00"]  # fmt: skip

    # -- round 1: assets job, train-0 (s2d fails, s2s cancelled while it runs), eval-after-0, eval-0 --
    opened = len(_opened)
    capsys.readouterr()
    assert main(submit) == 0
    out = capsys.readouterr().out
    assert "done: 0, queued or running: 0, waiting for training elsewhere: 0, to submit: 4" in out
    ledger = read_ledger(sweep)["rounds"][0]
    assert [(a["name"], a["after"], a["runs"]) for a in ledger["arrays"]] == [
        ("assets", None, [S2D, S2S, DENSE, PRUNED]),
        ("train-0", "assets", [S2D, S2S]),
        ("eval-after-0", "train-0", [S2D, S2S]),
        ("eval-0", "assets", [DENSE, PRUNED]),
    ]
    jobs = {a["name"]: a["job_id"] for a in ledger["arrays"]}
    _wait(sweep, lambda s: (control / "hold" / f"{S2S}.reached").exists() and s[S2S]["train"].state.state == "RUNNING",
          "the s2s trainer to run")  # fmt: skip
    assert read_record(sweep / "runs" / S2S).status == "running"
    subprocess.run(["scancel", f"{jobs['train-0']}_1"], check=True)
    states = _wait(sweep, all_tasks_ended, "round 1 to end")
    assert task_summary(states) == {
        S2D: {"assets": "COMPLETED", "train": "FAILED (exit 1, NonZeroExitCode)",
              "eval": "CANCELLED (DependencyNeverSatisfied)"},
        S2S: {"assets": "COMPLETED", "train": "CANCELLED (signal 15)", "eval": "CANCELLED (DependencyNeverSatisfied)"},
        DENSE: {"assets": "COMPLETED", "eval": "COMPLETED"},
        PRUNED: {"assets": "COMPLETED", "eval": "COMPLETED"},
    }  # fmt: skip
    assert not (control / "registry-opened").exists() and _db(sweep) == db_planned
    assert _opened[opened:] == []  # submit opened no database

    lines = _status_lines(sweep, capsys)  # the scheduler's state beside each run's own record
    assert lines[S2D].split()[1:3] == ["failed", "attempts=1"]
    assert f"train: FAILED (exit 1, NonZeroExitCode) [slurm {jobs['train-0']}_0]" in lines[S2D]
    assert f"eval: CANCELLED (DependencyNeverSatisfied) [slurm {jobs['eval-after-0']}_0]" in lines[S2D]
    assert "permanent failure" in lines[S2D]  # the record's error, after the states
    assert lines[S2S].split()[1:3] == ["running", "attempts=1"]  # killed: its record could not say so
    assert f"train: CANCELLED (signal 15) [slurm {jobs['train-0']}_1]" in lines[S2S]
    assert (
        lines[DENSE].split()[1] == "succeeded"
        and f"eval: COMPLETED [slurm {jobs['eval-0']}_0]" in lines[DENSE]
    )
    assert (
        lines[PRUNED].split()[1] == "succeeded"
        and f"eval: COMPLETED [slurm {jobs['eval-0']}_1]" in lines[PRUNED]
    )
    assert lines["assets"] == f"assets job, round 1: COMPLETED [slurm {jobs['assets']}_0]"
    assert any(Path(p) == sweep / "registry.sqlite" for p in _opened[opened:])  # status rebuilt the index

    # -- round 2: exactly the failed and the cancelled run, no assets job -------------------------
    (control / "fail" / S2D).unlink()
    (control / "hold" / S2S).unlink()
    db_status, opened = _db(sweep), len(_opened)
    assert main(submit) == 0
    out = capsys.readouterr().out
    assert "done: 2, queued or running: 0, waiting for training elsewhere: 0, to submit: 2" in out
    assert "shared assets: all present (no assets job)" in out
    second = read_ledger(sweep)["rounds"][1]
    assert [(a["name"], a["after"], a["runs"]) for a in second["arrays"]] == [
        ("train-0", None, [S2D, S2S]),
        ("eval-after-0", "train-0", [S2D, S2S]),
    ]
    states = _wait(sweep, all_tasks_ended, "round 2 to end")
    assert {run: {s: t.state.describe() for s, t in stages.items() if s != "assets"} for run, stages in states.items()} == {
        S2D: {"train": "COMPLETED", "eval": "COMPLETED"},
        S2S: {"train": "COMPLETED", "eval": "COMPLETED"},
        DENSE: {"eval": "COMPLETED"},
        PRUNED: {"eval": "COMPLETED"},
    }  # fmt: skip
    assert states[S2S]["train"].round == 2 and states[DENSE]["eval"].round == 1
    assert not (control / "registry-opened").exists() and _db(sweep) == db_status and _opened[opened:] == []
    assert {run: read_record(sweep / "runs" / run).attempts for run in (S2D, S2S, DENSE, PRUNED)} == {
        S2D: 2, S2S: 2, DENSE: 1, PRUNED: 1,
    }  # fmt: skip
    lines = _status_lines(sweep, capsys)
    assert lines["succeeded=4"] == "succeeded=4"

    # -- the same sweep through the local runner: the same report ----------------------------------
    assert main(["sweep", "run", str(local), "--max-attempts", "1"]) == 0
    for out in (local, sweep):
        assert main(["report", "--registry", str(out / "registry.sqlite"), "--out", str(out / "report")]) == 0
    for table in ("scores_offline.csv", "paired_offline.csv"):
        assert _csv(local / "report" / table) == _csv(sweep / "report" / table)
    # The config hash covers the run's paths; the speed, the machine's load; a mask file, its creation time.
    differ = {"config_hash", "tokens_per_s", "mask_sha256"}
    assert [{k: v for k, v in r.items() if k not in differ} for r in _csv(local / "report" / "runs.csv")] == [
        {k: v for k, v in r.items() if k not in differ} for r in _csv(sweep / "report" / "runs.csv")
    ]
    assert len(_csv(sweep / "report" / "runs.csv")) == 4
