"""Names that become paths or script text: only plain grid names are planned (exit 2 otherwise, nothing
written), and every word of `command.sh` is quoted, so hostile text in the spec runs nothing."""

from __future__ import annotations

import json
import subprocess

import pytest
from test_experiments_records import S2S_CS3, TINY_PARAMS, _fake_cszoo, _sweep_yaml

from modelzoo_ext.cli import main


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"models": {"tiny$(touch MARK)": None}}, "model key 'tiny$(touch MARK)'"),
        ({"models": {"../x": None}}, "model key '../x'"),
        ({"models": {"a/b": None}}, "model key 'a/b'"),
        ({"models": {"..": None}}, "model key '..'"),
        ({"method_structures": [["magnitude;touch MARK", "unstructured"]]}, "method 'magnitude;touch MARK'"),
    ],
)
def test_names_that_become_paths_must_be_plain(tmp_path, tiny_llama_dir, capsys, monkeypatch, changes, named):
    model = {"hf_dir": str(tiny_llama_dir), "params": str(TINY_PARAMS)}
    if "models" in changes:
        changes = {"models": {key: model for key in changes["models"]}}
    sweep = _sweep_yaml(tmp_path, tiny_llama_dir, **changes)
    out = tmp_path / "sweep"
    monkeypatch.chdir(tmp_path)  # where a `touch MARK` would land
    assert main(["sweep", "plan", str(sweep), "--out", str(out)]) == 2
    assert f"{named} is not a plain name" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "MARK").exists() and not (tmp_path / "x").exists()


@pytest.mark.cs  # the script's first step writes a CS checkpoint
def test_command_script_runs_exactly_the_planned_command(tmp_path, tiny_llama_dir):
    """Free text in the spec (paths, the cszoo program, its extra arguments) and a sweep directory
    with shell syntax in their names: `command.sh` passes every word through unchanged and runs
    nothing the spec did not ask for."""
    hostile = "x $(touch MARK1) `touch MARK2`; touch MARK3 'q\"\\"
    model_link = tmp_path / f"hf {hostile}"
    model_link.symlink_to(tiny_llama_dir)
    argv_file = tmp_path / "argv.json"
    cszoo = _fake_cszoo(tmp_path / f"bin {hostile}", argv_file, fail=False)
    sweep = _sweep_yaml(
        tmp_path, model_link, backends=["cs3"], baselines={"dense_lora": False, "no_finetune": False},
        cs3={"cszoo": str(cszoo), "mount_dirs": [f"/m {hostile}"], "extra_args": ["--job_labels", hostile, "$HOME"]},
    )  # fmt: skip
    out = tmp_path / f"sweep {hostile}"
    assert main(["sweep", "plan", str(sweep), "--out", str(out)]) == 0
    run_dir = out / "runs" / S2S_CS3
    planned = json.loads((run_dir / "run.json").read_text())["train_command"]
    result = subprocess.run(["sh", str(run_dir / "command.sh")], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600, check=False)  # fmt: skip
    assert json.loads(argv_file.read_text()) == planned[1:]  # every word as planned, `$HOME` unexpanded
    assert f"/m {hostile}" in planned and hostile in planned
    assert (run_dir / "train" / "checkpoint_1.mdl").is_file()  # the export step found the checkpoint...
    assert result.returncode != 0 and "checkpoint_1.mdl" in result.stderr  # ...which convert refused
    assert not list(tmp_path.rglob("MARK*"))  # nothing ran that the spec did not ask for
