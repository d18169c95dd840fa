"""The per-step metrics file of a run: `metrics.jsonl`, one JSON object per optimizer step.

    {"step": 1, "loss": 10.37, "lr": 1e-4, "grad_norm": 0.8, "loss_tokens": 52, "tokens": 49,
     "samples": 4, "tokens_per_s": 812.0, "samples_per_s": 25.1, "peak_memory_bytes": 123456789,
     "time_s": 0.06}

`step` counts optimizer steps from 1 (as ModelZoo's global step after the update); `loss` is
the training loss of that step (ModelZoo's `loss_scaling`, averaged over the global batch);
`tokens` counts the step's non-padding tokens (each sample up to its last loss token), `samples`
its samples, over all ranks; `time_s` is the step's wall time. Evaluation
rows (`fit.val_dataloader` every `loop.eval_frequency` steps) carry `"split": "eval"`:

    {"step": 25, "split": "eval", "loss": 0.71, "nll_per_token": 0.69, "loss_tokens": 512, "samples": 256}

`loss` is ModelZoo's evaluation loss (the mean of the batches' losses); `nll_per_token` the
summed NLL over summed loss tokens of all `samples` validated (`gpu_reference.loss.Validation`).
On resume, rows after the checkpointed step are dropped first, so the file never holds a step twice.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from modelzoo_ext.data.rows import read_jsonl

METRICS_FILE = "metrics.jsonl"


def non_padding_tokens(loss_mask: torch.Tensor) -> int:
    """Sum over samples of (position of the last loss token + 1); loss_mask int [B, msl]."""
    positions = torch.arange(1, loss_mask.shape[1] + 1, device=loss_mask.device)
    return int((loss_mask.ne(0) * positions).amax(dim=1).sum())


def peak_memory_bytes(device: torch.device) -> int:
    """Peak accelerator memory allocated by torch, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


class MetricsWriter:
    """Appends rows to `RUN_DIR/metrics.jsonl` (flushed per row, so a killed run keeps its steps)."""

    def __init__(self, run_dir: str | Path, resume_step: int = 0, enabled: bool = True) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled = enabled
        if not enabled:
            return
        kept = [row for row in read_metrics(self.path) if row["step"] <= resume_step] if resume_step else []
        self.path.write_text("".join(json.dumps(row) + "\n" for row in kept))

    def write(self, row: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a metrics file ([] when it does not exist)."""
    path = Path(path)
    return list(read_jsonl(path)) if path.exists() else []
