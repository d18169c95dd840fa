"""`sparse-lora report`: values from the registry and the logged examples only, like compared with like
(protocols, backends and methods never averaged together), intervals and paired differences
recomputed here by hand, the published-results join on every key."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from modelzoo_ext.cli import main
from modelzoo_ext.study import stats
from modelzoo_ext.study.registry import Registry, RunRecord

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N = 60  # examples per evaluation


def _scores(seed: int, p: float) -> np.ndarray:
    """0/1 scores of N examples with about a fraction p correct (deterministic per seed)."""
    return (np.random.default_rng(seed).random(N) < p).astype(float)


def _write_eval(folder, run_id: str, acc: np.ndarray, nll: np.ndarray) -> dict[str, str]:
    samples = folder / f"{run_id}_samples"
    samples.mkdir()
    keys = [f"k{i:03d}" for i in range(N)]
    rows = [
        {"doc_id": i, "key": k, "target": i % 3 == 0, "acc,none": float(a)}
        for i, (k, a) in enumerate(zip(keys, acc, strict=True))
    ]
    (samples / "boolq.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = {
        "samples_dir": str(samples),
        "heldout_loss": {
            "examples": [{"key": k, "nll_sum": float(x), "tokens": 2} for k, x in zip(keys, nll, strict=True)]
        },
    }
    path = folder / f"{run_id}.json"
    path.write_text(json.dumps(results))
    return {"eval": str(path), "samples": str(samples)}


def _run(folder, run_id, *, mode, method="magnitude", sparsity=0.5, backend="cpu", seed=0, protocol="offline",
         p=0.6, loss=3.0, throughput=None, status="succeeded") -> RunRecord:  # fmt: skip
    acc = _scores(hash((run_id, seed)) % 1000, p)
    nll = np.random.default_rng(seed + 17).normal(loss * 2, 0.5, N)
    metrics = {
        "boolq/acc": stats.per_example_mean(acc).as_record(),
        "heldout/nll_per_token": stats.ratio(nll, np.full(N, 2.0)).as_record(),
        "eval_limit": None,
    }
    structure = "dense" if method == "dense" else "unstructured"
    return RunRecord(run_id, status=status, model="tiny", task="boolq", method=method, structure=structure,
                     sparsity=sparsity if method != "dense" else 0.0, mode=mode, backend=backend, seed=seed,
                     protocol=protocol, config_hash=f"cfg-{run_id}", git_rev="rev123", mask_sha256=f"mask-{method}",
                     metrics=metrics, throughput=throughput or {}, seeds={"sweep": seed},
                     throughput_tokens_per_s=(throughput or {}).get("tokens_per_s"),
                     artifacts=_write_eval(folder, run_id, acc, nll))  # fmt: skip


@pytest.fixture
def registry(tmp_path):
    """Two protocols, two backends, two methods, two seeds, s2s/s2d/dense LoRA/no fine-tune."""
    reg = Registry(tmp_path / "registry.sqlite")
    gpu = {"tokens_per_s": 900.0, "samples_per_s": 3.0, "padding_policy": "trimmed"}
    cs3 = {"tokens_per_s": 5000.0, "samples_per_s": 20.0, "padding_policy": "padded"}
    for protocol in ("offline", "official"):
        for seed in (0, 1):
            for backend, t in (("gpu", gpu), ("cs3", cs3)):
                for method, p_s2s in (("magnitude", 0.7), ("wanda", 0.8)):
                    for mode, p in (("s2s", p_s2s), ("s2d", 0.6)):
                        rid = f"{protocol}-{method}-{mode}-{backend}-{seed}"
                        reg.put(_run(tmp_path, rid, mode=mode, method=method, backend=backend, seed=seed,
                                     protocol=protocol, p=p, loss=2.5 if mode == "s2s" else 3.0, throughput=t))  # fmt: skip
                lora = f"{protocol}-lora-{backend}-{seed}"
                reg.put(
                    _run(
                        tmp_path,
                        lora,
                        mode="lora",
                        method="dense",
                        backend=backend,
                        seed=seed,
                        protocol=protocol,
                        p=0.75,
                        throughput=t,
                    )
                )
            for method in ("magnitude", "wanda"):
                reg.put(
                    _run(
                        tmp_path,
                        f"{protocol}-{method}-none-{seed}",
                        mode="none",
                        method=method,
                        backend="eval",
                        seed=seed,
                        protocol=protocol,
                        p=0.4,
                    )
                )
    reg.put(_run(tmp_path, "broken", mode="s2s", status="failed", p=0.99))
    return tmp_path / "registry.sqlite"


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def report(tmp_path, registry):
    out = tmp_path / "report"
    assert main(["report", "--registry", str(registry), "--out", str(out)]) == 0
    return out


def test_protocols_backends_and_methods_stay_apart(report, registry):
    truth = {r.run_id: r for r in Registry(registry).runs(status="succeeded")}
    for protocol in ("offline", "official"):
        scores = _csv(report / f"scores_{protocol}.csv")
        assert {row["protocol"] for row in scores} == {protocol}
        for row in scores:  # every grid point averages only its own runs: its seeds
            members = [truth[r] for r in row["run_ids"].split()]
            assert {(m.protocol, m.backend, m.method, m.mode) for m in members} == {
                (protocol, row["backend"], row["method"], row["mode"])
            }
            values = [m.metrics[row["metric"]]["value"] for m in members]
            assert (
                float(row["mean"]) == pytest.approx(np.mean(values)) and int(row["seeds"]) == len(values) == 2
            )
            half = stats.t95(1) * np.std(values, ddof=1) / math.sqrt(2)
            assert float(row["ci95_high"]) == pytest.approx(np.mean(values) + half)
        # each method keeps its own no-fine-tune line, each backend its own dense-LoRA line
        points = {(r["mode"], r["method"], r["backend"]) for r in scores if r["metric"] == "boolq/acc"}
        assert {("none", "magnitude", "eval"), ("none", "wanda", "eval")} <= points
        assert {("lora", "dense", "gpu"), ("lora", "dense", "cs3")} <= points
    assert "broken" not in (report / "runs.csv").read_text()
    for name in ("boolq_acc_offline_tiny.png", "heldout_nll_per_token_official_tiny.png", "throughput.png"):
        assert (report / name).read_bytes()[:8] == PNG_MAGIC
    readme = (report / "README.md").read_text()
    assert "`*_offline.*`" in readme and "`*_official.*`" in readme and "paired bootstrap" in readme


def test_paired_differences_are_recomputed_from_the_examples(report, registry):
    truth = {r.run_id: r for r in Registry(registry).runs(status="succeeded")}
    rows = _csv(report / "paired_offline.csv")
    row = next(
        r
        for r in rows
        if (r["method"], r["backend"], r["metric"], r["comparison"])
        == ("wanda", "cs3", "boolq/acc", "s2s - s2d")
    )

    def scores(run_id):
        path = Path(truth[run_id].artifacts["samples"]) / "boolq.jsonl"
        return np.array([json.loads(line)["acc,none"] for line in path.read_text().splitlines()])

    s2s = np.mean([scores(f"offline-wanda-s2s-cs3-{s}") for s in (0, 1)], axis=0)
    s2d = np.mean([scores(f"offline-wanda-s2d-cs3-{s}") for s in (0, 1)], axis=0)
    expected = stats.paired_difference(s2s, s2d)
    assert float(row["difference"]) == pytest.approx(expected.value)
    assert (float(row["ci95_low"]), float(row["ci95_high"])) == pytest.approx((expected.low, expected.high))
    assert row["seeds"] == "2" and row["examples"] == str(N)
    assert row["verdict"] == stats.verdict(expected, "s2s", "s2d")
    comparisons = {r["comparison"] for r in rows}
    assert comparisons == {
        "s2s - s2d", "s2s - dense-LoRA", "s2d - dense-LoRA", "s2s - no-fine-tune", "s2d - no-fine-tune"
    }  # fmt: skip
    # lower held-out loss is better: s2s was built with the lower loss
    loss = next(r for r in rows if r["metric"] == "heldout/nll_per_token" and r["comparison"] == "s2s - s2d")
    assert float(loss["difference"]) < 0 and loss["verdict"] == "s2s better"


def test_throughput_is_per_run_with_its_padding_policy(report):
    rows = _csv(report / "throughput.csv")
    assert len(rows) == 2 * 2 * 2 * (
        2 * 2 + 1
    )  # protocols x seeds x backends x (methods x modes + dense LoRA)
    assert {(r["backend"], r["padding_policy"]) for r in rows} == {("gpu", "trimmed"), ("cs3", "padded")}


def test_published_comparison_joins_on_every_key(tmp_path, registry):
    published = tmp_path / "published.csv"
    published.write_text(
        "model,task,method,structure,sparsity,mode,metric,protocol,value,citation\n"
        "tiny,boolq,wanda,unstructured,0.5,s2s,boolq/acc,official,0.625,Example et al. 2025 Table 2\n"
    )
    out = tmp_path / "report"
    assert (
        main(["report", "--registry", str(registry), "--out", str(out), "--published", str(published)]) == 0
    )
    rows = _csv(out / "published.csv")
    assert {r["backend"] for r in rows} == {"gpu", "cs3"}  # one row per backend, never averaged
    scores = {
        (r["backend"], r["mode"], r["method"], r["metric"]): r for r in _csv(out / "scores_official.csv")
    }
    for row in rows:
        ours = scores[(row["backend"], "s2s", "wanda", "boolq/acc")]
        assert float(row["ours"]) == float(ours["mean"]) and row["protocol"] == "official"
        assert row["citation"] == "Example et al. 2025 Table 2" and row["run_ids"] == ours["run_ids"]


@pytest.mark.parametrize(
    "content, message",
    [
        ("model,task,method,structure,sparsity,mode,metric,protocol,value,citation\n"
         "tiny,boolq,magnitude,unstructured,0.5,s2s,boolq/acc,official,0.6,\n", "citation"),
        ("model,task,method,sparsity,mode,metric,value,citation\ntiny,boolq,magnitude,0.5,s2s,boolq/acc,0.6,X\n", "lacks column"),
    ],
)  # fmt: skip
def test_bad_published_csv_fails_cleanly(tmp_path, registry, capsys, content, message):
    published = tmp_path / "published.csv"
    published.write_text(content)
    out = tmp_path / "report"
    assert (
        main(["report", "--registry", str(registry), "--out", str(out), "--published", str(published)]) == 2
    )
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_missing_or_empty_registry(tmp_path, capsys):
    assert main(["report", "--registry", str(tmp_path / "none.sqlite"), "--out", str(tmp_path / "r")]) == 2
    Registry(tmp_path / "empty.sqlite").put(RunRecord("x", status="failed"))
    assert main(["report", "--registry", str(tmp_path / "empty.sqlite"), "--out", str(tmp_path / "r")]) == 2
    assert "no succeeded run" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_held_out_losses_pair_only_on_the_same_tokens(tmp_path, capsys):
    """Two runs whose held-out results count different tokens for one example were scored on
    differently tokenised data: their per-token difference is refused, naming the runs and example."""
    reg = Registry(tmp_path / "registry.sqlite")
    s2s, s2d = (_run(tmp_path, f"{mode}-0", mode=mode) for mode in ("s2s", "s2d"))
    results = json.loads(Path(s2d.artifacts["eval"]).read_text())
    results["heldout_loss"]["examples"][5]["tokens"] = 3
    Path(s2d.artifacts["eval"]).write_text(json.dumps(results))
    reg.put(s2s)
    reg.put(s2d)
    out = tmp_path / "report"
    assert main(["report", "--registry", str(tmp_path / "registry.sqlite"), "--out", str(out)]) == 2
    assert "runs s2s-0 and s2d-0 scored different tokens for held-out example k005" in capsys.readouterr().err
    assert not out.exists()
