"""`sparse-lora sweep`: the grid, identical protocol across backends, failure handling, and a tiny CPU sweep."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from modelzoo_ext.cli import main
from modelzoo_ext.errors import UserError
from modelzoo_ext.study.registry import Registry
from modelzoo_ext.study.steps import StepFailed, SweepStopped, classify_failure, run_with_retries
from modelzoo_ext.study.sweep_spec import grid, load_sweep

EXAMPLES = Path(__file__).resolve().parent.parent / "modelzoo_ext" / "study" / "examples"
TINY_PARAMS = Path(__file__).resolve().parent.parent / "model_configs" / "params_sparse_lora_tiny.yaml"


def _tiny_sweep(tmp_path: Path, hf_dir: Path, **changes) -> Path:
    spec = yaml.safe_load((EXAMPLES / "sweep_tiny.yaml").read_text())
    spec["models"]["tiny"] = {"hf_dir": str(hf_dir), "params": str(TINY_PARAMS)}
    spec.update(changes)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_the_example_plan_has_360_fine_tunes():
    runs = grid(load_sweep(EXAMPLES / "sweep_phoenix_360.yaml"))
    fine_tunes = [r for r in runs if r["mode"] in ("s2s", "s2d")]
    assert len(fine_tunes) == 2 * 3 * 3 * 10 * 2 == 360
    assert len({r["run_id"] for r in runs}) == len(runs)
    assert {r["mode"] for r in runs} == {"s2s", "s2d", "lora", "none"}


def test_plan_gives_every_backend_the_same_protocol(tmp_path, tiny_llama_dir):
    from modelzoo_ext.run_config import load_run_config

    sweep = _tiny_sweep(tmp_path, tiny_llama_dir, backends=["cpu", "gpu", "cs3"])
    out = tmp_path / "sweep"
    assert main(["sweep", "plan", str(sweep), "--out", str(out)]) == 0
    params = {}
    for backend in ("cpu", "gpu", "cs3"):
        run_dir = out / "runs" / f"tiny__boolq__magnitude__unstructured__s50__s2s__{backend}__seed0"
        params[backend] = yaml.safe_load((run_dir / "params.yaml").read_text())
        load_run_config(run_dir / "params.yaml")  # the trainer accepts the generated config
        command = (run_dir / "command.sh").read_text()
        assert {"cpu": "gpu_reference.train", "gpu": "torchrun", "cs3": "--num_csx"}[backend] in command
        if backend == "cs3":  # cszoo fit, then the CS checkpoint -> the same merged export the trainer writes
            assert (
                "--target_device CSX" in command
                and "convert cs-to-hf" in command
                and "--as merged" in command
            )
    for p in params.values():  # only the output folder differs between backends
        p["trainer"]["init"].pop("model_dir")
        p["trainer"]["fit"].pop("ckpt_path", None)
    assert params["cpu"] == params["gpu"] == params["cs3"]
    sl = params["cpu"]["trainer"]["init"]["model"]["sparse_lora"]
    assert sl["mode"] == "sparse_to_sparse" and sl["mask_path"].endswith("s50.safetensors")
    assert params["cpu"]["trainer"]["init"]["loop"]["max_steps"] == 2
    rows = Registry(out / "registry.sqlite").runs()
    assert {r.status for r in rows} == {"planned"} and len(rows) == 3 * 2 + 2  # 6 fine-tunes + 2 no-fine-tune
    assert all(r.config_hash and r.git_rev for r in rows)


def test_bad_sweep_file_is_a_user_error(tmp_path, tiny_llama_dir):
    sweep = _tiny_sweep(tmp_path, tiny_llama_dir, sparsities=[1.5])
    with pytest.raises(UserError, match="outside"):
        load_sweep(sweep)
    sweep = _tiny_sweep(tmp_path, tiny_llama_dir, colour="red")
    with pytest.raises(UserError, match="colour"):
        load_sweep(sweep)


@pytest.mark.parametrize(
    "log, kind",
    [
        (
            "grpc._channel._InactiveRpcError: status = StatusCode.UNAVAILABLE details = 'failed to connect'",
            "transient",
        ),
        ("RuntimeError: Connection reset by peer", "transient"),
        ("OSError: [Errno 28] No space left on device", "stop"),
        ("OSError: [Errno 122] Disk quota exceeded", "stop"),
        ("ValueError: mask shape (64, 64) does not match weight (64, 128)", "permanent"),
        ("modelzoo_ext.errors.UserError: the loss became nan at step 3", "permanent"),
    ],
)
def test_failure_classification(log, kind):
    assert classify_failure(log) == kind


def _flaky(tmp_path: Path, failures: int, message: str) -> list[str]:
    """A command that fails `failures` times printing `message`, then succeeds."""
    counter = tmp_path / "count"
    code = (
        f"import pathlib,sys; p=pathlib.Path({str(counter)!r}); n=int(p.read_text()) if p.exists() else 0; "
        f"p.write_text(str(n+1)); print({message!r}) if n < {failures} else None; sys.exit(1 if n < {failures} else 0)"
    )
    return [sys.executable, "-c", code]


def test_transient_failure_is_retried_with_backoff(tmp_path):
    sleeps = []
    command = _flaky(tmp_path, 2, "StatusCode.UNAVAILABLE: appliance not reachable")
    attempts = run_with_retries(command, tmp_path / "log", max_attempts=4, backoff_s=1.5, sleep=sleeps.append)
    assert attempts == 3 and sleeps == [1.5, 3.0]
    assert (tmp_path / "log").read_text().count(
        "\nStatusCode.UNAVAILABLE"
    ) == 2  # printed output, not the echo


def test_permanent_failure_is_not_retried(tmp_path):
    sleeps = []
    command = _flaky(tmp_path, 5, "ValueError: bad config")
    with pytest.raises(StepFailed, match="permanent failure after 1 attempt"):
        run_with_retries(command, tmp_path / "log", max_attempts=4, backoff_s=1.0, sleep=sleeps.append)
    assert sleeps == [] and (tmp_path / "count").read_text() == "1"


def test_transient_failure_gives_up_after_max_attempts(tmp_path):
    command = _flaky(tmp_path, 9, "StatusCode.UNAVAILABLE")
    with pytest.raises(StepFailed, match="transient failure after 3"):
        run_with_retries(command, tmp_path / "log", max_attempts=3, backoff_s=0.0, sleep=lambda s: None)


def test_disk_full_stops(tmp_path):
    command = _flaky(tmp_path, 5, "OSError: [Errno 28] No space left on device")
    with pytest.raises(SweepStopped):
        run_with_retries(command, tmp_path / "log", max_attempts=4, backoff_s=0.0, sleep=lambda s: None)
    assert (tmp_path / "count").read_text() == "1"


@pytest.mark.slow
def test_tiny_cpu_sweep_end_to_end(tmp_path, tiny_llama_dir, capsys):
    sweep = _tiny_sweep(tmp_path, tiny_llama_dir)
    out = tmp_path / "sweep"
    assert main(["sweep", "plan", str(sweep), "--out", str(out)]) == 0
    assert main(["sweep", "run", str(out), "--backend", "cpu"]) == 0
    runs = {r.run_id: r for r in Registry(out / "registry.sqlite").runs()}
    assert len(runs) == 4 and {r.status for r in runs.values()} == {"succeeded"}, [
        r.error for r in runs.values()
    ]
    s2s = runs["tiny__boolq__magnitude__unstructured__s50__s2s__cpu__seed0"]
    s2d = runs["tiny__boolq__magnitude__unstructured__s50__s2d__cpu__seed0"]
    assert s2s.mask_sha256 == s2d.mask_sha256 and len(s2s.mask_sha256) == 64
    assert s2s.throughput_tokens_per_s > 0 and s2s.metrics["boolq/acc"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert s2s.artifacts["model"].endswith("train/merged") and s2s.artifacts.get("adapter") is None
    assert s2d.artifacts["adapter"].endswith("train/adapter") and "assets/pruned" in s2d.artifacts["model"]
    evaluated = json.loads(Path(s2s.artifacts["eval"]).read_text())
    assert (
        evaluated["split"]["held_out_fraction"] == 0.2
        and evaluated["tasks"]["boolq"]["n_samples_evaluated"] == 4
    )
    # Resumable: a second run skips everything.
    capsys.readouterr()
    assert main(["sweep", "run", str(out)]) == 0
    assert '"skipped_finished": 4' in capsys.readouterr().out
    assert main(["sweep", "status", str(out)]) == 0
    assert "succeeded=4" in capsys.readouterr().out
    # Never a dense checkpoint in place of a sparse one.
    from modelzoo_ext.study.sweep import _RunExecutor

    executor = _RunExecutor(load_sweep(sweep), out, Registry(out / "registry.sqlite"), 1, 0.0)
    plan = json.loads((out / "runs" / s2d.run_id / "run.json").read_text())
    with pytest.raises(StepFailed, match="refusing to evaluate a dense checkpoint"):
        executor._check_sparse(plan, str(tiny_llama_dir), tmp_path)
