"""`sparse-lora report`: every table value equals the registry's, with provenance; published CSV rules."""

from __future__ import annotations

import csv

import pytest

from modelzoo_ext.cli import main
from modelzoo_ext.study.registry import Registry, RunRecord

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(run_id, mode, sparsity, acc, tps=None, status="succeeded", seed=0, backend="cpu"):
    return RunRecord(
        run_id,
        status=status,
        model="tiny",
        task="boolq",
        method="magnitude",
        structure="unstructured",
        sparsity=sparsity,
        mode=mode,
        backend=backend,
        seed=seed,
        config_hash=f"cfg-{run_id}",
        git_rev="rev123",
        mask_sha256=f"mask-{sparsity}",
        metrics={"boolq/acc": acc, "eval_limit": 100, "lm_eval_version": "0.4.9.1"},
        throughput_tokens_per_s=tps,
    )


@pytest.fixture
def registry(tmp_path):
    reg = Registry(tmp_path / "registry.sqlite")
    runs = [
        _run("dense", "none", 0.0, 0.61),
        _run("lora", "lora", 0.0, 0.70, tps=100.0),
        _run("pruned50", "none", 0.5, 0.52),
        _run("pruned70", "none", 0.7, 0.43),
        _run("s2s50", "s2s", 0.5, 0.66, tps=80.5),
        _run("s2d50", "s2d", 0.5, 0.63, tps=95.25),
        _run("s2s70", "s2s", 0.7, 0.59, tps=81.0),
        _run("s2d70", "s2d", 0.7, 0.60, tps=96.0),
        _run("broken", "s2s", 0.9, 0.99, status="failed"),
    ]
    for run in runs:
        reg.put(run)
    return tmp_path / "registry.sqlite"


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_report_values_equal_the_registry(tmp_path, registry):
    out = tmp_path / "report"
    assert main(["report", "--registry", str(registry), "--out", str(out)]) == 0
    truth = {r.run_id: r for r in Registry(registry).runs(status="succeeded")}
    accuracy = _csv(out / "accuracy.csv")
    assert {row["run_id"] for row in accuracy} == set(truth)  # the failed run is not reported
    for row in accuracy:
        run = truth[row["run_id"]]
        assert float(row["value"]) == run.metrics[row["metric"]]
        assert (row["config_hash"], row["git_rev"], row["mask_sha256"]) == (
            run.config_hash,
            run.git_rev,
            run.mask_sha256,
        )
        assert (row["mode"], float(row["sparsity"])) == (run.mode, run.sparsity)
        assert row["metric"] == "boolq/acc" and row["eval_limit"] == "100"  # metadata is not a score
    throughput = {row["run_id"]: float(row["tokens_per_s"]) for row in _csv(out / "throughput.csv")}
    assert throughput == {k: r.throughput_tokens_per_s for k, r in truth.items() if r.throughput_tokens_per_s}
    diffs = {float(row["sparsity"]): row for row in _csv(out / "s2s_minus_s2d.csv")}
    assert set(diffs) == {0.5, 0.7}
    for sparsity, row in diffs.items():
        s2s, s2d = truth[f"s2s{int(sparsity * 100)}"], truth[f"s2d{int(sparsity * 100)}"]
        assert float(row["s2s_minus_s2d"]) == s2s.metrics["boolq/acc"] - s2d.metrics["boolq/acc"]
        assert (row["s2s_run_id"], row["s2d_run_id"]) == (s2s.run_id, s2d.run_id)
    assert not (out / "published.csv").exists()  # no published numbers without a user CSV
    markdown = (out / "accuracy.md").read_text()
    assert "| 0.6600 |" in markdown and "cfg-s2s50" in markdown and "0.99" not in markdown
    for png in ("accuracy_tiny_boolq_acc.png", "throughput.png", "s2s_minus_s2d.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC


def test_published_comparison_comes_only_from_the_csv(tmp_path, registry):
    published = tmp_path / "published.csv"
    published.write_text(
        "model,task,method,sparsity,mode,metric,value,citation\n"
        "tiny,boolq,magnitude,0.5,s2s,boolq/acc,0.625,Example et al. 2025 Table 2\n"
    )
    out = tmp_path / "report"
    assert (
        main(["report", "--registry", str(registry), "--out", str(out), "--published", str(published)]) == 0
    )
    (row,) = _csv(out / "published.csv")
    assert float(row["published"]) == 0.625 and float(row["ours"]) == 0.66
    assert float(row["ours_minus_published"]) == 0.66 - 0.625
    assert row["citation"] == "Example et al. 2025 Table 2" and row["run_id"] == "s2s50"


def test_published_row_without_citation_fails_cleanly(tmp_path, registry, capsys):
    published = tmp_path / "published.csv"
    published.write_text(
        "model,task,method,sparsity,mode,metric,value,citation\ntiny,boolq,magnitude,0.5,s2s,boolq/acc,0.6,\n"
    )
    out = tmp_path / "report"
    assert (
        main(["report", "--registry", str(registry), "--out", str(out), "--published", str(published)]) == 2
    )
    assert "citation" in capsys.readouterr().err
    assert not out.exists()


def test_missing_or_empty_registry(tmp_path, capsys):
    assert main(["report", "--registry", str(tmp_path / "none.sqlite"), "--out", str(tmp_path / "r")]) == 2
    Registry(tmp_path / "empty.sqlite").put(_run("x", "s2s", 0.5, 0.5, status="failed"))
    assert main(["report", "--registry", str(tmp_path / "empty.sqlite"), "--out", str(tmp_path / "r")]) == 2
    assert "no succeeded run" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
