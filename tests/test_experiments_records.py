"""Runs that keep their own records: a task (one grid point's stage, its own process) never opens the
registry database; `sweep status` and `report` rebuild the registry from the records; a sweep run
locally and the same sweep run task by task give the same report."""

from __future__ import annotations

import csv
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from modelzoo_ext.cli import main
from modelzoo_ext.study.registry import Registry
from modelzoo_ext.study.steps import StepPolicy
from modelzoo_ext.study.sweep import execute_stage, load_plan
from modelzoo_ext.study.sweep.records import RECORD_FILE, read_record

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "modelzoo_ext" / "study" / "examples"
TINY_PARAMS = REPO / "model_configs" / "params_sparse_lora_tiny.yaml"
S2S_CS3 = "tiny__boolq__magnitude__unstructured__s50__s2s__cs3__seed0"
# The task entry point, in a process that dies with status 97 the moment anything opens SQLite.
NO_SQLITE_TASK = (
    "import os, sys\n"
    "def hook(event, args):\n"
    "    if event == 'sqlite3.connect':\n"
    "        print('sqlite3.connect', args, file=sys.stderr, flush=True); os._exit(97)\n"
    "sys.addaudithook(hook)\n"
    "from modelzoo_ext.study.sweep.task import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def _sweep_yaml(tmp_path: Path, hf_dir: Path, name: str = "sweep.yaml", **changes) -> Path:
    spec = yaml.safe_load((EXAMPLES / "sweep_tiny.yaml").read_text())
    spec["models"] = {"tiny": {"hf_dir": str(hf_dir), "params": str(TINY_PARAMS)}}
    spec.update(changes)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return path


def _fake_cszoo(folder: Path, record: Path, *, fail: bool) -> Path:
    """An executable standing in for `cszoo`: writes its argv to `record` as JSON; with `fail`, fails
    permanently; else writes a `checkpoint_1.mdl` into its `--model_dir`."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "cszoo"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, pathlib, sys\n"
        f"pathlib.Path({str(record)!r}).write_text(json.dumps(sys.argv[1:]))\n"
        + ("print('ValueError: bad config'); sys.exit(1)\n" if fail else "")
        + "out = pathlib.Path(sys.argv[sys.argv.index('--model_dir') + 1]); out.mkdir(parents=True, exist_ok=True)\n"
        "(out / 'checkpoint_1.mdl').write_bytes(b'not a checkpoint')\n"
    )
    script.chmod(0o755)
    return script


def _task(sweep_dir: Path, run_id: str, stage: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", NO_SQLITE_TASK, "--sweep", str(sweep_dir), "--run", run_id, "--stage", stage,
               "--max-attempts", "1", "--backoff-s", "0"]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=1200, check=False)


# -- records, tasks and the index -----------------------------------------------------------------
def test_the_executor_takes_no_registry():
    assert "registry" not in inspect.signature(execute_stage).parameters


def test_a_task_writes_only_its_record_and_status_rebuilds_the_index(tmp_path, tiny_llama_dir, capsys):
    """A cs3 task whose `cszoo fit` fails: its own record says so, the registry database is never
    opened (the process would die with 97), `sweep status` rebuilds the index from the records
    (even from nothing), and a second task is attempt 2."""
    cszoo = _fake_cszoo(tmp_path / "bin", tmp_path / "argv.json", fail=True)
    sweep = _sweep_yaml(
        tmp_path, tiny_llama_dir, backends=["cs3"], eval={"heldout_loss": False},
        baselines={"dense_lora": False, "no_finetune": False}, cs3={"cszoo": str(cszoo)},
    )  # fmt: skip
    out = tmp_path / "sweep"
    assert main(["sweep", "plan", str(sweep), "--out", str(out)]) == 0
    plan = load_plan(out, S2S_CS3)
    Path(plan.assets.data).mkdir(parents=True)  # present assets are not rebuilt: this test is about the task
    Path(plan.assets.masks).parent.mkdir(parents=True)
    Path(plan.assets.masks).write_bytes(b"")
    registry = out / "registry.sqlite"
    before = (registry.read_bytes(), registry.stat().st_mtime_ns)

    result = _task(out, S2S_CS3, "train")
    assert result.returncode == 1, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["result"] == "failed" and "permanent failure after 1 attempt" in outcome["error"]
    record = read_record(plan.run_dir)
    assert (record.status, record.attempts, record.error) == ("failed", 1, outcome["error"])
    assert "ValueError: bad config" in (plan.run_dir / "train.log").read_text()
    assert (
        registry.read_bytes(),
        registry.stat().st_mtime_ns,
    ) == before  # the index is not a task's business
    assert Registry(registry).get(S2S_CS3).status == "planned"

    registry.unlink()  # the records are the truth: the index comes back from them alone
    capsys.readouterr()
    assert main(["sweep", "status", str(out), "--json"]) == 0
    rows = {row["run_id"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows[S2S_CS3]["status"] == "failed" and rows[S2S_CS3]["attempts"] == 1
    assert {row["status"] for run_id, row in rows.items() if run_id != S2S_CS3} == {"planned"}
    assert _task(out, S2S_CS3, "train").returncode == 1 and read_record(plan.run_dir).attempts == 2
    # eval before training: nothing done, said so
    result = _task(out, S2S_CS3, "eval")
    assert result.returncode == 1 and json.loads(result.stdout)["result"] == "not_trained"


def test_task_refuses_an_unknown_run(tmp_path, tiny_llama_dir):
    out = tmp_path / "sweep"
    assert main(["sweep", "plan", str(_sweep_yaml(tmp_path, tiny_llama_dir)), "--out", str(out)]) == 0
    for run_id in ("nope", "../runs", "."):
        result = _task(out, run_id, "train")
        assert result.returncode == 2 and "no planned run" in result.stderr


def test_a_task_builds_no_shared_asset_and_refuses_when_one_is_missing(tmp_path, tiny_llama_dir):
    """Tasks run many at once: a stage with work whose shared assets are missing is refused (exit 2,
    the record untouched, the fix named) instead of racing other tasks to build them; a stage
    without work needs no asset."""
    out = tmp_path / "sweep"
    assert main(["sweep", "plan", str(_sweep_yaml(tmp_path, tiny_llama_dir)), "--out", str(out)]) == 0
    run_id = "tiny__boolq__magnitude__unstructured__s50__s2d__cpu__seed0"
    plan = load_plan(out, run_id)
    before = (plan.run_dir / RECORD_FILE).read_bytes()
    result = _task(out, run_id, "train")
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"4 shared asset(s) of run {run_id} missing, first {plan.assets.data}" in result.stderr
    assert f"sparse-lora sweep assets {out} --only {run_id}" in result.stderr
    assert (plan.run_dir / RECORD_FILE).read_bytes() == before and not (out / "assets").exists()
    result = _task(out, run_id, "eval")  # not trained: no work yet, so no asset is asked for
    assert result.returncode == 1 and json.loads(result.stdout)["result"] == "not_trained"
    assert (plan.run_dir / RECORD_FILE).read_bytes() == before  # as a PBS eval task after a failed training
    assert f"{run_id} eval: not_trained: {run_id} is not trained yet" in result.stderr


def test_stage_done_is_one_definition_for_runner_task_and_submit(tmp_path, tiny_llama_dir):
    """A trained run: its train stage is done for the local runner (nothing to do), the task entry
    point (skipped, exit 0, no asset needed) and submit; its eval is not."""
    from modelzoo_ext.study.cluster.cli import done_by_records
    from modelzoo_ext.study.sweep import load_plans, run_sweep
    from modelzoo_ext.study.sweep.records import update_record

    out = tmp_path / "sweep"
    assert main(["sweep", "plan", str(_sweep_yaml(tmp_path, tiny_llama_dir)), "--out", str(out)]) == 0
    run_id = "tiny__boolq__magnitude__unstructured__s50__s2s__cpu__seed0"
    update_record(out / "runs" / run_id, status="trained", artifacts={"model": "somewhere"})
    is_done = done_by_records(load_plans(out)[1])
    assert (is_done(run_id, "train"), is_done(run_id, "eval")) == (True, False)
    assert run_sweep(out, only=[run_id], stage="train") == {
        "selected": 1,
        "stage": "train",
        "skipped_finished": 1,
    }
    result = _task(out, run_id, "train")
    assert result.returncode == 0 and json.loads(result.stdout)["result"] == "skipped"
    update_record(out / "runs" / run_id, status="succeeded")
    assert (is_done(run_id, "train"), is_done(run_id, "eval")) == (True, True)
    assert json.loads(_task(out, run_id, "eval").stdout)["result"] == "skipped"


def test_a_gpu_run_under_a_job_script_starts_its_trainer_with_the_exported_launcher(tmp_path, tiny_llama_dir,
                                                                                   monkeypatch):  # fmt: skip
    """SPARSE_LORA_LAUNCHER (what a job script with GPUs exports) replaces this machine's torchrun
    before `-m gpu_reference.train ...`; without it, torchrun with the sweep's nproc_per_node."""
    from modelzoo_ext.study.sweep.commands import train_command

    out = tmp_path / "sweep"
    sweep = _sweep_yaml(tmp_path, tiny_llama_dir, backends=["gpu"], gpu={"nproc_per_node": 2})
    assert main(["sweep", "plan", str(sweep), "--out", str(out)]) == 0
    plan = load_plan(out, "tiny__boolq__magnitude__unstructured__s50__s2s__gpu__seed0")
    trainer = ["-m", "gpu_reference.train", str(plan.params_path), "--hf-model", plan.hf_dir, "--out",
               str(plan.train_dir), "--no-progress", "--device", "cuda"]  # fmt: skip
    assert train_command(plan) == [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        *trainer,
    ]
    argv = tmp_path / "argv.json"
    launcher = tmp_path / "bin" / "launcher"  # records its arguments, then fails as a trainer would
    launcher.parent.mkdir()
    launcher.write_text(
        f"#!{sys.executable}\nimport json, sys\nopen({str(argv)!r}, 'w').write(json.dumps(sys.argv[1:]))\nsys.exit(1)\n"
    )
    launcher.chmod(0o755)
    monkeypatch.setenv("SPARSE_LORA_LAUNCHER", f"{launcher} --nnodes=2 'two words'")
    outcome = execute_stage(plan, "train", policy=StepPolicy(1, 0), assets=_Present())
    assert outcome.result == "failed"
    assert json.loads(argv.read_text()) == ["--nnodes=2", "two words", *trainer]


class _Present:
    """An asset builder for a test whose assets do not matter: all of them count as present."""

    def ensure(self, plan) -> None:
        pass


def test_registry_rows_of_an_older_sweep_become_records(tmp_path, tiny_llama_dir, capsys):
    """A sweep directory from before run records (rows, no record files): nothing is lost."""
    out = tmp_path / "sweep"
    assert main(["sweep", "plan", str(_sweep_yaml(tmp_path, tiny_llama_dir)), "--out", str(out)]) == 0
    run_id = "tiny__boolq__magnitude__unstructured__s50__s2s__cpu__seed0"
    Registry(out / "registry.sqlite").update(
        run_id, status="succeeded", metrics={"boolq/acc": {"value": 0.5}}
    )
    for record in (out / "runs").glob(f"*/{RECORD_FILE}"):
        record.unlink()
    assert main(["sweep", "status", str(out)]) == 0
    assert "succeeded=1" in capsys.readouterr().out
    adopted = read_record(out / "runs" / run_id)
    assert adopted.status == "succeeded" and adopted.metrics == {"boolq/acc": {"value": 0.5}}


# -- a sweep locally and task by task -------------------------------------------------------------
def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_local_runner_and_tasks_give_the_same_report(tmp_path, tiny_llama_dir):
    """The tiny sweep through `sweep run`, and again run by run through the task entry point (train,
    then eval, as a job array would, never opening the database): the same scores, comparisons and
    per-run numbers; each record names its versions and its artifacts' checksums."""
    import torch
    import transformers

    from modelzoo_ext.masks.checksum import file_sha256

    sweep = _sweep_yaml(tmp_path, tiny_llama_dir)
    local, tasks = tmp_path / "local", tmp_path / "tasks"
    for out in (local, tasks):
        assert main(["sweep", "plan", str(sweep), "--out", str(out)]) == 0
    assert main(["sweep", "run", str(local), "--max-attempts", "1"]) == 0
    assert main(["sweep", "assets", str(tasks), "--max-attempts", "1"]) == 0  # tasks build no shared asset
    run_ids = sorted(p.name for p in (tasks / "runs").iterdir())
    for stage in ("train", "eval"):
        for run_id in run_ids:
            result = _task(tasks, run_id, stage)
            assert result.returncode == 0, (run_id, stage, result.stderr[-3000:])
    reports = {}
    for out in (local, tasks):
        assert main(["report", "--registry", str(out / "registry.sqlite"), "--out", str(out / "report")]) == 0
        reports[out] = out / "report"
    for table in ("scores_offline.csv", "paired_offline.csv"):
        assert _csv(reports[local] / table) == _csv(reports[tasks] / table)
    # The config hash covers the run's paths; the speed, the machine's load; a mask file, its creation time.
    differ = {"config_hash", "tokens_per_s", "mask_sha256"}
    assert [{k: v for k, v in r.items() if k not in differ} for r in _csv(reports[local] / "runs.csv")] == [
        {k: v for k, v in r.items() if k not in differ} for r in _csv(reports[tasks] / "runs.csv")
    ]
    s2s = read_record(tasks / "runs" / "tiny__boolq__magnitude__unstructured__s50__s2s__cpu__seed0")
    assert s2s.status == "succeeded" and s2s.versions["train"]["torch"] == torch.__version__
    assert (
        s2s.versions["eval"]["transformers"] == transformers.__version__ and s2s.versions["eval"]["lm-eval"]
    )
    export = "runs/tiny__boolq__magnitude__unstructured__s50__s2s__cpu__seed0/train/merged/model.safetensors"
    assert s2s.checksums[export] == f"sha256:{file_sha256(tasks / export)}"
    assert {"runs/" + s2s.run_id + "/eval.json", "runs/" + s2s.run_id + "/params.yaml"} <= set(s2s.checksums)
    assert s2s.checksums[str(Path(s2s.artifacts["masks"]).relative_to(tasks))] == f"sha256:{s2s.mask_sha256}"
