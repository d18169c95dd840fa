"""Job arrays on a real single-node SLURM cluster (Debian's slurm-wlm 22.05, started by
scripts/slurm_local_cluster.sh): per-task states, task-wise dependency, resubmission, cancel,
hostile text.

The tasks run tests/fixtures/cluster_task.py, which stands in for the per-run entry point and
accepts its arguments (`--sweep DIR --run RUN --stage S`); a run's stage is done when the task
wrote DIR/runs/RUN/STAGE.done, the run's own record. Files under DIR/fail and DIR/hold make a
task fail (exit 3) or keep running until it is cancelled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
from conftest import all_tasks_ended, task_summary, wait_for_tasks

from modelzoo_ext.errors import UserError
from modelzoo_ext.study.cluster import launch
from modelzoo_ext.study.cluster.arrays import RunWork
from modelzoo_ext.study.cluster.spec import StageResources, build_submission
from modelzoo_ext.study.cluster.submit import cancel, read_ledger, submit

pytestmark = pytest.mark.slurm

FAKE_TASK = Path(__file__).parent / "fixtures" / "cluster_task.py"
ENTRY = [sys.executable, str(FAKE_TASK)]
TIMEOUT_S = 120
_wait = partial(wait_for_tasks, timeout_s=TIMEOUT_S)


def _done(sweep: Path):
    return lambda run_id, stage: (sweep / "runs" / run_id / f"{stage}.done").is_file()


def _flag(sweep: Path, kind: str, run_id: str, stage: str) -> Path:
    path = sweep / kind / f"{run_id}.{stage}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    return path


@pytest.fixture
def sweep(tmp_path, slurm_cluster):
    """A sweep directory; whatever its tests left queued or running is cancelled afterwards."""
    path = tmp_path / "sweep"
    path.mkdir()
    yield path
    if read_ledger(path)["rounds"]:
        cancel(path)


def test_states_taskwise_dependency_and_resubmission(sweep):
    runs = [RunWork("r0", True), RunWork("r1", True), RunWork("r2", True), RunWork("r3", True),
            RunWork("base", False, needs_training=False)]  # fmt: skip
    fail = _flag(sweep, "fail", "r1", "train")
    hold = _flag(sweep, "hold", "r2", "train")
    sub = build_submission(scheduler="slurm", job_name="t", max_concurrent=2)
    first = submit(sweep, runs, _done(sweep), sub, entry=ENTRY)
    assert [(a.name, a.run_ids) for a in first.selection.arrays] == [
        ("train-0", ("r0", "r1", "r2", "r3")),
        ("eval-after-0", ("r0", "r1", "r2", "r3")),
        ("eval-0", ("base",)),
    ]
    assert "#SBATCH --array=0-3%2" in (first.round_dir / "train-0.sbatch").read_text()

    # Task-wise: r0's evaluation finishes while r2's training is still running.
    states = _wait(sweep, lambda s: s["r0"]["eval"].state.state == "COMPLETED" and s["r2"]["train"].state.state == "RUNNING",
                   "r0 evaluated while r2 trains")  # fmt: skip
    subprocess.run(["scancel", f"{first.job_ids['train-0']}_2"], check=True)
    states = _wait(sweep, all_tasks_ended, "every task to end")
    got = task_summary(states)
    assert got == {
        "r0": {"train": "COMPLETED", "eval": "COMPLETED"},
        "r1": {"train": "FAILED (exit 3, NonZeroExitCode)", "eval": "CANCELLED (DependencyNeverSatisfied)"},
        "r2": {"train": "CANCELLED (signal 15)", "eval": "CANCELLED (DependencyNeverSatisfied)"},
        "r3": {"train": "COMPLETED", "eval": "COMPLETED"},
        "base": {"eval": "COMPLETED"},
    }
    assert states["r1"]["train"].state.exit_code == 3
    assert states["r1"]["train"].describe().endswith(f"[slurm {first.job_ids['train-0']}_1]")
    assert sorted(p.parent.name for p in sweep.glob("runs/*/eval.done")) == ["base", "r0", "r3"]

    # Resubmission picks up exactly the failed and the cancelled run, and they now finish.
    fail.unlink()
    hold.unlink()
    second = submit(sweep, runs, _done(sweep), sub, entry=ENTRY)
    assert [(a.name, a.run_ids, a.after) for a in second.selection.arrays] == [
        ("train-0", ("r1", "r2"), None),
        ("eval-after-0", ("r1", "r2"), "train-0"),
    ]
    assert second.selection.done == ("r0", "r3", "base")
    assert second.round_dir.name == "round-002"
    states = _wait(sweep, all_tasks_ended, "the resubmitted tasks to end")
    assert task_summary(states) == {run: ({"eval": "COMPLETED"} if run == "base" else
                                      {"train": "COMPLETED", "eval": "COMPLETED"}) for run in ("r0", "r1", "r2", "r3", "base")}  # fmt: skip
    assert states["r1"]["train"].round == 2 and states["r0"]["train"].round == 1
    assert sorted(p.parent.name for p in sweep.glob("runs/*/eval.done")) == ["base", "r0", "r1", "r2", "r3"]
    starts = {
        run: len((sweep / "runs" / run / "train.starts").read_text().split())
        for run in ("r0", "r1", "r2", "r3")
    }
    assert starts == {"r0": 1, "r1": 2, "r2": 2, "r3": 1}

    # Nothing left: a third submit submits nothing and records no round.
    third = submit(sweep, runs, _done(sweep), sub, entry=ENTRY)
    assert third.selection.arrays == () and len(read_ledger(sweep)["rounds"]) == 2
    ledger = read_ledger(sweep)
    assert [[a["name"] for a in r["arrays"]] for r in ledger["rounds"]] == [
        ["train-0", "eval-after-0", "eval-0"], ["train-0", "eval-after-0"],
    ]  # fmt: skip


def test_queued_or_running_runs_are_not_submitted_twice_and_cancel(sweep):
    runs = [RunWork("r0", True)]
    _flag(sweep, "hold", "r0", "train")
    sub = build_submission(scheduler="slurm", job_name="t")
    first = submit(sweep, runs, _done(sweep), sub, entry=ENTRY)
    _wait(sweep, lambda s: s["r0"]["train"].state.state == "RUNNING", "r0 to run")
    again = submit(sweep, runs, _done(sweep), sub, entry=ENTRY)
    assert again.selection.arrays == () and again.selection.active == ("r0",)
    assert sorted(cancel(sweep)) == sorted(first.job_ids.values())
    states = _wait(sweep, all_tasks_ended, "the cancelled tasks to end")
    assert {stage: t.state.state for stage, t in states["r0"].items()} == {
        "train": "CANCELLED",
        "eval": "CANCELLED",
    }


def test_a_failed_assets_job_cancels_the_arrays_that_wait_for_it(sweep, tmp_path):
    """The assets job (here an interpreter that exits 1 stands in for `sweep assets`) fails: the
    training and evaluation arrays never run (afterok with --kill-on-invalid-dep)."""
    python = tmp_path / "failing-python"
    python.write_text("#!/bin/sh\necho 'assets: failing as asked' >&2\nexit 1\n")
    python.chmod(0o755)
    runs = [RunWork("r0", True), RunWork("base", False, needs_training=False)]
    sub = build_submission(scheduler="slurm", job_name="t", python=str(python))
    result = submit(sweep, runs, _done(sweep), sub, entry=ENTRY, missing_assets=lambda ids: ["assets/x"])
    assert [(a.name, a.after) for a in result.selection.arrays] == [
        ("assets", None), ("train-0", "assets"), ("eval-after-0", "train-0"), ("eval-0", "assets"),
    ]  # fmt: skip
    states = _wait(sweep, all_tasks_ended, "every task to end")
    assert task_summary(states) == {
        "r0": {"assets": "FAILED (exit 1, NonZeroExitCode)", "train": "CANCELLED (DependencyNeverSatisfied)",
               "eval": "CANCELLED (DependencyNeverSatisfied)"},
        "base": {"assets": "FAILED (exit 1, NonZeroExitCode)", "eval": "CANCELLED (DependencyNeverSatisfied)"},
    }  # fmt: skip
    assert not (sweep / "runs").exists()  # no task ran


def test_an_assets_job_waits_for_an_earlier_one_still_running(sweep, tmp_path):
    """Two rounds submitted back to back (e.g. `--backend cpu`, then `--backend gpu`): the second
    round's assets job waits until the first one has ended (afterany), so no two build at once."""
    log, hold = tmp_path / "assets.log", tmp_path / "hold"
    python = tmp_path / "holding-python"  # stands in for `sweep assets`: logs its start and end
    python.write_text(
        f"#!/bin/sh\necho start >> {log}\nwhile [ -e {hold} ]; do sleep 0.2; done\necho end >> {log}\n"
    )
    python.chmod(0o755)
    hold.touch()
    sub = build_submission(scheduler="slurm", job_name="t", python=str(python))
    first = submit(
        sweep, [RunWork("r0", True)], _done(sweep), sub, entry=ENTRY, missing_assets=lambda ids: ["a"]
    )
    _wait(sweep, lambda s: s["r0"]["assets"].state.state == "RUNNING", "the first assets job to run")
    second = submit(sweep, [RunWork("r0", True), RunWork("r1", True)], _done(sweep), sub, entry=ENTRY,
                    missing_assets=lambda ids: ["a"])  # fmt: skip
    assert [(a.name, a.run_ids) for a in second.selection.arrays][0] == ("assets", ("r1",))
    job = subprocess.run(
        ["scontrol", "-o", "show", "job", second.job_ids["assets"]], capture_output=True, text=True
    )
    assert (
        f"Dependency=afterany:{first.job_ids['assets']}_" in job.stdout and "JobState=PENDING" in job.stdout
    )
    assert "afterany:" + first.job_ids["assets"] in (second.round_dir / "submit.sh").read_text()
    hold.unlink()
    states = _wait(sweep, all_tasks_ended, "both rounds to end")
    assert {run: states[run]["assets"].state.state for run in ("r0", "r1")} == {
        "r0": "COMPLETED",
        "r1": "COMPLETED",
    }
    assert log.read_text() == "start\nend\nstart\nend\n"  # one after the other


def test_hostile_text_runs_nothing_the_spec_did_not_ask_for(tmp_path, slurm_cluster):
    """A sweep directory, interpreter path and extra directive full of shell syntax, through a real
    sbatch: the task runs in the right directory and nothing else runs."""
    mark = Path(f"/tmp/sparse-lora-hostile-{os.getpid()}-slurm")
    mark.unlink(missing_ok=True)
    touch = f"touch {mark.name}"  # relative (no `/` in a directory name): run anywhere, it leaves a file
    sweep = tmp_path / f"sw $({touch}) `{touch}` 'q' \"dq\" ${{HOME}}\nnl; {touch}"
    sweep.mkdir()
    unquoted = build_submission(
        scheduler="slurm", job_name="t", extra_directives=(f"#SBATCH --comment=$({touch})",)
    )
    with pytest.raises(UserError, match="sbatch refused train-0: sbatch: error: Invalid directive"):
        submit(
            sweep, [RunWork("r0", True)], _done(sweep), unquoted, entry=ENTRY
        )  # sbatch splits words itself
    assert read_ledger(sweep)["rounds"] == []  # nothing submitted, nothing recorded
    sub = build_submission(scheduler="slurm", job_name="t", python=f"/opt/py $({touch})/python",
                           extra_directives=(f'#SBATCH --comment="$({touch})"',),
                           train=StageResources(gpus_per_run=0))  # fmt: skip
    try:
        result = submit(sweep, [RunWork("r0", True)], _done(sweep), sub, entry=ENTRY)
        states = _wait(sweep, all_tasks_ended, "the hostile tasks to end")
    finally:
        if read_ledger(sweep)["rounds"]:
            cancel(sweep)
    assert {stage: t.state.state for stage, t in states["r0"].items()} == {
        "train": "COMPLETED",
        "eval": "COMPLETED",
    }
    assert (sweep / "runs" / "r0" / "eval.done").is_file()
    logs = "".join(p.read_text() for p in (result.round_dir / "logs").iterdir())
    assert "run r0, stage train" in logs and "run r0, stage eval" in logs
    for place in (
        mark,
        Path.home() / mark.name,
        sweep / mark.name,
        result.round_dir / mark.name,
        tmp_path / mark.name,
    ):
        assert not place.exists(), place
    job = subprocess.run(
        ["scontrol", "-o", "show", "job", result.job_ids["train-0"]], capture_output=True, text=True
    )
    assert f"Comment=$({touch})" in job.stdout  # sbatch kept the directive's text; nothing ran it


def test_slurm_multinode_launcher_by_hand(tmp_path, slurm_cluster):
    """The multi-node train script's launcher through bash, with the real `scontrol show hostnames`
    (no multi-node allocation exists here: the script runs by hand with SLURM's variables set)."""
    from modelzoo_ext.study.cluster import slurm
    from modelzoo_ext.study.cluster.arrays import ArrayPlan

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (tmp_path / "train-0.runs").write_text("0\tr0\n1\tr1\n")
    sub = build_submission(scheduler="slurm", job_name="t", python="/soft/venv/bin/python",
                           train=StageResources(gpus_per_run=8, nodes_per_run=2))  # fmt: skip
    script = slurm.render_script(ArrayPlan("train-0", "train", ("r0", "r1")), sub, str(tmp_path / "train-0.runs"),
                                 str(sweep), ENTRY)  # fmt: skip
    (tmp_path / "t.sh").write_text(script)
    env = {
        **os.environ,
        "SLURM_ARRAY_TASK_ID": "1",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_JOB_ID": "4242",
    }
    done = subprocess.run(
        ["bash", str(tmp_path / "t.sh")], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads((sweep / "runs" / "r1" / "train.env.json").read_text())
    assert launch.launcher_from_env(seen) == [
        "srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "/soft/venv/bin/python", "-m",
        "torch.distributed.run", "--nnodes=2", "--nproc-per-node=4", "--rdzv-backend=c10d",
        "--rdzv-endpoint=gpu07:29501", "--rdzv-id=4242",
    ]  # fmt: skip
