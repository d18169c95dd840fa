"""The held-out loss during training (sweep option `eval.heldout_every`) and its report figures.

- The option writes the held-out data as the run's validation data, with a schedule that scores
  exactly the final held-out loss's examples; bad schedules are refused at plan.
- The trainer's validation logs the held-out loss's quantity (summed NLL / summed completion tokens):
  its last point equals the held-out loss of the exported model on the same examples.
- The sweep records the curve in the registry; the report turns a registry into the curve table and
  figures (values recomputed here by hand) next to the held-out-loss-against-sparsity figure.
- `make study-mini`'s results page: generated blocks are refilled from the report's files.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from modelzoo_ext.cli import main
from modelzoo_ext.study import stats
from modelzoo_ext.study.heldout_loss import CURVE_KEY
from modelzoo_ext.study.registry import Registry, RunRecord

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "modelzoo_ext" / "study" / "examples"
TINY_PARAMS = REPO / "model_configs" / "params_sparse_lora_tiny.yaml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _curve_sweep(tmp_path: Path, hf_dir: Path, **eval_changes) -> Path:
    spec = yaml.safe_load((EXAMPLES / "sweep_tiny.yaml").read_text())
    spec["models"]["tiny"] = {"hf_dir": str(hf_dir), "params": str(TINY_PARAMS)}
    spec["train"] = {"max_steps": 4, "batch_size": 2}
    spec["eval"] = {**spec["eval"], "batch_size": 4, "heldout_limit": 8, "heldout_every": 2, **eval_changes}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"heldout_limit": None}, "heldout_limit to a multiple of eval.batch_size"),
        ({"heldout_limit": 6}, "heldout_limit to a multiple of eval.batch_size (4)"),
        ({"heldout_loss": False}, "set heldout_loss: true"),
        ({"heldout_every": 0}, "greater than 0"),
    ],
)
def test_a_curve_that_would_not_score_the_held_out_examples_is_refused_at_plan(
    tmp_path, tiny_llama_dir, capsys, changes, message
):
    out = tmp_path / "sweep"
    assert (
        main(["sweep", "plan", str(_curve_sweep(tmp_path, tiny_llama_dir, **changes)), "--out", str(out)])
        == 2
    )
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_the_plan_writes_the_held_out_data_as_validation_data(tmp_path, tiny_llama_dir):
    """Every fine-tune (s2s, s2d) validates on the held-out part every `heldout_every` steps, on the first
    `heldout_limit` examples in order; the reference trainer accepts the file."""
    from modelzoo_ext.run_config import load_run_config

    out = tmp_path / "sweep"
    assert main(["sweep", "plan", str(_curve_sweep(tmp_path, tiny_llama_dir)), "--out", str(out)]) == 0
    fine_tunes = [p for p in (out / "runs").glob("*/params.yaml")]
    assert len(fine_tunes) == 2  # s2s, s2d (the no-fine-tune runs have no params)
    for path in fine_tunes:
        params = yaml.safe_load(path.read_text())
        fit, loop = params["trainer"]["fit"], params["trainer"]["init"]["loop"]
        assert fit["val_dataloader"] == {
            "data_processor": "GptHDF5MapDataProcessor",
            "data_dir": str(out / "assets" / "data" / "tiny__boolq" / "heldout"),
            "batch_size": 4,
            "shuffle": False,
            "num_workers": 0,
        }
        assert (loop["eval_frequency"], loop["eval_steps"], loop["max_steps"]) == (2, 2, 4)
        config = load_run_config(path)
        assert config.val_dataloader.data_dir == fit["val_dataloader"]["data_dir"]
    # Without the option nothing is validated during training (as before).
    plain = _curve_sweep(tmp_path, tiny_llama_dir, heldout_every=None)
    assert main(["sweep", "plan", str(plain), "--out", str(tmp_path / "plain")]) == 0
    for path in (tmp_path / "plain" / "runs").glob("*/params.yaml"):
        assert "val_dataloader" not in yaml.safe_load(path.read_text())["trainer"]["fit"]


def test_a_planned_fine_tune_logs_the_final_held_out_loss_s_quantity_during_training(
    tmp_path, tiny_llama_dir
):
    """The planned s2s run, with its assets built by the sweep's own commands (in-process), trained by the
    reference trainer: evaluations at steps 2 and 4 on the 8 held-out examples, read back as the curve;
    the last point equals the held-out loss of the exported (merged) model on the same examples."""
    from gpu_reference.train import train
    from modelzoo_ext.study.heldout_loss import heldout_curve, heldout_loss
    from modelzoo_ext.study.sweep import load_plan
    from modelzoo_ext.study.sweep.commands import data_prepare_command, masks_compute_command

    sweep, out = _curve_sweep(tmp_path, tiny_llama_dir), tmp_path / "sweep"
    assert main(["sweep", "plan", str(sweep), "--out", str(out)]) == 0
    run_dir = next((out / "runs").glob("*__s2s__*"))
    plan = load_plan(out, run_dir.name)
    for command in (
        data_prepare_command(plan, "train"),
        data_prepare_command(plan, "heldout"),
        masks_compute_command(plan),
    ):
        assert main(command[3:]) == 0  # [python, -m, modelzoo_ext.cli, ...] run in this process
    train(run_dir / "params.yaml", tiny_llama_dir, run_dir / "train", "cpu", progress=False)
    curve = heldout_curve(run_dir / "train" / "metrics.jsonl")
    assert [p["step"] for p in curve] == [2, 4] and {p["samples"] for p in curve} == {8}
    final = heldout_loss(run_dir / "train" / "merged", plan.assets.heldout, batch_size=4, limit=8)
    assert curve[-1]["nll_per_token"] == pytest.approx(final["nll_per_token"]["value"], rel=1e-5)
    assert curve[-1]["loss_tokens"] == sum(e["tokens"] for e in final["examples"])
    assert curve[0]["nll_per_token"] != pytest.approx(curve[-1]["nll_per_token"], rel=1e-6)  # it trained


def test_validation_pools_tokens_and_keeps_modelzoo_s_mean_of_batches(tiny_llama_dir, tmp_path):
    """`nll_per_token` is summed NLL / summed loss tokens over all validated examples; `loss` is the mean of
    the batches' losses (ModelZoo's). GSM8K's completions differ in length, so the two readings differ."""
    import torch

    from gpu_reference.data import collate
    from gpu_reference.evaluate import validation_loss
    from gpu_reference.loss import per_example_loss_sums
    from gpu_reference.model import load_hf_model
    from modelzoo_ext.data.hdf5 import SampleDataset
    from modelzoo_ext.run_config.params import DataLoaderSection

    data = tmp_path / "heldout"
    assert main(["data", "prepare", "--task", "gsm8k", "--protocol", "offline", "--source", "bundled",
                 "--held-out-fraction", "0.2", "--tokenizer", str(tiny_llama_dir), "--max-seq-length", "256",
                 "--split", "heldout", "--out", str(data)]) == 0  # fmt: skip
    dataset = SampleDataset(data)
    model = load_hf_model(tiny_llama_dir).eval()
    val = DataLoaderSection(data_processor="GptHDF5MapDataProcessor", data_dir=str(data), batch_size=4)
    got = validation_loss(model, dataset, val, eval_steps=2, scaling="num_tokens", loss_weight=1.0,
                          autocast=False, device=torch.device("cpu"))  # fmt: skip
    sums, tokens = per_example_loss_sums(model, collate(dataset, list(range(8))), False, torch.device("cpu"))
    sums, tokens = sums.double().numpy(), tokens.double().numpy()
    assert got.samples == 8 and got.loss_tokens == int(tokens.sum())
    assert got.nll_per_token == pytest.approx(sums.sum() / tokens.sum(), rel=1e-6)
    batch_means = [sums[i : i + 4].sum() / tokens[i : i + 4].sum() for i in (0, 4)]
    assert got.loss == pytest.approx(np.mean(batch_means), rel=1e-6)
    # a random tiny model's losses are nearly uniform: the readings differ by ~1e-4, far above the 1e-6 used above
    assert tokens[:4].sum() != tokens[4:].sum() and abs(got.loss / got.nll_per_token - 1) > 1e-5


@pytest.mark.slow
def test_the_sweep_records_a_curve_whose_last_point_is_the_final_held_out_loss(tmp_path, tiny_llama_dir):
    """`sweep run --stage train` with validation during training -> the registry's curve (steps 2 and 4) for
    s2s and s2d; the held-out loss of each exported model (merged s2s, adapter on the pruned base s2d) on
    the same examples equals the curve's last point."""
    from modelzoo_ext.study.heldout_loss import heldout_loss

    out = tmp_path / "sweep"
    assert main(["sweep", "plan", str(_curve_sweep(tmp_path, tiny_llama_dir)), "--out", str(out)]) == 0
    assert (
        main(["sweep", "run", str(out), "--backend", "cpu", "--stage", "train", "--max-attempts", "1"]) == 0
    )
    trained = [r for r in Registry(out / "registry.sqlite").runs() if r.status == "trained"]
    assert sorted(r.mode for r in trained) == ["s2d", "s2s"]
    for run in trained:
        curve = run.metrics[CURVE_KEY]
        assert [p["step"] for p in curve] == [2, 4] and {p["samples"] for p in curve} == {8}
        final = heldout_loss(run.artifacts["model"], out / "assets" / "data" / "tiny__boolq" / "heldout",
                             adapter_dir=run.artifacts.get("adapter"), batch_size=4, limit=8)  # fmt: skip
        assert curve[-1]["nll_per_token"] == pytest.approx(final["nll_per_token"]["value"], rel=1e-5)
        assert curve[-1]["loss_tokens"] == sum(e["tokens"] for e in final["examples"])


# -- the report, from a registry ----------------------------------------------------------------------
N = 40  # held-out examples
LEVELS = (0.25, 0.5, 0.75)
STEPS = (10, 20)


def _nll(sparsity: float, mode: str, seed: int, step: int | None) -> float:
    """A made-up held-out loss per token: higher with sparsity, s2s above s2d, falling with steps."""
    base = 2.0 + 4 * sparsity + (0.5 if mode == "s2s" else 0.0) + 0.01 * seed
    return base if step is None else base + 1.0 / step


def _record(folder: Path, run_id: str, nll_per_token: float, **grid) -> RunRecord:
    """A succeeded run whose evaluation logged N held-out examples of 2 tokens each."""
    sums = np.full(N, 2 * nll_per_token) + np.linspace(-0.1, 0.1, N)
    results = {"heldout_loss": {"examples": [{"key": f"k{i}", "nll_sum": float(s), "tokens": 2}
                                             for i, s in enumerate(sums)]}}  # fmt: skip
    (folder / f"{run_id}.json").write_text(json.dumps(results))
    metrics = {"heldout/nll_per_token": stats.ratio(sums, np.full(N, 2.0)).as_record()}
    if grid["mode"] != "none":
        metrics[CURVE_KEY] = [
            {"step": s, "nll_per_token": _nll(grid["sparsity"], grid["mode"], grid["seed"], s), "loss": 0.0,
             "loss_tokens": 2 * N, "samples": N}
            for s in STEPS
        ]  # fmt: skip
    return RunRecord(run_id, status="succeeded", model="smollm2", task="boolq", backend="cpu", protocol="offline",
                     metrics=metrics, artifacts={"eval": str(folder / f"{run_id}.json")}, **grid)  # fmt: skip


@pytest.fixture
def study_registry(tmp_path) -> Path:
    """The shape of sweep_smollm2_mini: 3 sparsities x s2s/s2d x 2 seeds, dense LoRA, no-fine-tune runs."""
    registry = Registry(tmp_path / "registry.sqlite")
    sparse = {"method": "magnitude", "structure": "unstructured"}
    dense = {"method": "dense", "structure": "dense", "sparsity": 0.0}
    for level in LEVELS:
        registry.put(_record(tmp_path, f"none{level}", _nll(level, "s2s", 0, None) + 5, mode="none", seed=0,
                             sparsity=level, **sparse))  # fmt: skip
        for mode in ("s2s", "s2d"):
            for seed in (0, 1):
                registry.put(_record(tmp_path, f"{mode}{level}-{seed}", _nll(level, mode, seed, STEPS[-1]),
                                     mode=mode, seed=seed, sparsity=level, **sparse))  # fmt: skip
    registry.put(_record(tmp_path, "dense-none", 4.0, mode="none", seed=0, **dense))
    for seed in (0, 1):
        registry.put(_record(tmp_path, f"lora-{seed}", _nll(0.0, "lora", seed, STEPS[-1]), mode="lora", seed=seed,
                             **dense))  # fmt: skip
    return tmp_path / "registry.sqlite"


def test_the_report_writes_the_curves_and_the_figures_from_a_registry(tmp_path, study_registry):
    out = tmp_path / "report"
    assert main(["report", "--registry", str(study_registry), "--out", str(out)]) == 0
    for name in ("heldout_curve_offline_smollm2_boolq.png", "heldout_nll_per_token_offline_smollm2.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
    with open(out / "curves_offline.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert (out / "curves_offline.md").read_text().startswith("| model | task |")
    # 3 sparsities x 2 modes + dense LoRA, each: step 0 (before fine-tuning) and the two evaluations
    assert len(rows) == (3 * 2 + 1) * (1 + len(STEPS))
    s2s = {int(r["step"]): r for r in rows if r["mode"] == "s2s" and float(r["sparsity"]) == 0.5}
    values = [_nll(0.5, "s2s", seed, 20) for seed in (0, 1)]
    half = stats.t95(1) * np.std(values, ddof=1) / math.sqrt(2)
    assert float(s2s[20]["mean"]) == pytest.approx(np.mean(values), rel=1e-12)
    assert float(s2s[20]["ci95_low"]) == pytest.approx(np.mean(values) - half, rel=1e-9)
    assert (s2s[20]["seeds"], s2s[20]["examples"], s2s[20]["interval"]) == (
        "2",
        str(N),
        "t 95% interval over 2 seeds",
    )
    # step 0 is the no-fine-tune run of the same masks, with its own interval
    start = Registry(study_registry).get("none0.5").metrics["heldout/nll_per_token"]
    assert (
        float(s2s[0]["mean"]) == pytest.approx(start["value"], rel=1e-12) and s2s[0]["run_ids"] == "none0.5"
    )
    lora = {int(r["step"]): r for r in rows if r["mode"] == "lora"}
    assert lora[0]["run_ids"] == "dense-none" and sorted(lora) == [0, 10, 20]
    # the paired comparisons the study reads: s2s - s2d per sparsity, with an interval and a verdict
    with open(out / "paired_offline.csv", newline="") as f:
        paired = [r for r in csv.DictReader(f) if r["comparison"] == "s2s - s2d"]
    assert sorted(float(r["sparsity"]) for r in paired) == list(LEVELS)
    assert {r["verdict"] for r in paired} == {"s2d better"}
    assert "curves_" in (out / "README.md").read_text()


def test_a_registry_without_curves_writes_no_curve_files(tmp_path, study_registry):
    registry = Registry(study_registry)
    for run in registry.runs():
        metrics = {k: v for k, v in run.metrics.items() if k != CURVE_KEY}
        registry.put(RunRecord(**{**run.__dict__, "metrics": metrics}))
    out = tmp_path / "report"
    assert main(["report", "--registry", str(study_registry), "--out", str(out)]) == 0
    assert not list(out.glob("curves_*")) and not list(out.glob("heldout_curve_*"))


# -- the results page ---------------------------------------------------------------------------------
def test_the_results_page_is_refilled_from_the_report_files(tmp_path):
    from modelzoo_ext.errors import UserError
    from modelzoo_ext.study.study_mini import fill_generated_blocks

    files = tmp_path / "results" / "mini"
    files.mkdir(parents=True)
    (files / "scores_offline.md").write_text("| a |\n|---|\n| 1 |\n")
    (files / "curve.png").write_bytes(PNG_MAGIC)
    page = tmp_path / "results" / "mini.md"
    page.write_text("# Title\nhand text\n<!-- generated: scores_offline.md -->\nstale\n<!-- end generated -->\n"
                    "between\n<!-- generated: curve.png -->\n<!-- end generated -->\nend\n")  # fmt: skip
    assert fill_generated_blocks(page, files) == ["scores_offline.md", "curve.png"]
    expected = ("# Title\nhand text\n<!-- generated: scores_offline.md -->\n| a |\n|---|\n| 1 |\n"
                "<!-- end generated -->\nbetween\n<!-- generated: curve.png -->\n![curve.png](mini/curve.png)\n"
                "<!-- end generated -->\nend\n")  # fmt: skip
    assert page.read_text() == expected
    assert (
        fill_generated_blocks(page, files) == ["scores_offline.md", "curve.png"]
        and page.read_text() == expected
    )
    page.write_text("<!-- generated: missing.md -->\n<!-- end generated -->\n")
    with pytest.raises(UserError, match="missing.md"):
        fill_generated_blocks(page, files)
    assert (
        page.read_text() == "<!-- generated: missing.md -->\n<!-- end generated -->\n"
    )  # nothing half-written


def test_the_study_spec_is_the_grid_the_issue_asks_for(tiny_llama_dir, tmp_path):
    """sweep_smollm2_mini.yaml: global magnitude masks at 25/50/75% and dense LoRA, s2s and s2d, >= 2 seeds,
    BoolQ offline (bundled), LoRA r=16 alpha=64 on all seven projections, validation during training."""
    from modelzoo_ext.run_config import load_run_config
    from modelzoo_ext.study.grid import grid
    from modelzoo_ext.study.sweep_spec import load_sweep

    raw = yaml.safe_load((EXAMPLES / "sweep_smollm2_mini.yaml").read_text())
    params = load_run_config(EXAMPLES / raw["models"]["smollm2_135m"]["params"])
    assert (params.sparse_lora.r, params.sparse_lora.alpha) == (16, 64.0)
    assert set(params.sparse_lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                      "up_proj", "down_proj"}  # fmt: skip
    raw["models"]["smollm2_135m"]["hf_dir"] = str(tiny_llama_dir)  # the grid, without building SmolLM2 here
    raw["models"]["smollm2_135m"]["params"] = str(EXAMPLES / raw["models"]["smollm2_135m"]["params"])
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    spec = load_sweep(tmp_path / "spec.yaml")
    assert (spec.scope, spec.method_structures, spec.modes) == (
        "global",
        [("magnitude", "unstructured")],
        ["s2s", "s2d"],
    )
    assert sorted(spec.sparsities) == [0.0, 0.25, 0.5, 0.75] and len(spec.seeds) >= 2
    assert (spec.data.protocol, spec.data.source, spec.tasks) == ("offline", "bundled", ["boolq"])
    assert (
        spec.eval.heldout_every and spec.eval.heldout_loss and spec.eval.limit is None
    )  # BoolQ: the whole part
    runs = grid(spec)
    seeds = len(spec.seeds)
    assert sum(r["mode"] in ("s2s", "s2d") for r in runs) == 3 * 2 * seeds
    assert sum(r["mode"] == "lora" for r in runs) == seeds
    assert sum(r["mode"] == "none" for r in runs) == 1 + 3  # the dense model, and each mask once
