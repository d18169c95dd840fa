"""Job-array scripts for SLURM and PBS as text, PBS scripts run by hand with bash, and the parsers.

No scheduler is needed here: PBS cannot be installed on the test machines, so its scripts are
checked as text and run with bash and PBS_ARRAY_INDEX set (the variable PBS sets in a subjob);
its `qstat -F json` parser reads output in the documented format. The SLURM scripts are submitted
to a real cluster in test_cluster_slurm.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import modelzoo_ext.cli as cli
from modelzoo_ext.errors import UserError
from modelzoo_ext.study.cluster import launch, pbs, slurm
from modelzoo_ext.study.cluster.arrays import ArrayPlan, RunWork, plan_arrays
from modelzoo_ext.study.cluster.spec import StageResources, build_submission, memory_mib, time_seconds
from modelzoo_ext.study.cluster.submit import read_ledger, submit

FAKE_TASK = Path(__file__).parent / "fixtures" / "cluster_task.py"
ENTRY = [sys.executable, str(FAKE_TASK)]
HOSTILE = ["$(touch {mark})", "`touch {mark}`", "a'b", 'a"b', "a\nb", "a;b", "a b", "", "-x"]


def _sub(scheduler="slurm", **fields):
    return build_submission(scheduler=scheduler, job_name="t", **fields)


# -- validation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("field", ["account", "partition", "job_name", "assets_partition"])
@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_names_are_refused(field, value, tmp_path):
    mark = tmp_path / "x"
    with pytest.raises(UserError, match=field):
        build_submission(scheduler="slurm", **{field: value.format(mark=mark)})
    assert not mark.exists()


@pytest.mark.parametrize(
    "scheduler, directive",
    [
        ("slurm", "#SBATCH --qos=high\ntouch /tmp/x"),  # a newline would end the comment
        ("slurm", "#SBATCH --qos=high\r"),
        ("slurm", "--qos=high"),  # not a directive line
        ("slurm", "#SBATCH"),
        ("slurm", "#SBATCH qos"),
        ("slurm", "#PBS -l walltime=1:00:00"),  # the other scheduler's
        ("slurm", "#SBATCH --array=0-3"),  # what submit sets itself
        ("slurm", "#SBATCH -a 0-3"),
        ("slurm", "#SBATCH --output=/tmp/o"),
        ("slurm", "#SBATCH -o/tmp/o"),
        ("slurm", "#SBATCH --dependency=afterok:1"),
        ("slurm", "#SBATCH --qos=high --job-name=x"),
        ("slurm", "#SBATCH --chdir=/"),
        ("slurm", "#SBATCH --comment='unterminated"),
        ("pbs", "#PBS -J 0-3"),
        ("pbs", "#PBS -N x"),
        ("pbs", "#PBS -W depend=afterok:1"),
        ("pbs", "#PBS -Wdepend=afterok:1"),
        ("pbs", "#PBS -W max_run_subjobs=2"),
        ("pbs", "#PBS -o /tmp/o"),
        ("pbs", "#SBATCH --qos=high"),
    ],
)
def test_extra_directives_must_be_one_unreserved_directive_line(scheduler, directive):
    with pytest.raises(UserError, match="extra_directives"):
        build_submission(scheduler=scheduler, extra_directives=(directive,))


@pytest.mark.parametrize(
    "scheduler, directive",
    [
        ("slurm", "#SBATCH --qos=high"),
        ("slurm", "#SBATCH --constraint=a100 --exclusive"),
        ("slurm", "#SBATCH --comment=$(touch /tmp/x)"),  # a comment to bash; sbatch does not run it
        ("pbs", "#PBS -l filesystems=home:eagle"),
        ("pbs", "#PBS -W group_list=proj"),
    ],
)
def test_extra_directives_pass_through_verbatim(scheduler, directive):
    sub = build_submission(scheduler=scheduler, job_name="t", extra_directives=(directive,))
    module = slurm if scheduler == "slurm" else pbs
    script = module.render_script(ArrayPlan("train-0", "train", ("r0",)), sub, "/s/l.runs", "/s", ENTRY)
    lines = script.splitlines()
    assert directive in lines
    # before the first command: schedulers stop reading directives there
    assert lines.index(directive) < lines.index("set -euo pipefail")


@pytest.mark.parametrize(
    "text, seconds",
    [("30", 1800), ("5:30", 330), ("12:00:00", 43200), ("1-12", 129600), ("1-12:30", 131400),
     ("2-00:00:01", 172801)],
)  # fmt: skip
def test_time_limits(text, seconds):
    assert time_seconds(text) == seconds


@pytest.mark.parametrize("text, mib", [("64G", 65536), ("64GB", 65536), ("64GiB", 65536), ("500M", 500),
                                       ("1T", 1048576), ("1536K", 2), ("700", 700), ("2g", 2048)])  # fmt: skip
def test_memory(text, mib):
    assert memory_mib(text) == mib


@pytest.mark.parametrize("bad", [{"time": "12h"}, {"time": "1:2:3:4"}, {"mem_per_node": "lots"},
                                 {"gpus_per_run": 6, "nodes_per_run": 4}, {"nodes_per_run": 0}])  # fmt: skip
def test_bad_resources_are_refused(bad):
    with pytest.raises(UserError, match="train"):
        build_submission(scheduler="slurm", train=bad)


# -- SLURM scripts --------------------------------------------------------------------------------
def _directives(script: str, prefix: str) -> list[str]:
    return [line.removeprefix(prefix + " ") for line in script.splitlines() if line.startswith(prefix + " ")]


def test_slurm_script_directives():
    sub = _sub(account="proj42", partition="gpu,debug", max_concurrent=4,
               train=StageResources(time="1-12:00:00", gpus_per_run=8, nodes_per_run=2, cpus_per_node=32,
                                    mem_per_node="256G"))  # fmt: skip
    script = slurm.render_script(
        ArrayPlan("train-0", "train", ("r0", "r1", "r2")), sub, "/s/l.runs", "/s", ENTRY
    )
    assert _directives(script, "#SBATCH") == [
        "--job-name=t-train-0",
        "--array=0-2%4",
        "--output=logs/train-0_%A_%a.out",
        "--nodes=2",
        "--ntasks-per-node=1",
        "--gpus-per-node=4",
        "--cpus-per-task=32",
        "--mem=262144M",
        "--time=1-12:00:00",
        "--account=proj42",
        "--partition=gpu,debug",
    ]
    unthrottled = slurm.render_script(ArrayPlan("eval-0", "eval", ("r0",)), _sub(), "/s/l.runs", "/s", ENTRY)
    assert _directives(unthrottled, "#SBATCH") == [
        "--job-name=t-eval-0", "--array=0-0", "--output=logs/eval-0_%A_%a.out", "--nodes=1", "--ntasks-per-node=1",
    ]  # fmt: skip


@pytest.mark.parametrize("char", ["\\", "%"])
def test_paths_slurm_cannot_log_under_are_refused(tmp_path, char):
    """SLURM's output-path patterns eat `\\` and `%` of the directory (the task then fails unlogged)."""
    sweep = tmp_path / f"sweep{char}x"
    sweep.mkdir()
    with pytest.raises(UserError, match="SLURM cannot write job logs"):
        submit(sweep, [RunWork("r0", True)], lambda r, s: False, _sub(), entry=ENTRY)
    assert not (sweep / "scheduler").exists()


def test_slurm_submit_commands():
    assert slurm.submit_argv("train-0.sbatch", None) == ["sbatch", "--parsable", "train-0.sbatch"]
    assert slurm.submit_argv("eval-after-0.sbatch", "41") == [
        "sbatch", "--parsable", "--dependency=aftercorr:41", "--kill-on-invalid-dep=yes", "eval-after-0.sbatch",
    ]  # fmt: skip
    assert slurm.submit_argv("train-0.sbatch", "40", kind="ok") == [
        "sbatch", "--parsable", "--dependency=afterok:40", "--kill-on-invalid-dep=yes", "train-0.sbatch",
    ]  # fmt: skip
    assert slurm.submit_argv("assets.sbatch", "38:39", kind="any")[2] == "--dependency=afterany:38:39"
    assert slurm.parse_job_id("41\n") == "41"
    assert slurm.parse_job_id("41;ci\n") == "41"
    with pytest.raises(UserError):
        slurm.parse_job_id("sbatch: error: Batch job submission failed")


# Captured from `squeue -h -t all -r -j ... -O ArrayJobID:|,ArrayTaskID:|,State:|,exit_code:|,Reason:|`
# on slurm-wlm 22.05.8 (scripts/slurm_local_cluster.sh): array 1 (task 1 exits 3; task 2 still held
# by the %2 throttle), array 2 (aftercorr on 1), array 76 (task 1 scancel'ed while running), job 78
# (not an array).
SQUEUE_SAMPLE = """\
1|2|PENDING|0|JobArrayTaskLimit|
2|1|CANCELLED|0|DependencyNeverSatisfied|
1|0|RUNNING|0|None|
1|1|FAILED|768|NonZeroExitCode|
2|0|COMPLETED|0|None|
78|N/A|COMPLETED|0|None|
76|1|CANCELLED|15|None|
"""


def test_parse_squeue():
    states = slurm.parse_squeue(SQUEUE_SAMPLE)
    assert set(states) == {
        ("1", 2),
        ("2", 1),
        ("1", 0),
        ("1", 1),
        ("2", 0),
        ("76", 1),
    }  # not the plain job 78
    assert states[("1", 2)].state == "PENDING" and states[("1", 2)].reason == "JobArrayTaskLimit"
    assert states[("1", 1)].state == "FAILED" and states[("1", 1)].exit_code == 3
    assert states[("1", 1)].describe() == "FAILED (exit 3, NonZeroExitCode)"
    assert states[("2", 1)].describe() == "CANCELLED (DependencyNeverSatisfied)"
    assert states[("76", 1)].signal == 15 and states[("76", 1)].exit_code is None
    assert states[("1", 0)].active and not states[("2", 0)].active


def test_parse_sacct():
    # `sacct -n -P -X --format=JobID,State,ExitCode` (slurm's documented -P output)
    text = (
        "5_0|COMPLETED|0:0\n5_1|FAILED|3:0\n5_2|CANCELLED by 0|0:15\n5_[3-9]|PENDING|0:0\n5_10|TIMEOUT|0:1\n"
    )
    states = slurm.parse_sacct(text)
    assert {k: (v.state, v.exit_code, v.signal) for k, v in states.items()} == {
        ("5", 0): ("COMPLETED", 0, None),
        ("5", 1): ("FAILED", 3, None),
        ("5", 2): ("CANCELLED", 0, 15),
        ("5", 10): ("TIMEOUT", 0, 1),
    }


# -- PBS scripts ----------------------------------------------------------------------------------
def test_pbs_script_directives():
    sub = _sub("pbs", account="proj42", partition="prod", max_concurrent=4,
               train=StageResources(time="1-12:00:00", gpus_per_run=8, nodes_per_run=2, cpus_per_node=32,
                                    mem_per_node="256G"))  # fmt: skip
    script = pbs.render_script(
        ArrayPlan("train-0", "train", ("r0", "r1", "r2")), sub, "/s/l.runs", "/s", ENTRY
    )
    assert _directives(script, "#PBS") == [
        "-N t-train-0",
        "-J 0-2%4",
        "-o logs/train-0.^array_index^.out",
        "-j oe",
        "-V",
        "-l select=2:ncpus=32:ngpus=4:mem=262144mb",
        "-l place=scatter",
        "-l walltime=36:00:00",
        "-A proj42",
        "-q prod",
    ]


def test_pbs_polaris_style_select_and_single_subjob():
    """Polaris allocates whole nodes (no GPU count in the chunk) and needs its own select items."""
    sub = _sub("pbs", pbs_gpu_resource=None, pbs_select=("system=polaris",),
               extra_directives=("#PBS -l filesystems=home:eagle",),
               eval=StageResources(gpus_per_run=1, time="30"))  # fmt: skip
    script = pbs.render_script(ArrayPlan("eval-0", "eval", ("r0",)), sub, "/s/l.runs", "/s", ENTRY)
    assert _directives(script, "#PBS") == [
        "-N t-eval-0", "-J 0-1:2", "-o logs/eval-0.^array_index^.out", "-j oe", "-V",
        "-l select=1:system=polaris", "-l walltime=00:30:00", "-l filesystems=home:eagle",
    ]  # fmt: skip
    assert pbs.array_range(1, 3) == "0-1:2%3"  # X < Y, step 2: index 0 only
    assert pbs.array_range(5, None) == "0-4"


def test_pbs_submit_commands():
    assert pbs.submit_argv("train-0.pbs", None) == ["qsub", "train-0.pbs"]
    assert pbs.submit_argv("eval-after-0.pbs", "77[].pbs01") == [
        "qsub", "-W", "depend=afterany:77[].pbs01", "eval-after-0.pbs",
    ]  # fmt: skip
    assert pbs.submit_argv("train-0.pbs", "76[].pbs01", kind="ok") == [
        "qsub", "-W", "depend=afterok:76[].pbs01", "train-0.pbs",
    ]  # fmt: skip
    assert pbs.parse_job_id("77[].pbs01.example.org\n") == "77[].pbs01.example.org"
    assert pbs.job_key("77[].pbs01.example.org") == "77"
    with pytest.raises(UserError):
        pbs.parse_job_id("qsub: Unknown queue")


def _write_run_list(path: Path, runs: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{i}\t{r}\n" for i, r in enumerate(runs)))
    return path


def _run_by_hand(script: str, tmp: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`bash SCRIPT` in `tmp` with `env` added: what PBS's MoM does with a subjob's script."""
    path = tmp / "by_hand.sh"
    path.write_text(script)
    return subprocess.run(["bash", str(path)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env}, cwd=tmp)  # fmt: skip


def test_pbs_script_run_by_hand_picks_the_run_of_its_index(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    runs = ["m__boolq__a", "m__boolq__b", "m__boolq__c"]
    run_list = _write_run_list(tmp_path / "train-0.runs", runs)
    script = pbs.render_script(
        ArrayPlan("train-0", "train", tuple(runs)), _sub("pbs"), str(run_list), str(sweep), ENTRY
    )
    for index in (2, 0):
        done = _run_by_hand(script, tmp_path, {"PBS_ARRAY_INDEX": str(index)})
        assert done.returncode == 0, done.stderr
        assert f"run {runs[index]}, stage train, array index {index}" in done.stdout
    assert sorted(p.parent.name for p in sweep.glob("runs/*/train.done")) == [runs[0], runs[2]]
    beyond = _run_by_hand(script, tmp_path, {"PBS_ARRAY_INDEX": "3"})
    assert beyond.returncode == 2 and "no run for array index 3" in beyond.stderr
    outside = _run_by_hand(script, tmp_path, {})
    assert outside.returncode != 0 and "job array task" in outside.stderr


def test_pbs_multinode_launcher_by_hand(tmp_path):
    """The launcher the task exports, through bash, read back as the executor reads it."""
    sweep, nodes = tmp_path / "sweep", tmp_path / "nodefile"
    sweep.mkdir()
    nodes.write_text("x3001c0s1b0n0.hsn\nx3001c0s1b1n0.hsn\n")
    python = "/soft/my venv/$(touch $HOSTILE_MARK)/python'"  # spaces, quotes, $(...) reach the task literally
    sub = _sub("pbs", python=python, train=StageResources(gpus_per_run=8, nodes_per_run=2))
    run_list = _write_run_list(tmp_path / "train-0.runs", ["r0", "r1"])
    script = pbs.render_script(
        ArrayPlan("train-0", "train", ("r0", "r1")), sub, str(run_list), str(sweep), ENTRY
    )
    mark = tmp_path / "mark"
    env = {
        "PBS_ARRAY_INDEX": "1",
        "PBS_NODEFILE": str(nodes),
        "PBS_JOBID": "77[1].pbs01",
        "HOSTILE_MARK": str(mark),
    }
    done = _run_by_hand(script, tmp_path, env)
    assert done.returncode == 0, done.stderr
    seen = json.loads((sweep / "runs" / "r1" / "train.env.json").read_text())
    assert launch.launcher_from_env(seen) == [
        "mpiexec", "-n", "2", "--ppn", "1", python, "-m", "torch.distributed.run",
        "--nnodes=2", "--nproc-per-node=4", "--rdzv-backend=c10d", "--rdzv-endpoint=x3001c0s1b0n0.hsn:29501",
        "--rdzv-id=77[1].pbs01",
    ]  # fmt: skip
    assert not mark.exists()


def test_single_node_launcher_and_none_for_cpu():
    lines = launch.launcher_lines("slurm", "/v/python", nodes=1, gpus_per_node=4, rdzv_port=29500)
    assert lines == [
        "export SPARSE_LORA_LAUNCHER='/v/python -m torch.distributed.run --standalone --nproc-per-node=4'"
    ]
    assert launch.launcher_lines("pbs", "/v/python", nodes=1, gpus_per_node=0, rdzv_port=29500) == []
    assert launch.launcher_from_env({}) is None
    eval_script = slurm.render_script(ArrayPlan("eval-0", "eval", ("r0",)),
                                      _sub(eval=StageResources(gpus_per_run=1)), "/s/l.runs", "/s", ENTRY)  # fmt: skip
    assert "SPARSE_LORA_LAUNCHER" not in eval_script  # evaluation is one process


def test_hostile_paths_are_quoted_in_pbs_script_run_by_hand(tmp_path):
    """A sweep directory and interpreter path full of shell syntax reach the task literally."""
    mark = Path(f"/tmp/sparse-lora-hostile-{os.getpid()}-pbs")
    mark.unlink(missing_ok=True)
    hostile = "sw $(touch $HOSTILE_MARK) `touch $HOSTILE_MARK` 'q' \"dq\" \\ ${HOME}\nnl; touch $HOSTILE_MARK"
    sweep = tmp_path / hostile
    sweep.mkdir()
    python = "/opt/py $(touch $HOSTILE_MARK)/bin/python'"
    sub = _sub("pbs", python=python, train=StageResources(gpus_per_run=2))
    run_list = _write_run_list(sweep / "train-0.runs", ["r0"])
    script = pbs.render_script(ArrayPlan("train-0", "train", ("r0",)), sub, str(run_list), str(sweep), ENTRY)
    done = _run_by_hand(script, tmp_path, {"PBS_ARRAY_INDEX": "0", "HOSTILE_MARK": str(mark)})
    assert done.returncode == 0, done.stderr
    assert (sweep / "runs" / "r0" / "train.done").is_file()
    seen = json.loads((sweep / "runs" / "r0" / "train.env.json").read_text())
    assert launch.launcher_from_env(seen)[0] == python
    assert not mark.exists()


# -- qstat -F json ---------------------------------------------------------------------------------
def test_parse_qstat_json_documented_single_job():
    """The example of OpenPBS's design page for `qstat -f -F json` (PP-483): a plain queued job has no
    array index, so it maps to no task."""
    doc = {"timestamp": 1479277336, "pbs_version": "14.1", "pbs_server": "vbox",
           "Jobs": {"1.vbox": {"Job_Name": "STDIN", "Job_Owner": "root@vbox", "job_state": "Q", "queue": "workq",
                               "server": "vbox", "Checkpoint": "u", "Hold_Types": "n", "Join_Path": "n"}}}  # fmt: skip
    assert pbs.parse_qstat_json(json.dumps(doc)) == {}


def test_parse_qstat_json_array():
    """An array in the documented format: subjob ids `SEQ[i].server`, job_state, substate (job.h),
    Exit_status (job exec codes of job.h; 256 + signal for a job killed by a signal)."""
    sample = (Path(__file__).parent / "fixtures" / "pbs_qstat_array.json").read_text()
    states = pbs.parse_qstat_json(sample)
    got = {index: (s.state, s.exit_code, s.signal) for (job, index), s in states.items() if job == "1234"}
    assert got == {
        0: ("COMPLETED", 0, None),
        1: ("FAILED", 3, None),
        2: ("CANCELLED", None, 15),  # substate 91: deleted while running (256 + SIGTERM)
        3: ("TIMEOUT", -29, None),
        4: ("RUNNING", None, None),
        5: ("PENDING", None, None),
        6: ("FAILED", None, 9),
        7: ("CANCELLED", None, None),  # deleted before it ran: no Exit_status
    }
    assert states[("1234", 5)].reason.startswith("Not Running")
    assert set(k[0] for k in states) == {"1234"}  # the parent `1234[]` is not a task


# -- which runs go where --------------------------------------------------------------------------
def test_plan_arrays_selects_what_is_not_done():
    runs = [RunWork("a", True), RunWork("b", True), RunWork("c", True), RunWork("cs3", False),
            RunWork("cs3done", False), RunWork("base", False, needs_training=False), RunWork("busy", True),
            RunWork("trained", True), RunWork("finished", True)]  # fmt: skip
    done = {("cs3done", "train"), ("trained", "train"), ("finished", "train"), ("finished", "eval")}
    selection = plan_arrays(runs, lambda r, s: (r, s) in done, {"busy"}.__contains__, limit=2)
    assert [(a.name, a.stage, a.run_ids, a.after) for a in selection.arrays] == [
        ("train-0", "train", ("a", "b"), None),
        ("eval-after-0", "eval", ("a", "b"), "train-0"),
        ("train-1", "train", ("c",), None),
        ("eval-after-1", "eval", ("c",), "train-1"),
        ("eval-0", "eval", ("cs3done", "base"), None),
        ("eval-1", "eval", ("trained",), None),
    ]
    assert (selection.done, selection.active, selection.waiting) == (("finished",), ("busy",), ("cs3",))


@pytest.mark.parametrize("run_id", ["m/../x", "tiny$(touch /tmp/x)", "a b", "a\nb", "-rf", ""])
def test_plan_arrays_refuses_run_ids_that_are_not_plain(run_id):
    with pytest.raises(UserError, match="not a plain name"):
        plan_arrays([RunWork(run_id, True)], lambda r, s: False, lambda r: False, limit=10)


# -- dry run and the CLI --------------------------------------------------------------------------
@pytest.mark.parametrize("scheduler", ["slurm", "pbs"])
def test_dry_run_writes_scripts_and_submits_nothing(scheduler, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # an sbatch/qsub call would fail with FileNotFoundError
    runs = [RunWork("a", True), RunWork("b", True), RunWork("base", False, needs_training=False)]
    result = submit(
        tmp_path, runs, lambda r, s: False, _sub(scheduler, max_concurrent=2), dry_run=True, entry=ENTRY
    )
    ext = ".sbatch" if scheduler == "slurm" else ".pbs"
    assert result.round_dir == tmp_path / "scheduler" / "dry-run" and result.job_ids == {}
    assert sorted(p.name for p in result.round_dir.iterdir()) == sorted(
        ["logs", "submit.sh", "train-0.runs", f"train-0{ext}", "eval-after-0.runs", f"eval-after-0{ext}",
         "eval-0.runs", f"eval-0{ext}"]
    )  # fmt: skip
    assert (result.round_dir / "eval-after-0.runs").read_text() == "0\ta\n1\tb\n"
    assert (result.round_dir / "eval-0.runs").read_text() == "0\tbase\n"
    assert read_ledger(tmp_path) == {"version": 1, "rounds": []}
    commands = (result.round_dir / "submit.sh").read_text()
    wait = '--dependency=aftercorr:"${train_0}"' if scheduler == "slurm" else 'depend=afterany:"${train_0}"'
    assert wait in commands
    assert subprocess.run(["/bin/bash", "-n", str(result.round_dir / "submit.sh")]).returncode == 0


@pytest.mark.parametrize("scheduler", ["slurm", "pbs"])
def test_the_assets_job_comes_first_and_the_arrays_wait_for_it(scheduler, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    runs = [RunWork("a", True), RunWork("b", True), RunWork("base", False, needs_training=False)]
    asked = []
    result = submit(tmp_path, runs, lambda r, s: False, _sub(scheduler, max_concurrent=2), dry_run=True,
                    entry=ENTRY, missing_assets=lambda ids: asked.append(ids) or ["assets/masks/m.safetensors"])  # fmt: skip
    assert asked == [("a", "b", "a", "b", "base")] and result.missing_assets == ["assets/masks/m.safetensors"]
    assert [(a.name, a.stage, a.run_ids, a.after) for a in result.selection.arrays] == [
        ("assets", "assets", ("a", "b", "base"), None),
        ("train-0", "train", ("a", "b"), "assets"),
        ("eval-after-0", "eval", ("a", "b"), "train-0"),
        ("eval-0", "eval", ("base",), "assets"),
    ]
    ext = ".sbatch" if scheduler == "slurm" else ".pbs"
    script = (result.round_dir / f"assets{ext}").read_text()
    assert (
        "#SBATCH --array=0-0\n" if scheduler == "slurm" else "#PBS -J 0-1:2\n"
    ) in script  # one task, no throttle
    assert "GPU" not in script.upper().replace("SPARSE-LORA", "")
    commands = (result.round_dir / "submit.sh").read_text()
    first = "--dependency=afterok:" if scheduler == "slurm" else "depend=afterok:"
    assert (
        commands.count(first) == 2
        and subprocess.run(["/bin/bash", "-n", str(result.round_dir / "submit.sh")]).returncode == 0
    )
    nothing_missing = submit(tmp_path, runs, lambda r, s: False, _sub(scheduler), dry_run=True, entry=ENTRY,
                             missing_assets=lambda ids: [])  # fmt: skip
    assert [a.name for a in nothing_missing.selection.arrays] == ["train-0", "eval-after-0", "eval-0"]


def test_the_assets_job_script_run_by_hand(tmp_path):
    """The assets job's script through bash, with a hostile sweep directory: the interpreter gets
    `-m modelzoo_ext.cli sweep assets DIR --run-list LIST`, word for word, and nothing else runs."""
    mark = tmp_path / "mark"
    sweep = tmp_path / "sw $(touch $HOSTILE_MARK) `touch $HOSTILE_MARK` 'q' ${HOME}\nnl; touch $HOSTILE_MARK"
    sweep.mkdir()
    python = tmp_path / "python"  # stands in for the interpreter: records its arguments
    python.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {tmp_path / 'argv'}\n")
    python.chmod(0o755)
    run_list = _write_run_list(sweep / "assets.runs", ["r0", "r1"])
    for module, env in ((slurm, {"SLURM_ARRAY_TASK_ID": "0"}), (pbs, {"PBS_ARRAY_INDEX": "0"})):
        sub = _sub(module.NAME, python=str(python))
        script = module.render_script(
            ArrayPlan("assets", "assets", ("r0", "r1")), sub, str(run_list), str(sweep), ENTRY
        )
        done = _run_by_hand(script, tmp_path, {**env, "HOSTILE_MARK": str(mark)})
        assert done.returncode == 0, done.stderr
        argv = (tmp_path / "argv").read_text()
        assert argv == f"-m\nmodelzoo_ext.cli\nsweep\nassets\n{sweep}\n--run-list\n{run_list}\n"
    assert not mark.exists()


REPO = Path(__file__).resolve().parent.parent
TINY_PARAMS = REPO / "model_configs" / "params_sparse_lora_tiny.yaml"
GPU_S2S, GPU_S2D = (f"tiny__boolq__magnitude__unstructured__s50__{m}__gpu__seed0" for m in ("s2s", "s2d"))
CS3_S2S, CS3_S2D = (f"tiny__boolq__magnitude__unstructured__s50__{m}__cs3__seed0" for m in ("s2s", "s2d"))
PRUNED, DENSE = (
    "tiny__boolq__magnitude__unstructured__s50__none__eval__seed0",
    "tiny__boolq__dense__dense__s00__none__eval__seed0",
)


def _cli_sweep(tmp_path: Path, hf_dir: Path) -> Path:
    """The tiny example sweep planned for gpu and cs3 (named phoenix, 4 GPUs per run, evaluation on
    cuda): 2 fine-tunes per backend and the 2 no-fine-tune baselines."""
    import yaml

    spec = yaml.safe_load((REPO / "modelzoo_ext" / "study" / "examples" / "sweep_tiny.yaml").read_text())
    spec.update(name="phoenix", backends=["gpu", "cs3"], gpu={"nproc_per_node": 4}, eval={**spec["eval"], "device": "cuda"},
                models={"tiny": {"hf_dir": str(hf_dir), "params": str(TINY_PARAMS)}})  # fmt: skip
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(spec))
    sweep = tmp_path / "sweep"
    assert cli.main(["sweep", "plan", str(tmp_path / "sweep.yaml"), "--out", str(sweep)]) == 0
    return sweep


def _make_assets(sweep: Path) -> None:
    """Stand-ins for every shared asset of the sweep (the asset checks look at paths only)."""
    from modelzoo_ext.study.sweep import load_plans
    from modelzoo_ext.study.sweep.assets import missing

    for path in missing(load_plans(sweep)[1]):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).mkdir() if not path.endswith(".safetensors") else Path(path).write_bytes(b"")


def test_cli_submit_dry_run_plans_records_and_the_assets_job(tmp_path, tiny_llama_dir, capsys, monkeypatch):
    """What is submitted comes from the runs' plans and records (never the registry database), and
    the assets job comes first while a shared asset is missing."""
    from modelzoo_ext.study.sweep.records import update_record

    sweep = _cli_sweep(tmp_path, tiny_llama_dir)
    update_record(sweep / "runs" / GPU_S2D, status="succeeded")
    update_record(sweep / "runs" / CS3_S2D, status="trained", artifacts={"model": "m"})  # trained on the CS-3
    (sweep / "registry.sqlite").unlink()  # submit must not need it (nor recreate it)
    capsys.readouterr()
    options = ["--scheduler", "slurm", "--dry-run", "--account", "proj42", "--time", "4:00:00", "--max-concurrent", "8",
               "--directive", "#SBATCH --qos=high", "--assets-time", "1:00:00", "--assets-cpus", "16",
               "--assets-partition", "cpu"]  # fmt: skip
    assert cli.main(["sweep", "submit", str(sweep), *options]) == 0
    out = capsys.readouterr().out
    assert "done: 1, queued or running: 0, waiting for training elsewhere: 1, to submit: 4" in out
    dry = sweep / "scheduler" / "dry-run"
    assert sorted(p.name for p in dry.glob("*.runs")) == [
        "assets.runs",
        "eval-0.runs",
        "eval-after-0.runs",
        "train-0.runs",
    ]
    assert (dry / "train-0.runs").read_text() == f"0\t{GPU_S2S}\n"
    assert (dry / "eval-0.runs").read_text() == f"0\t{DENSE}\n1\t{PRUNED}\n2\t{CS3_S2D}\n"
    assert (dry / "assets.runs").read_text() == f"0\t{GPU_S2S}\n1\t{DENSE}\n2\t{PRUNED}\n3\t{CS3_S2D}\n"
    train = (dry / "train-0.sbatch").read_text()
    assert "#SBATCH --gpus-per-node=4" in train and "#SBATCH --job-name=phoenix-train-0" in train
    assert "#SBATCH --qos=high" in train and "#SBATCH --array=0-0%8" in train
    assert f"-m modelzoo_ext.study.sweep.task --sweep {sweep}" in train
    evaluation = (dry / "eval-0.sbatch").read_text()
    assert "#SBATCH --gpus-per-node=1" in evaluation and "#SBATCH --time=0-04:00:00" in evaluation
    assets = (dry / "assets.sbatch").read_text()
    assert _directives(assets, "#SBATCH") == [
        "--job-name=phoenix-assets", "--array=0-0", "--output=logs/assets_%A_%a.out", "--nodes=1",
        "--ntasks-per-node=1", "--cpus-per-task=16", "--time=0-01:00:00", "--account=proj42", "--partition=cpu",
        "--qos=high",
    ]  # fmt: skip
    assert f"-m modelzoo_ext.cli sweep assets {sweep} --run-list {dry / 'assets.runs'}" in assets
    commands = (dry / "submit.sh").read_text()
    assert '--dependency=afterok:"${assets}" --kill-on-invalid-dep=yes train-0.sbatch' in commands
    assert '--dependency=afterok:"${assets}" --kill-on-invalid-dep=yes eval-0.sbatch' in commands
    assert '--dependency=aftercorr:"${train_0}" --kill-on-invalid-dep=yes eval-after-0.sbatch' in commands
    assert not (sweep / "registry.sqlite").exists()

    _make_assets(sweep)  # every asset there (empty stand-ins: the preflight would refuse them), no assets job
    assert cli.main(["sweep", "submit", str(sweep), *options, "--skip-preflight"]) == 0
    assert "shared assets: all present (no assets job)" in capsys.readouterr().out
    assert not (dry / "assets.sbatch").exists() and "afterok" not in (dry / "submit.sh").read_text()


def test_cli_refuses_hostile_options_and_an_interpreter_without_the_entry_point(
    tmp_path, tiny_llama_dir, capsys
):
    sweep = _cli_sweep(tmp_path, tiny_llama_dir)
    status = cli.main(
        ["sweep", "submit", str(sweep), "--scheduler", "slurm", "--account", "x$(touch /tmp/x)"]
    )
    err = capsys.readouterr().err
    assert status == 2 and "not a plain name" in err and "[account]" in err
    for python, why in (("/bin/false", "cannot import modelzoo_ext.study.sweep.task"),
                        (str(tmp_path / "no-python"), "the tasks' interpreter cannot run")):  # fmt: skip
        assert cli.main(["sweep", "submit", str(sweep), "--scheduler", "slurm", "--python", python]) == 2
        assert why in capsys.readouterr().err
    assert not (sweep / "scheduler").exists()


def test_status_shows_the_scheduler_beside_the_record_and_unknown_when_unreachable(tmp_path, tiny_llama_dir, capsys,
                                                                                   monkeypatch):  # fmt: skip
    """`sweep status` where no scheduler answers (no squeue here): each submitted run's tasks are
    UNKNOWN with the reason, next to the run's own status; runs never submitted show none."""
    sweep = _cli_sweep(tmp_path, tiny_llama_dir)
    ledger = {"version": 1, "rounds": [{"round": 1, "scheduler": "slurm", "dir": "round-001", "arrays": [
        {"name": "assets", "stage": "assets", "job_id": "7", "after": None, "runs": [GPU_S2S, PRUNED]},
        {"name": "train-0", "stage": "train", "job_id": "8", "after": "assets", "runs": [GPU_S2S]},
        {"name": "eval-after-0", "stage": "eval", "job_id": "9", "after": "train-0", "runs": [GPU_S2S]},
        {"name": "eval-0", "stage": "eval", "job_id": "10", "after": "assets", "runs": [PRUNED]}]}]}  # fmt: skip
    (sweep / "scheduler").mkdir()
    (sweep / "scheduler" / "jobs.json").write_text(json.dumps(ledger))
    monkeypatch.setenv("PATH", "/nonexistent")
    capsys.readouterr()
    assert cli.main(["sweep", "status", str(sweep)]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    reason = "`squeue` is not installed here. Fix: run this where SLURM's commands are"
    gone = f"UNKNOWN ({reason})"
    assert f"planned     attempts=0  train: {gone} [slurm 8_0]  eval: {gone} [slurm 9_0]" in lines[GPU_S2S]
    assert lines[PRUNED].endswith(f"attempts=0  eval: {gone} [slurm 10_0]")
    assert lines[DENSE].endswith("planned     attempts=0")
    assert lines["assets"] == f"assets job, round 1: {gone} [slurm 7_0]"
    assert cli.main(["sweep", "status", str(sweep), "--json"]) == 0
    rows = {row["run_id"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows[GPU_S2S]["scheduler"]["train"] == {
        "scheduler": "slurm", "job_id": "8", "index": 0, "array": "train-0", "round": 1, "state": "UNKNOWN",
        "raw": "", "exit_code": None, "signal": None, "reason": reason,
        "describe": f"{gone} [slurm 8_0]",
    }  # fmt: skip
    assert rows[DENSE]["scheduler"] == {}
