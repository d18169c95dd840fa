"""Training throughput of a run: total non-padding tokens / total training time, the same count on
every backend, with each backend's padding policy recorded next to the figure.

    gpu/cpu  gpu_reference's `metrics.jsonl`: per step the non-padding tokens (each sample up to
             its last loss token), samples and wall time. The reference trainer computes only
             there: it trims each batch after its last loss position and runs the LM head at loss
             positions only.
    cs3      `cszoo fit` with `SparseLoRALossLog`: per step the host time since the previous
             step's loss (`modelzoo_ext.loss_log`; step 1 includes compilation, and checkpoint
             saves fall inside steps). The tokens of each step come from the data order ModelZoo
             uses (`gpu_reference.data.global_batches`), counted like gpu_reference's. The wafer
             processes every sequence padded to max_seq_length: `padded_tokens` says how many.

The two figures count the same tokens but not the same work: compare a backend with itself (or
read both columns with their padding policy), never the ratio of the two as a hardware speed-up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from modelzoo_ext.loss_log import loss_log_path, read_loss_log
from modelzoo_ext.run_config.trainer_yaml import train_dataloader

PADDING_POLICY = {
    "gpu": "trimmed after each batch's last loss position; LM head at loss positions only",
    "cpu": "trimmed after each batch's last loss position; LM head at loss positions only",
    "cs3": "every sequence padded to max_seq_length; host time includes compilation (step 1) and checkpoint saves",
}


def _summary(
    tokens: int, samples: int, seconds: float, steps: int, backend: str, **extra: Any
) -> dict[str, Any]:
    return {
        "tokens_per_s": tokens / seconds if seconds > 0 else None,
        "samples_per_s": samples / seconds if seconds > 0 else None,
        "tokens": tokens,
        "samples": samples,
        "seconds": seconds,
        "steps": steps,
        "counted": "non-padding tokens (each sample up to its last loss token)",
        "padding_policy": PADDING_POLICY[backend],
        **extra,
    }


def _count(row: dict[str, Any], what: str) -> int:
    """A step's `tokens` / `samples`; from its rate and time for metrics files older than these counts."""
    return int(row[what]) if what in row else round(row[f"{what}_per_s"] * row["time_s"])


def reference_throughput(metrics_path: Path, backend: str) -> dict[str, Any] | None:
    """Totals over the training steps of a gpu_reference `metrics.jsonl` (None when it is absent)."""
    from gpu_reference.metrics import read_metrics

    steps = [r for r in read_metrics(metrics_path) if r.get("split", "train") == "train" and "time_s" in r]
    if not steps:
        return None
    tokens = sum(_count(r, "tokens") for r in steps)
    samples = sum(_count(r, "samples") for r in steps)
    return _summary(tokens, samples, sum(r["time_s"] for r in steps), len(steps), backend)


def cs_step_times(loss_log: Path) -> dict[int, float]:
    """step -> host seconds of that step, from a CS run's loss log (`modelzoo_ext.loss_log`)."""
    return {step: row.time_s for step, row in read_loss_log(loss_log).items() if row.time_s}


def cs_throughput(model_dir: Path, params: dict[str, Any]) -> dict[str, Any] | None:
    """Totals of a `cszoo fit` run directory whose run config is `params` (None without step times)."""
    from gpu_reference.data import collate, global_batches
    from gpu_reference.metrics import non_padding_tokens
    from modelzoo_ext.data.hdf5 import SampleDataset
    from modelzoo_ext.run_config.params import DataLoaderSection

    times = cs_step_times(loss_log_path(model_dir))
    if not times:
        return None
    loader = DataLoaderSection(**train_dataloader(params))  # ModelZoo's defaults
    dataset = SampleDataset(loader.data_dir)
    batches = global_batches(
        len(dataset), loader.batch_size, loader.shuffle, loader.shuffle_seed, loader.drop_last
    )
    tokens = samples = padded = 0
    for step in range(1, max(times) + 1):
        batch = collate(dataset, next(batches))
        if step in times:
            tokens += non_padding_tokens(batch["attention_mask"])
            samples += batch["input_ids"].shape[0]
            padded += batch["input_ids"].numel()
    dataset.close()
    return _summary(tokens, samples, sum(times.values()), len(times), "cs3", padded_tokens=padded)
