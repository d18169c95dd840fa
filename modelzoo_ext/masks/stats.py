"""Per-level statistics next to each mask file: `<stem>.stats.json` and a `<stem>.png` figure.

The figure has per-tensor sparsity bars and a histogram of weight magnitudes with the magnitude
threshold(s). The histogram is cheap: |W| of a 1-in-16 sample of each weight is counted in bf16
bit space (32,768 bins; the magnitude keys are reused where scoring made them), then drawn on
log-spaced bins. The exact counts are the stats'. `LevelReport.write` writes where it is told
(`masks compute` renames every level's files together); `report_paths` names the final files.
"""

from __future__ import annotations

import json
import re
import statistics as pystats
import threading
from pathlib import Path
from typing import Any

import numpy as np

from modelzoo_ext.masks.scores import Weight
from modelzoo_ext.masks.select import HIGH_BINS, high_histogram


def bf16_magnitude_bits(values: np.ndarray) -> np.ndarray:
    """|x| of float32 values as bf16 bit patterns (int16), rounded to nearest even like torch."""
    bits = np.abs(values.astype(np.float32)).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.int16)


class MagnitudeHistogram:
    """Histogram of |W| in bf16 bit space (int64 [32768]) over a 1-in-`stride` sample of each weight.

    For the figure only (exact counts live in the stats); sampling keeps it off the hot path.
    `add` may be called from several threads at once.
    """

    def __init__(self, enabled: bool = True, stride: int = 16) -> None:
        self.enabled = enabled
        self.stride = stride
        self.counts = np.zeros(HIGH_BINS, dtype=np.int64)
        self._lock = threading.Lock()

    def add(self, weight: Weight, magnitude_keys: np.ndarray | None = None) -> None:
        """Count one weight (reuses its magnitude keys when they are bf16 or fp32 keys)."""
        if not self.enabled:
            return
        if magnitude_keys is not None and weight.dtype in ("bfloat16", "float32"):
            sample = magnitude_keys.reshape(-1)[:: self.stride]  # fp32 keys >> 16: bf16 bits (truncated)
        elif weight.dtype == "bfloat16":
            sample = weight.array.reshape(-1)[:: self.stride] & np.int16(0x7FFF)
        else:
            sample = bf16_magnitude_bits(weight.array.reshape(-1)[:: self.stride])
        counts = high_histogram(np.ascontiguousarray(sample)) * self.stride
        with self._lock:
            self.counts += counts

    def values_and_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """(|w| value of each non-empty bin, its count)."""
        keys = np.flatnonzero(self.counts)
        values = (keys.astype(np.uint32) << 16).view(np.float32)
        return values, self.counts[keys]


def key_to_value(key: int, dtype: str) -> float:
    """A magnitude key back to |w| in the weight's dtype ("bfloat16", "float16", "float32", ...)."""
    if dtype == "bfloat16":
        return float(np.array([key << 16], dtype=np.uint32).view(np.float32)[0])
    if dtype == "float16":
        return float(np.array([key], dtype=np.uint16).view(np.float16)[0])
    return float(np.array([key], dtype=np.uint32).view(np.float32)[0])


def _short(name: str) -> str:
    """`model.layers.3.self_attn.q_proj.weight` -> `3.q_proj` (figure labels)."""
    match = re.search(r"layers\.(\d+)\.(.*)\.weight$", name)
    if not match:
        return name.removesuffix(".weight")
    return f"{match.group(1)}.{match.group(2).split('.')[-1]}"


def report_paths(mask_path: Path) -> tuple[Path, Path]:
    """(`<stem>.stats.json`, `<stem>.png`) beside a mask file."""
    return mask_path.with_name(mask_path.stem + ".stats.json"), mask_path.with_name(mask_path.stem + ".png")


class LevelReport:
    """Stats of one written mask file, rendered as JSON (and a PNG).

    `path` is the mask file's final name (what the stats record), `file_bytes` its size.
    """

    def __init__(
        self,
        path: Path,
        file_bytes: int,
        metadata: dict[str, Any],
        thresholds: dict[str, int | None],
        dtypes: dict[str, str],
        histogram: MagnitudeHistogram,
    ) -> None:
        self.path = Path(path)
        self.file_bytes = file_bytes
        self.metadata = metadata
        self.thresholds = thresholds
        self.dtypes = dtypes
        self.histogram = histogram

    def _threshold_values(self) -> dict[str, float]:
        if self.metadata["method"] != "magnitude":
            return {}
        return {n: key_to_value(k, self.dtypes[n]) for n, k in self.thresholds.items() if k is not None}

    def as_dict(self, seconds: float) -> dict[str, Any]:
        """JSON-able stats: requested/achieved sparsity, counts, per-tensor sparsity and thresholds."""
        meta = self.metadata
        values = self._threshold_values()
        tensors = {
            name: {
                "shape": info["shape"],
                "kept": info["kept"],
                "sparsity": info["sparsity"],
                "magnitude_threshold": values.get(name),
            }
            for name, info in sorted(meta["tensors"].items())
        }
        numel = sum(info["numel"] for info in meta["tensors"].values())
        return {
            "mask_file": str(self.path),
            "file_bytes": self.file_bytes,
            "method": meta["method"],
            "structure": meta["structure"],
            "scope": meta["scope"],
            "requested_sparsity": meta["requested_sparsity"],
            "achieved_sparsity": meta["achieved_sparsity"],
            "numel": numel,
            "kept": sum(info["kept"] for info in meta["tensors"].values()),
            "tensors": tensors,
            "seconds_since_start": round(seconds, 3),
        }

    def write(self, stats_file: Path, figure_file: Path | None, *, seconds: float) -> dict[str, Any]:
        """Write the stats as JSON to `stats_file` (and the figure as PNG to `figure_file`, when
        given): temporary paths the caller renames (`report_paths` names the final ones). Returns the stats."""
        stats = self.as_dict(seconds)
        stats_file.write_text(json.dumps(stats, indent=2))
        if figure_file is not None:
            self._plot(stats, figure_file)
        return stats

    def _plot(self, stats: dict[str, Any], figure_file: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = list(stats["tensors"])
        fig, (bars, hist) = plt.subplots(2, 1, figsize=(max(8, 0.18 * len(names)), 8))
        bars.bar(range(len(names)), [stats["tensors"][n]["sparsity"] for n in names], color="tab:blue")
        bars.axhline(stats["requested_sparsity"], color="tab:red", linestyle="--", label="requested")
        bars.set_xticks(range(len(names)), [_short(n) for n in names], rotation=90, fontsize=6)
        bars.set_ylabel("sparsity")
        bars.set_ylim(0, 1)
        bars.set_title(
            f"{stats['method']} {stats['structure']} {stats['scope']}: achieved {stats['achieved_sparsity']:.4f}"
        )
        bars.legend(loc="lower right")

        values, counts = self.histogram.values_and_counts()
        positive = values > 0
        if positive.any():
            low, high = values[positive].min(), values[positive].max()
            edges = np.logspace(np.log10(low), np.log10(high) + 1e-6, 120)
            hist.hist(values[positive], bins=edges, weights=counts[positive], color="tab:gray")
            hist.set_xscale("log")
        thresholds = [v for v in self._threshold_values().values() if v > 0]
        if thresholds and stats["scope"] == "global":
            hist.axvline(thresholds[0], color="tab:red", label=f"global threshold {thresholds[0]:.3g}")
        elif thresholds:
            hist.axvline(pystats.median(thresholds), color="tab:red", label="median per-tensor threshold")
            hist.axvspan(
                min(thresholds), max(thresholds), color="tab:red", alpha=0.15, label="threshold range"
            )
        hist.set_xlabel(f"|w| (targeted weights, 1 in {self.histogram.stride} sampled)")
        hist.set_ylabel("count")
        if thresholds:
            hist.legend()
        fig.tight_layout()
        try:
            fig.savefig(figure_file, format="png", dpi=90)
        finally:
            plt.close(fig)
