"""The report: tables and plots generated only from the run registry, comparing like with like.

The figures are drawn by `report_figures` from the rows these tables are made of.

Nothing here is typed in by hand: every value comes from a succeeded run's registry row and the
per-example results its evaluation logged, and every row carries its runs' provenance. Published
numbers enter only through a user CSV whose rows each name their citation. Runs of the two data
protocols (official / offline, `modelzoo_ext.data.protocol`) never share a table: each protocol
gets its own files, named `_<protocol>`.

Outputs (in `--out`, written atomically):
    README.md                      what each file holds, each table's protocol, how intervals are computed
    runs.csv / .md                 every succeeded run: grid columns, protocol, seeds, each metric with
                                   its 95% interval, provenance (config hash, git revision, mask checksum)
    scores_<protocol>.csv / .md    per grid point: mean over seeds with a 95% interval, examples, seeds
    paired_<protocol>.csv / .md    per sparse point and backend: s2s - s2d, s2s - dense LoRA, s2d - dense
                                   LoRA, paired on the same examples, with interval and verdict
    <metric>_<protocol>_<model>.png  the metric vs sparsity with error bars: a line per (mode, method,
                                   structure, backend); the unfine-tuned pruned model per method; the
                                   dense-LoRA baseline per backend (band = its interval)
    curves_<protocol>.csv / .md    runs evaluated during training (sweep `eval.heldout_every`): the
                                   held-out loss per fine-tune grid point and step, mean over seeds;
                                   step 0 is the same model before fine-tuning (its no-fine-tune run)
    heldout_curve_<protocol>_<model>_<task>.png  that held-out loss against the training step, a
                                   panel per sparsity, a line per mode (band = interval over seeds)
    throughput.csv / .md / .png    per run: non-padding tokens/s and samples/s over the whole training,
                                   next to the backend's padding policy (never averaged across runs)
    published.csv / .md            ours next to the user's published numbers, joined on model, task,
                                   method, structure, mode, sparsity, metric and protocol
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from modelzoo_ext.atomic import atomic_dir
from modelzoo_ext.errors import UserError
from modelzoo_ext.study import stats
from modelzoo_ext.study.heldout_loss import CURVE_KEY
from modelzoo_ext.study.registry import Registry, RunRecord
from modelzoo_ext.study.report_figures import plot_curves, plot_scores, plot_throughput

GRID_COLUMNS = ("model", "task", "method", "structure", "sparsity", "mode", "backend", "seed")
PROVENANCE_COLUMNS = ("config_hash", "git_rev", "mask_sha256", "run_id")
PUBLISHED_COLUMNS = (
    "model",
    "task",
    "method",
    "structure",
    "sparsity",
    "mode",
    "metric",
    "protocol",
    "value",
    "citation",
)
HELDOUT_METRIC = "heldout/nll_per_token"
# (first, second): first - second. `none` is the same masks without fine-tuning (what fine-tuning bought).
COMPARISONS = (("s2s", "s2d"), ("s2s", "lora"), ("s2d", "lora"), ("s2s", "none"), ("s2d", "none"))
# How the two sides read in the `comparison` and `verdict` columns.
SIDE_LABELS = {"s2s": "s2s", "s2d": "s2d", "lora": "dense-LoRA", "none": "no-fine-tune"}


def build_report(
    registry_path: str | Path, out_dir: str | Path, *, published_csv: str | Path | None = None
) -> list[Path]:
    """Write the report for every succeeded run in the registry; return the written paths.

    The registry of a sweep directory is first rebuilt from the sweep's run records (the records
    are the truth; the registry is their index)."""
    from modelzoo_ext.study.sweep import REGISTRY_FILE, rebuild_index

    sweep_dir = Path(registry_path).parent
    if Path(registry_path).name == REGISTRY_FILE and (sweep_dir / "sweep.json").is_file():
        rebuild_index(sweep_dir)
    if not Path(registry_path).is_file():
        raise UserError(
            "registry not found", where=str(registry_path), fix="run `sparse-lora sweep run` first"
        )
    runs = Registry(registry_path).runs(status="succeeded")
    if not runs:
        raise UserError("the registry has no succeeded run to report", where=str(registry_path))
    published = read_published(published_csv) if published_csv else None
    protocols = sorted({run.protocol or "unrecorded" for run in runs})
    with atomic_dir(out_dir) as tmp:
        write_table(tmp / "runs", run_rows(runs))
        scores_all = []
        for protocol in protocols:
            mine = [run for run in runs if (run.protocol or "unrecorded") == protocol]
            scores = score_rows(mine, protocol)
            scores_all += scores
            write_table(tmp / f"scores_{protocol}", scores)
            paired = paired_rows(mine, protocol)
            if paired:
                write_table(tmp / f"paired_{protocol}", paired)
            plot_scores(scores, protocol, tmp)
            curves = curve_rows(mine, protocol)
            if curves:
                write_table(tmp / f"curves_{protocol}", curves)
                plot_curves(curves, protocol, tmp)
        throughput = throughput_rows(runs)
        if throughput:
            write_table(tmp / "throughput", throughput)
            plot_throughput(throughput, tmp / "throughput.png")
        if published is not None:
            write_table(tmp / "published", published_rows(scores_all, published))
        (tmp / "README.md").write_text(_readme(protocols, runs))
    return sorted(Path(out_dir).iterdir())


# -- reading a run's numbers ----------------------------------------------------------------------
def is_score(name: str, value: Any) -> bool:
    """Scores are keyed `task/metric[,filter]` (`boolq/acc`) with a recorded value."""
    return "/" in name and isinstance(value, dict) and "value" in value


def _eval_results(run: RunRecord) -> dict[str, Any]:
    path = run.artifacts.get("eval")
    if not path or not Path(path).is_file():
        raise UserError(
            f"run {run.run_id} has no evaluation results",
            where=str(path),
            fix="rerun `sweep run --stage eval`",
        )
    return json.loads(Path(path).read_text())


def per_example(run: RunRecord, metric: str) -> dict[str, Any]:
    """key digest -> the run's score of that example (held-out loss: (nll_sum, tokens))."""
    results = _eval_results(run)
    if metric == HELDOUT_METRIC:
        return {e["key"]: (e["nll_sum"], e["tokens"]) for e in results["heldout_loss"]["examples"]}
    from modelzoo_ext.study.evaluate import read_samples

    task, name = metric.split("/", 1)
    column = name if "," in name else f"{name},none"
    return {row["key"]: row[column] for row in read_samples(results, task) if column in row}


# -- tables ---------------------------------------------------------------------------------------
def run_rows(runs: list[RunRecord]) -> list[dict[str, Any]]:
    """One row per run: grid columns, protocol, each metric with its interval, throughput, provenance."""
    names = sorted({name for run in runs for name, value in run.metrics.items() if is_score(name, value)})
    rows = []
    for run in runs:
        row = {c: getattr(run, c) for c in GRID_COLUMNS}
        row["protocol"] = run.protocol
        for name in names:
            record = run.metrics.get(name)
            row[name] = record["value"] if record else None
            row[f"{name} 95% CI"] = _ci_text(record) if record else None
        row["tokens_per_s"] = run.throughput_tokens_per_s
        row["seeds"] = json.dumps(run.seeds, sort_keys=True) if run.seeds else None
        row.update({c: getattr(run, c) for c in PROVENANCE_COLUMNS})
        rows.append(row)
    return rows


def _ci_text(record: dict[str, Any]) -> str:
    low, high = record.get("ci95") or (math.nan, math.nan)
    return f"[{low:.4f}, {high:.4f}]"


def _point(run: RunRecord) -> tuple:
    return (run.model, run.task, run.method, run.structure, run.sparsity, run.mode, run.backend)


def score_rows(runs: list[RunRecord], protocol: str) -> list[dict[str, Any]]:
    """Per grid point and metric: the mean over seeds with its 95% interval (method stated)."""
    groups: dict[tuple, list[RunRecord]] = defaultdict(list)
    for run in runs:
        for name, value in run.metrics.items():
            if is_score(name, value):
                groups[(*_point(run), name)].append(run)
    rows = []
    for key, members in sorted(groups.items(), key=lambda kv: str(kv[0])):
        *point, metric = key
        records = [m.metrics[metric] for m in members]
        single = stats.Estimate(
            records[0]["value"], *records[0]["ci95"], records[0]["n"], records[0]["method"]
        )
        estimate = stats.over_seeds([r["value"] for r in records], single)
        row = dict(
            zip(("model", "task", "method", "structure", "sparsity", "mode", "backend"), point, strict=True)
        )
        row.update(protocol=protocol, metric=metric, mean=estimate.value, ci95_low=estimate.low, ci95_high=estimate.high,
                   interval=estimate.method, seeds=len(members), examples=records[0].get("n"),
                   majority_answer=majority_baseline(members[0], metric),
                   run_ids=" ".join(m.run_id for m in members))  # fmt: skip
        rows.append(row)
    return rows


def majority_baseline(run: RunRecord, metric: str) -> float | None:
    """Accuracy of always giving the most common gold answer on the run's evaluated examples (BoolQ:
    always "yes" scores ~62%): the floor a multiple-choice accuracy must clear to mean anything."""
    if metric == HELDOUT_METRIC or not metric.split("/", 1)[1].startswith("acc"):
        return None
    from modelzoo_ext.study.evaluate import read_samples

    targets = [row.get("target") for row in read_samples(_eval_results(run), metric.split("/", 1)[0])]
    if not targets or any(t is None for t in targets):
        return None
    counts: dict[str, int] = defaultdict(int)
    for target in targets:
        counts[str(target)] += 1
    return max(counts.values()) / len(targets)


def _by_mode(runs: list[RunRecord]) -> dict[tuple, dict[str, dict[int, RunRecord]]]:
    """(model, task, method, structure, sparsity, backend) -> mode -> seed -> run.

    Dense LoRA runs are filed under every sparse point of their model, task and backend; the
    no-fine-tune run of the same masks under every backend (for every seed when its masks do
    not depend on the seed)."""
    sparse: dict[tuple, dict[str, dict[int, RunRecord]]] = defaultdict(lambda: defaultdict(dict))
    dense, pruned = defaultdict(dict), defaultdict(dict)
    for run in runs:
        if run.mode in ("s2s", "s2d"):
            sparse[(run.model, run.task, run.method, run.structure, run.sparsity, run.backend)][run.mode][
                run.seed
            ] = run
        elif run.mode == "lora":
            dense[(run.model, run.task, run.backend)][run.seed] = run
        elif run.mode == "none" and run.method != "dense":
            pruned[(run.model, run.task, run.method, run.structure, run.sparsity)][run.seed] = run
    for key, modes in sparse.items():
        modes["lora"] = dense.get((key[0], key[1], key[5]), {})
        masks_only = pruned.get(key[:5], {})
        seeds = {s for mode in ("s2s", "s2d") for s in modes.get(mode, {})}
        modes["none"] = (
            masks_only if len(masks_only) != 1 else dict.fromkeys(seeds, next(iter(masks_only.values())))
        )
    return sparse


def _paired(
    a: dict[int, RunRecord], b: dict[int, RunRecord], metric: str
) -> tuple[stats.Estimate, list[int]] | None:
    """The paired difference a - b over the examples and seeds both have (seed-averaged per example)."""
    seeds = sorted(set(a) & set(b))
    seeds = [s for s in seeds if metric in a[s].metrics and metric in b[s].metrics]
    if not seeds:
        return None
    scores_a = [per_example(a[s], metric) for s in seeds]
    scores_b = [per_example(b[s], metric) for s in seeds]
    keys = sorted(set.intersection(*(set(x) for x in scores_a + scores_b)))
    if not keys:
        return None
    if metric == HELDOUT_METRIC:
        sums_a = np.mean([[x[k][0] for k in keys] for x in scores_a], axis=0)
        sums_b = np.mean([[x[k][0] for k in keys] for x in scores_b], axis=0)
        runs = [a[s].run_id for s in seeds] + [b[s].run_id for s in seeds]
        tokens = _same_tokens(dict(zip(runs, scores_a + scores_b, strict=True)), keys)
        return stats.paired_ratio_difference(sums_a, sums_b, tokens), seeds
    mean_a = np.mean([[x[k] for k in keys] for x in scores_a], axis=0)
    mean_b = np.mean([[x[k] for k in keys] for x in scores_b], axis=0)
    return stats.paired_difference(mean_a, mean_b), seeds


def _same_tokens(scores: dict[str, dict[str, Any]], keys: list[str]) -> np.ndarray:
    """The completion tokens of each shared held-out example, which every paired run must have scored
    alike (else they were evaluated on differently tokenised data, and a per-token difference is void)."""
    (first, reference), *others = scores.items()
    tokens = [reference[k][1] for k in keys]
    for run_id, theirs in others:
        differ = next((k for k, t in zip(keys, tokens, strict=True) if theirs[k][1] != t), None)
        if differ is not None:
            raise UserError(
                f"runs {first} and {run_id} scored different tokens for held-out example {differ}",
                fix="evaluate both on the same held-out data (one `data prepare --split heldout` output)",
            )
    return np.array(tokens)


def paired_rows(runs: list[RunRecord], protocol: str) -> list[dict[str, Any]]:
    """s2s - s2d, s2s - dense LoRA, s2d - dense LoRA per sparse point, backend and metric."""
    rows = []
    for key, modes in sorted(_by_mode(runs).items(), key=lambda kv: str(kv[0])):
        metrics = sorted(
            {
                n
                for seeds in modes.values()
                for r in seeds.values()
                for n, v in r.metrics.items()
                if is_score(n, v)
            }
        )
        for metric in metrics:
            for first, second in COMPARISONS:
                found = _paired(modes.get(first, {}), modes.get(second, {}), metric)
                if found is None:
                    continue
                estimate, seeds = found
                higher_is_better = metric != HELDOUT_METRIC
                row = dict(
                    zip(("model", "task", "method", "structure", "sparsity", "backend"), key, strict=True)
                )
                a, b = SIDE_LABELS[first], SIDE_LABELS[second]
                row.update(protocol=protocol, metric=metric, comparison=f"{a} - {b}", difference=estimate.value,
                           ci95_low=estimate.low, ci95_high=estimate.high, examples=estimate.n, seeds=len(seeds),
                           interval=f"{estimate.method}, per-example scores averaged over seeds {seeds}",
                           verdict=stats.verdict(estimate, a, b, higher_is_better))  # fmt: skip
                rows.append(row)
    return rows


def _before_fine_tuning(runs: list[RunRecord]) -> dict[tuple, RunRecord]:
    """(model, task, method, structure, sparsity) -> its no-fine-tune run with a held-out loss (the
    dense model's is filed under the dense-LoRA point: method and structure `dense`, sparsity 0)."""
    return {
        (r.model, r.task, r.method, r.structure, r.sparsity): r
        for r in runs
        if r.mode == "none" and HELDOUT_METRIC in r.metrics
    }


def curve_rows(runs: list[RunRecord], protocol: str) -> list[dict[str, Any]]:
    """The held-out loss during training per fine-tune grid point and step, mean over seeds.

    Each evaluation scored the examples of the final held-out loss (`nll_per_token`, the same
    quantity); several seeds: t 95% interval over the seeds, one seed: none (a validation pass
    keeps no per-example sums). Step 0 is the model before fine-tuning, which is the no-fine-tune
    run of the same masks (LoRA's B starts at zero), with that run's own interval.
    """
    groups: dict[tuple, dict[int, list[tuple[RunRecord, dict]]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        for point in run.metrics.get(CURVE_KEY) or []:
            groups[_point(run)][point["step"]].append((run, point))
    before = _before_fine_tuning(runs)
    columns = ("model", "task", "method", "structure", "sparsity", "mode", "backend")
    rows = []
    for key, steps in sorted(groups.items(), key=lambda kv: str(kv[0])):
        start = before.get(key[:5])
        if start is not None:
            record = start.metrics[HELDOUT_METRIC]
            rows.append({**dict(zip(columns, key, strict=True)), "protocol": protocol, "step": 0,
                         "mean": record["value"], "ci95_low": record["ci95"][0], "ci95_high": record["ci95"][1],
                         "interval": f"{record['method']} (no-fine-tune run)", "seeds": 1,
                         "examples": record.get("n"), "run_ids": start.run_id})  # fmt: skip
        for step, members in sorted(steps.items()):
            estimate = stats.over_seeds([p["nll_per_token"] for _, p in members])
            rows.append({**dict(zip(columns, key, strict=True)), "protocol": protocol, "step": step,
                         "mean": estimate.value, "ci95_low": estimate.low, "ci95_high": estimate.high,
                         "interval": estimate.method, "seeds": len(members), "examples": members[0][1].get("samples"),
                         "run_ids": " ".join(r.run_id for r, _ in members)})  # fmt: skip
    return rows


def throughput_rows(runs: list[RunRecord]) -> list[dict[str, Any]]:
    """One row per fine-tune run that recorded training throughput (never averaged across runs)."""
    rows = []
    for run in runs:
        t = run.throughput
        if t and t.get("tokens_per_s"):
            row = {c: getattr(run, c) for c in GRID_COLUMNS}
            row.update(protocol=run.protocol, tokens_per_s=t["tokens_per_s"], samples_per_s=t.get("samples_per_s"),
                       tokens=t.get("tokens"), seconds=t.get("seconds"), steps=t.get("steps"),
                       padded_tokens=t.get("padded_tokens"), counted=t.get("counted"),
                       padding_policy=t.get("padding_policy"), run_id=run.run_id)  # fmt: skip
            rows.append(row)
    return sorted(
        rows, key=lambda r: (str(r["backend"]), str(r["model"]), str(r["task"]), str(r["mode"]), r["run_id"])
    )


def read_published(path: str | Path) -> list[dict[str, Any]]:
    """The user's published-results CSV; every row must name its citation and its protocol."""
    path = Path(path)
    if not path.is_file():
        raise UserError("published-results CSV not found", where=str(path))
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in PUBLISHED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(
                f"published CSV lacks column(s) {missing}", where=str(path), fix=f"use {PUBLISHED_COLUMNS}"
            )
        rows = list(reader)
    for line_no, row in enumerate(rows, start=2):
        if not row["citation"].strip():
            raise UserError(
                "a published number without a citation", where=f"{path}:{line_no}", fix="fill `citation`"
            )
        if row["protocol"] not in ("official", "offline"):
            raise UserError(
                f"protocol {row['protocol']!r}", where=f"{path}:{line_no}", fix="use official (or offline)"
            )
        try:
            row["sparsity"], row["value"] = float(row["sparsity"]), float(row["value"])
        except ValueError as exc:
            raise UserError(f"not a number ({exc})", where=f"{path}:{line_no}") from exc
    return rows


def published_rows(scores: list[dict[str, Any]], published: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each published number next to our matching grid points (every key equal), one row per backend."""
    keys = ("model", "task", "method", "structure", "mode", "metric", "protocol")
    rows = []
    for pub in published:
        ours = [
            s
            for s in scores
            if all(s[k] == pub[k] for k in keys) and abs((s["sparsity"] or 0.0) - pub["sparsity"]) < 1e-9
        ]
        for s in ours or [None]:
            rows.append({
                **{c: pub[c] for c in (*keys[:5], "sparsity", "metric", "protocol")},
                "published": pub["value"], "citation": pub["citation"],
                "ours": s["mean"] if s else None, "ours_ci95": f"[{s['ci95_low']:.4f}, {s['ci95_high']:.4f}]" if s else None,
                "ours_minus_published": (s["mean"] - pub["value"]) if s else None,
                "backend": s["backend"] if s else None, "seeds": s["seeds"] if s else None,
                "run_ids": s["run_ids"] if s else None,
            })  # fmt: skip
    return rows


def write_table(stem: Path, rows: list[dict[str, Any]]) -> None:
    """`stem.csv` and `stem.md` with the same rows and columns."""
    columns = list(dict.fromkeys(c for row in rows for c in row))
    with open(stem.with_suffix(".csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4f}"
    return str(value).replace("|", "\\|")


def _readme(protocols: list[str], runs: list[RunRecord]) -> str:
    from modelzoo_ext.data.protocol import DataProtocol

    described = {
        "official": DataProtocol("official", "hub").describe().replace(", hub)", ")"),
        "offline": "offline (training part / held-out part of each task's evaluation split; not comparable with published numbers)",
        "unrecorded": "unrecorded (runs from a registry written before protocols were recorded)",
    }
    lines = [
        "# Report",
        "",
        f"Generated from {len(runs)} succeeded runs of the registry; nothing typed by hand.",
        "",
        "## Protocols (never mixed in one table)",
        "",
    ]
    lines += [f"- `*_{p}.*`: {described.get(p, p)}" for p in protocols]
    lines += [
        "",
        "## Intervals",
        "",
        "- One run: Wilson 95% interval over the evaluated examples for 0/1 scores (accuracy, exact match); "
        "held-out loss: bootstrap over examples of summed NLL / summed tokens.",
        "- Several seeds (`scores_*`): mean over seeds, t 95% interval over the seed values; one seed: that run's interval.",
        f"- Paired comparisons (`paired_*`): the per-example difference, averaged over the seeds both sides have, "
        f"paired bootstrap over examples ({stats.BOOTSTRAP_RESAMPLES} resamples, percentile 95%). "
        "`no detectable difference` where the interval covers zero; no verdict below "
        f"{stats.MIN_EXAMPLES_FOR_VERDICT} examples.",
        "- Held-out loss during training (`curves_*`): each evaluation scores the examples of the final held-out "
        "loss (the same NLL per completion token); mean over seeds with a t 95% interval over the seeds (none "
        "with one seed); step 0 is the no-fine-tune run of the same masks, with its bootstrap interval.",
        "- Throughput: per run, non-padding tokens / total training time; the backends pad differently "
        "(`padding_policy` column): compare a backend with itself.",
    ]
    return "\n".join(lines) + "\n"
