"""The report's figures, drawn from the rows of its tables (`report.score_rows`, `curve_rows`,
`throughput_rows`): nothing here reads the registry.

    plot_scores(rows, "offline", out_dir)     # <metric>_<protocol>_<model>.png
    plot_curves(rows, "offline", out_dir)     # heldout_curve_<protocol>_<model>_<task>.png
    plot_throughput(rows, out_dir / "throughput.png")
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

MODE_NAMES = {
    "s2s": "sparse-to-sparse",
    "s2d": "sparse-to-dense",
    "lora": "dense LoRA",
    "none": "no fine-tune",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _errorbar(ax, rows: list[dict[str, Any]], **style) -> None:
    rows = sorted(rows, key=lambda r: r["sparsity"] or 0.0)
    x = [r["sparsity"] or 0.0 for r in rows]
    y = np.array([r["mean"] for r in rows])
    low = np.array([r["ci95_low"] for r in rows])
    high = np.array([r["ci95_high"] for r in rows])
    # A percentile bootstrap interval need not contain its estimate: draw no bar on that side.
    yerr = np.clip(np.nan_to_num(np.vstack([y - low, high - y]), nan=0.0), 0.0, None)
    ax.errorbar(x, y, yerr=yerr, capsize=3, marker="o", markersize=3, **style)


def plot_scores(scores: list[dict[str, Any]], protocol: str, out_dir: Path) -> list[Path]:
    """One PNG per (model, metric): fine-tune lines with error bars, no-fine-tune per method, dense LoRA per backend."""
    plt = _pyplot()
    paths = []
    figures: dict[tuple, list[dict]] = defaultdict(list)
    for row in scores:
        figures[(row["model"], row["metric"])].append(row)
    for (model, metric), rows in sorted(figures.items(), key=lambda kv: str(kv[0])):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        lines: dict[tuple, list[dict]] = defaultdict(list)
        for row in rows:
            if row["mode"] in ("s2s", "s2d"):
                lines[(row["mode"], row["method"], row["structure"], row["backend"])].append(row)
        for label, line_rows in sorted(lines.items(), key=lambda kv: str(kv[0])):
            _errorbar(ax, line_rows, label=" ".join(map(str, label)))
        dense_model = [r for r in rows if r["mode"] == "none" and r["method"] == "dense"]
        for method, structure in sorted(
            {(r["method"], r["structure"]) for r in rows if r["mode"] == "none"} - {("dense", "dense")}
        ):
            pruned = [
                r
                for r in rows
                if r["mode"] == "none" and (r["method"], r["structure"]) == (method, structure)
            ]
            _errorbar(ax, dense_model + pruned, linestyle="--", label=f"no fine-tune ({method}, {structure})")
        for row in (r for r in rows if r["mode"] == "lora"):
            ax.axhline(row["mean"], color="gray", linestyle=":", label=f"dense LoRA ({row['backend']})")
            if not math.isnan(row["ci95_low"]):
                ax.axhspan(row["ci95_low"], row["ci95_high"], color="gray", alpha=0.12)
        ax.set(
            xlabel="sparsity", ylabel=f"{metric} (95% CI)", title=f"{model}: {metric} [{protocol} protocol]"
        )
        ax.legend(fontsize=6)
        path = out_dir / f"{slug(metric)}_{protocol}_{slug(model)}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


CURVE_COLOURS = {"s2d": "C0", "s2s": "C1", "lora": "gray"}  # as the held-out-loss-against-sparsity figure


def plot_curves(rows: list[dict[str, Any]], protocol: str, out_dir: Path) -> list[Path]:
    """One PNG per (model, task): held-out loss against step, a panel per sparsity, a line per mode
    (method, structure, backend) with its interval over seeds as a band; log scale (step 0 is the
    unfine-tuned model, far above the rest)."""
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    paths = []
    figures: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        figures[(row["model"], row["task"])].append(row)
    for (model, task), mine in sorted(figures.items(), key=lambda kv: str(kv[0])):
        levels = sorted({r["sparsity"] or 0.0 for r in mine})
        # A log axis cannot show an interval reaching zero or below (a t interval over two seeds
        # often does): such a band is drawn down to the axis' floor, a third of the smallest mean.
        floor = min(r["mean"] for r in mine if r["mean"] > 0) / 3
        fig, axes = plt.subplots(1, len(levels), figsize=(3.6 * len(levels), 3.8), sharey=True, squeeze=False)
        for ax, level in zip(axes[0], levels, strict=True):
            lines: dict[tuple, list[dict]] = defaultdict(list)
            for row in (r for r in mine if (r["sparsity"] or 0.0) == level):
                lines[(row["mode"], row["method"], row["structure"], row["backend"])].append(row)
            for (mode, method, structure, backend), line in sorted(lines.items(), key=lambda kv: str(kv[0])):
                line.sort(key=lambda r: r["step"])
                x = [r["step"] for r in line]
                colour = CURVE_COLOURS.get(mode)
                label = MODE_NAMES.get(mode, mode) + (
                    "" if method == "dense" else f" ({method}, {structure})"
                )
                ax.plot(x, [r["mean"] for r in line], marker="o", markersize=3, color=colour,
                        label=f"{label} [{backend}]")  # fmt: skip
                ax.fill_between(x, [max(r["ci95_low"], floor) for r in line], [r["ci95_high"] for r in line],
                                color=colour, alpha=0.2, linewidth=0)  # fmt: skip
            ax.set(xlabel="training step", yscale="log",
                   title="dense model" if level == 0 else f"sparsity {level:.0%}")  # fmt: skip
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.legend(fontsize=6)
        axis = axes[0][0].yaxis  # shared: plain numbers at 1, 1.5, 2, 3, 5, 7 x 10^k on the log scale
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
        axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axis.set_minor_formatter(NullFormatter())
        axes[0][0].set_ylim(bottom=floor)
        axes[0][0].set_ylabel("held-out NLL per completion token (log scale)")
        fig.suptitle(f"{model}, {task}: held-out loss during training [{protocol} protocol]\nstep 0 = before "
                     "fine-tuning (the no-fine-tune run); band = 95% interval over seeds (cut at the axis' floor where it "
                     "reaches zero)", fontsize=8)  # fmt: skip
        path = out_dir / f"heldout_curve_{protocol}_{slug(model)}_{slug(task)}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_throughput(rows: list[dict[str, Any]], path: Path) -> None:
    """Training tokens/s per run vs sparsity, one panel per backend (their padding policies differ)."""
    plt = _pyplot()
    backends = sorted({r["backend"] for r in rows})
    fig, axes = plt.subplots(1, len(backends), figsize=(5 * len(backends), 4), squeeze=False)
    for ax, backend in zip(axes[0], backends, strict=True):
        mine = [r for r in rows if r["backend"] == backend]
        for mode in sorted({r["mode"] for r in mine}):
            pts = [r for r in mine if r["mode"] == mode]
            ax.scatter([r["sparsity"] for r in pts], [r["tokens_per_s"] for r in pts], label=mode, s=14)
        ax.set(xlabel="sparsity", ylabel="non-padding tokens/s (whole run)", title=backend)
        ax.text(
            0.01, 0.01, mine[0]["padding_policy"], transform=ax.transAxes, fontsize=6, va="bottom", wrap=True
        )
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def slug(text: Any) -> str:
    """`text` as a file-name part (letters, digits, `._-`)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_")
