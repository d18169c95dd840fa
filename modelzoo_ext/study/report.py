"""The report: CSV and Markdown tables and PNG plots, generated only from the run registry.

Nothing here is typed in by hand: every value is read from a succeeded run's registry row, and
every table row carries that run's provenance (config hash, git revision, mask checksum, run id).
Published numbers enter only through a user CSV whose rows each name their citation.

Outputs (in `--out`, written atomically):
    runs.csv                      every succeeded run, one row each, metrics flattened
    accuracy.csv / .md            one row per (run, metric)
    accuracy_<model>_<metric>.png accuracy vs sparsity, a line per (mode, method, structure, backend),
                                  with the unfine-tuned pruned model (mode `none`) and the dense LoRA
                                  baseline (mode `lora`) as reference lines
    throughput.csv / .md / .png   training tokens/s (non-padding) vs sparsity per backend and mode
    s2s_minus_s2d.csv / .md / .png  paired runs differing only in mode
    published.csv / .md           ours next to the user's published numbers (with --published)
"""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from modelzoo_ext.atomic import atomic_dir
from modelzoo_ext.errors import UserError
from modelzoo_ext.study.registry import Registry, RunRecord

GRID_COLUMNS = ("model", "task", "method", "structure", "sparsity", "mode", "backend", "seed")
PROVENANCE_COLUMNS = ("config_hash", "git_rev", "mask_sha256", "run_id")
PUBLISHED_COLUMNS = ("model", "task", "method", "sparsity", "mode", "metric", "value", "citation")
REFERENCE_MODES = ("none", "lora")


def build_report(
    registry_path: str | Path, out_dir: str | Path, *, published_csv: str | Path | None = None
) -> list[Path]:
    """Write the report for every succeeded run in the registry; return the written paths."""
    if not Path(registry_path).is_file():
        raise UserError(
            "registry not found", where=str(registry_path), fix="run `sparse-lora sweep run` first"
        )
    runs = Registry(registry_path).runs(status="succeeded")
    if not runs:
        raise UserError("the registry has no succeeded run to report", where=str(registry_path))
    published = read_published(published_csv) if published_csv else None
    with atomic_dir(out_dir) as tmp:
        _write_table(tmp / "runs", run_rows(runs))
        accuracy = accuracy_rows(runs)
        _write_table(tmp / "accuracy", accuracy)
        plot_accuracy(accuracy, tmp)
        throughput = throughput_rows(runs)
        if throughput:
            _write_table(tmp / "throughput", throughput)
            plot_throughput(throughput, tmp / "throughput.png")
        diffs = s2s_minus_s2d_rows(runs)
        if diffs:
            _write_table(tmp / "s2s_minus_s2d", diffs)
            plot_s2s_minus_s2d(diffs, tmp / "s2s_minus_s2d.png")
        if published is not None:
            _write_table(tmp / "published", published_rows(accuracy, published))
    return sorted(Path(out_dir).iterdir())


# -- tables ---------------------------------------------------------------------------------------
def run_rows(runs: list[RunRecord]) -> list[dict[str, Any]]:
    """One row per run: grid columns, throughput, each metric, provenance."""
    metric_names = sorted({name for run in runs for name in run.metrics})
    rows = []
    for run in runs:
        row = {c: getattr(run, c) for c in GRID_COLUMNS}
        row["throughput_tokens_per_s"] = run.throughput_tokens_per_s
        row.update({name: run.metrics.get(name) for name in metric_names})
        row.update({c: getattr(run, c) for c in PROVENANCE_COLUMNS})
        rows.append(row)
    return rows


def is_score(name: str, value: Any) -> bool:
    """Scores are keyed `task/metric[,filter]` (`boolq/acc`); other metrics keys are metadata (`eval_limit`)."""
    return "/" in name and isinstance(value, int | float) and not isinstance(value, bool)


def accuracy_rows(runs: list[RunRecord]) -> list[dict[str, Any]]:
    """One row per (run, score), sorted by model, metric, mode, sparsity; `eval_limit` says how many
    documents per task were scored (empty: all)."""
    rows = []
    for run in runs:
        for metric, value in sorted(run.metrics.items()):
            if is_score(metric, value):
                row = {c: getattr(run, c) for c in GRID_COLUMNS}
                row.update(metric=metric, value=value, eval_limit=run.metrics.get("eval_limit"))
                row.update({c: getattr(run, c) for c in PROVENANCE_COLUMNS})
                rows.append(row)
    return sorted(
        rows, key=lambda r: (str(r["model"]), r["metric"], str(r["mode"]), r["sparsity"] or 0.0, r["run_id"])
    )


def throughput_rows(runs: list[RunRecord]) -> list[dict[str, Any]]:
    """Fine-tune runs that recorded training throughput (tokens/s over non-padding tokens)."""
    rows = []
    for run in runs:
        if run.throughput_tokens_per_s is not None:
            row = {c: getattr(run, c) for c in GRID_COLUMNS}
            row["tokens_per_s"] = run.throughput_tokens_per_s
            row.update({c: getattr(run, c) for c in PROVENANCE_COLUMNS})
            rows.append(row)
    return sorted(rows, key=lambda r: (str(r["backend"]), str(r["mode"]), r["sparsity"] or 0.0, r["run_id"]))


def s2s_minus_s2d_rows(runs: list[RunRecord]) -> list[dict[str, Any]]:
    """For runs identical except for the mode: s2s value minus s2d value, per shared metric."""
    key_columns = [c for c in GRID_COLUMNS if c != "mode"]
    by_key: dict[tuple, dict[str, RunRecord]] = defaultdict(dict)
    for run in runs:
        if run.mode in ("s2s", "s2d"):
            by_key[tuple(getattr(run, c) for c in key_columns)][run.mode] = run
    rows = []
    for key, pair in sorted(by_key.items(), key=lambda kv: str(kv[0])):
        if len(pair) < 2:
            continue
        s2s, s2d = pair["s2s"], pair["s2d"]
        for metric in sorted(set(s2s.metrics) & set(s2d.metrics)):
            a, b = s2s.metrics[metric], s2d.metrics[metric]
            if is_score(metric, a) and is_score(metric, b):
                row = dict(zip(key_columns, key, strict=False))
                row.update(metric=metric, s2s=a, s2d=b, s2s_minus_s2d=a - b)
                row.update({f"s2s_{c}": getattr(s2s, c) for c in PROVENANCE_COLUMNS})
                row.update({f"s2d_{c}": getattr(s2d, c) for c in PROVENANCE_COLUMNS})
                rows.append(row)
    return rows


def read_published(path: str | Path) -> list[dict[str, Any]]:
    """The user's published-results CSV; every row must name its citation."""
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
        try:
            row["sparsity"], row["value"] = float(row["sparsity"]), float(row["value"])
        except ValueError as exc:
            raise UserError(f"not a number ({exc})", where=f"{path}:{line_no}") from exc
    return rows


def published_rows(accuracy: list[dict[str, Any]], published: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each published number next to our matching runs (same model, task, method, sparsity, mode, metric)."""
    rows = []
    for pub in published:
        ours = [
            r
            for r in accuracy
            if (r["model"], r["method"], r["mode"], r["metric"])
            == (pub["model"], pub["method"], pub["mode"], pub["metric"])
            and abs((r["sparsity"] or 0.0) - pub["sparsity"]) < 1e-9
        ]
        for r in ours or [None]:
            rows.append(
                {
                    **{c: pub[c] for c in ("model", "task", "method", "sparsity", "mode", "metric")},
                    "published": pub["value"],
                    "citation": pub["citation"],
                    "ours": r["value"] if r else None,
                    "ours_minus_published": (r["value"] - pub["value"]) if r else None,
                    "backend": r["backend"] if r else None,
                    **{c: (r[c] if r else None) for c in PROVENANCE_COLUMNS},
                }
            )
    return rows


def _write_table(stem: Path, rows: list[dict[str, Any]]) -> None:
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
        return f"{value:.4f}"
    return str(value).replace("|", "\\|")


# -- plots ----------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mean_by(rows: Iterable[dict[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
    """Mean of `y` per value of `x` (seeds averaged), sorted by `x`."""
    groups: dict[float, list[float]] = defaultdict(list)
    for row in rows:
        groups[row[x] or 0.0].append(row[y])
    xs = sorted(groups)
    return xs, [sum(groups[v]) / len(groups[v]) for v in xs]


def plot_accuracy(accuracy: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """One PNG per (model, metric): fine-tune lines vs sparsity plus the two reference lines."""
    plt = _pyplot()
    paths = []
    by_figure: dict[tuple, list[dict]] = defaultdict(list)
    for row in accuracy:
        by_figure[(row["model"], row["metric"])].append(row)
    for (model, metric), rows in sorted(by_figure.items(), key=lambda kv: str(kv[0])):
        fig, ax = plt.subplots(figsize=(6, 4))
        lines: dict[tuple, list[dict]] = defaultdict(list)
        for row in rows:
            if row["mode"] not in REFERENCE_MODES:
                lines[(row["mode"], row["method"], row["structure"], row["backend"])].append(row)
        for label, line_rows in sorted(lines.items(), key=lambda kv: str(kv[0])):
            ax.plot(*_mean_by(line_rows, "sparsity", "value"), marker="o", label=" ".join(map(str, label)))
        pruned = [r for r in rows if r["mode"] == "none"]
        if pruned:
            ax.plot(*_mean_by(pruned, "sparsity", "value"), "k--", marker="x", label="no fine-tune (pruned)")
        dense_lora = [r["value"] for r in rows if r["mode"] == "lora"]
        if dense_lora:
            ax.axhline(
                sum(dense_lora) / len(dense_lora), color="gray", linestyle=":", label="dense LoRA baseline"
            )
        ax.set(xlabel="sparsity", ylabel=metric, title=f"{model}: {metric}")
        ax.legend(fontsize=7)
        path = out_dir / f"accuracy_{_slug(model)}_{_slug(metric)}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_throughput(rows: list[dict[str, Any]], path: Path) -> None:
    """Training tokens/s vs sparsity, a line per (backend, mode, model)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    lines: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        lines[(row["backend"], row["mode"], row["model"])].append(row)
    for label, line_rows in sorted(lines.items(), key=lambda kv: str(kv[0])):
        ax.plot(*_mean_by(line_rows, "sparsity", "tokens_per_s"), marker="o", label=" ".join(map(str, label)))
    ax.set(xlabel="sparsity", ylabel="training tokens/s (non-padding)", title="training throughput")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_s2s_minus_s2d(rows: list[dict[str, Any]], path: Path) -> None:
    """s2s minus s2d vs sparsity, a line per (model, metric, method, backend)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    lines: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        lines[(row["model"], row["metric"], row["method"], row["backend"])].append(row)
    for label, line_rows in sorted(lines.items(), key=lambda kv: str(kv[0])):
        ax.plot(
            *_mean_by(line_rows, "sparsity", "s2s_minus_s2d"), marker="o", label=" ".join(map(str, label))
        )
    ax.axhline(0.0, color="gray", linewidth=0.8)
    ax.set(xlabel="sparsity", ylabel="s2s - s2d", title="sparse-to-sparse minus sparse-to-dense")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _slug(text: Any) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_")
