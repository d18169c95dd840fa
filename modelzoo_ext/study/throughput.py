"""Training throughput of a run, in non-padding tokens per second, the same way for every backend.

    gpu/cpu  gpu_reference writes `tokens_per_s` per step in `metrics.jsonl`
    cs3      `cszoo fit` with the `SparseLoRALossLog` callback writes each step's host time
             (`time_s`) in `sparse_lora_losses.jsonl`; the tokens of each step come from the
             data order ModelZoo uses (`gpu_reference.data.global_batches`), counted with the
             same `non_padding_tokens` as gpu_reference

The run's value is the mean over steps of tokens/s, leaving out the first step (it includes
compilation or warm-up) when there are more.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from modelzoo_ext.loss_log import loss_log_path, read_loss_log


def _mean_after_first(values: list[float]) -> float | None:
    values = values[1:] if len(values) > 1 else values
    return sum(values) / len(values) if values else None


def mean_throughput(metrics_path: Path) -> float | None:
    """Mean non-padding tokens/s over the training steps of a gpu_reference `metrics.jsonl`."""
    if not metrics_path.is_file():
        return None
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    return _mean_after_first(
        [r["tokens_per_s"] for r in rows if r.get("split") != "eval" and "tokens_per_s" in r]
    )


def cs_step_times(loss_log: Path) -> dict[int, float]:
    """step -> host seconds of that step, from a CS run's loss log (`modelzoo_ext.loss_log`)."""
    return {step: row.time_s for step, row in read_loss_log(loss_log).items() if row.time_s}


def cs_throughput(model_dir: Path, params: dict[str, Any]) -> float | None:
    """Mean non-padding tokens/s of a `cszoo fit` run directory whose run config is `params`.

    None when the run has no step times (a run config without `SparseLoRALossLog`).
    """
    from gpu_reference.data import collate, global_batches
    from gpu_reference.metrics import non_padding_tokens
    from modelzoo_ext.data.hdf5 import SampleDataset
    from modelzoo_ext.run_config.params import DataLoaderSection

    times = cs_step_times(loss_log_path(model_dir))
    if not times:
        return None
    loader = DataLoaderSection(**params["trainer"]["fit"]["train_dataloader"])  # ModelZoo's defaults
    dataset = SampleDataset(loader.data_dir)
    batches = global_batches(
        len(dataset), loader.batch_size, loader.shuffle, loader.shuffle_seed, loader.drop_last
    )
    rates = []
    for step in range(1, max(times) + 1):
        batch = next(batches)
        if step in times:
            rates.append(non_padding_tokens(collate(dataset, batch)["attention_mask"]) / times[step])
    dataset.close()
    return _mean_after_first(rates)
