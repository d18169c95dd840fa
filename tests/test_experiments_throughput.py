"""Throughput read back from run directories (gpu_reference metrics, CS loss logs): total
non-padding tokens / total training time, with each backend's padding policy."""

from __future__ import annotations

import json

import numpy as np
import pytest

from modelzoo_ext.data.hdf5 import write_samples
from modelzoo_ext.study.throughput import PADDING_POLICY, cs_step_times, cs_throughput, reference_throughput


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_reference_throughput_is_total_tokens_over_total_time(tmp_path):
    rows = [
        {"step": 1, "loss": 3.0, "tokens": 100, "samples": 4, "time_s": 10.0, "tokens_per_s": 10.0},
        {"step": 2, "loss": 2.0, "tokens": 300, "samples": 4, "time_s": 3.0, "tokens_per_s": 100.0},
        {"step": 2, "split": "eval", "loss": 2.5},
        {"step": 3, "loss": 1.0, "tokens": 200, "samples": 4, "time_s": 2.0, "tokens_per_s": 100.0},
    ]
    t = reference_throughput(_write_jsonl(tmp_path / "metrics.jsonl", rows), "gpu")
    assert t["tokens_per_s"] == 600 / 15.0 and t["samples_per_s"] == 12 / 15.0  # not a mean of rates
    assert (t["tokens"], t["samples"], t["steps"]) == (600, 12, 3)
    assert t["padding_policy"] == PADDING_POLICY["gpu"] != PADDING_POLICY["cs3"]
    assert reference_throughput(tmp_path / "missing.jsonl", "gpu") is None


def test_cs_step_times_keep_the_last_row_of_a_resumed_step(tmp_path):
    log = _write_jsonl(
        tmp_path / "log.jsonl",
        [
            {"step": 1, "loss": 3.0, "time_s": 50.0},
            {"step": 2, "loss": 2.0, "time_s": 9.0},
            {"step": 2, "loss": 2.0, "time_s": 40.0},  # the rerun after a restart
            {"step": 3, "loss": 1.0},  # a log written before step times existed
        ],
    )
    assert cs_step_times(log) == {1: 50.0, 2: 40.0}


def test_cs_throughput_follows_the_shuffled_data_order(tmp_path):
    """Samples of known lengths, shuffled batches: tokens of the batches ModelZoo yields / step time."""
    import torch

    msl, lengths = 16, [3, 5, 7, 9, 11, 13]
    samples = np.zeros((len(lengths), 3, msl), dtype=np.int32)
    for i, n in enumerate(lengths):
        samples[i, 1, n - 1] = 1  # one loss token at position n-1: n non-padding tokens
    (tmp_path / "data").mkdir()
    write_samples(tmp_path / "data" / "part.h5", samples)
    run = tmp_path / "run"
    run.mkdir()
    _write_jsonl(
        run / "sparse_lora_losses.jsonl", [{"step": s, "loss": 1.0, "time_s": 2.0 * s} for s in (1, 2, 3)]
    )
    params = {"trainer": {"fit": {"train_dataloader": {
        "data_processor": "GptHDF5MapDataProcessor", "data_dir": str(tmp_path / "data"),
        "batch_size": 2, "shuffle": True, "shuffle_seed": 7}}}}  # fmt: skip
    order = torch.randperm(6, generator=torch.Generator().manual_seed(7)).tolist()  # epoch 0
    step_tokens = [lengths[order[2 * k]] + lengths[order[2 * k + 1]] for k in range(3)]
    t = cs_throughput(run, params)
    assert t["tokens"] == sum(step_tokens) and t["seconds"] == 12.0 and t["samples"] == 6
    assert t["tokens_per_s"] == pytest.approx(sum(step_tokens) / 12.0)
    assert t["padded_tokens"] == 6 * msl and t["padding_policy"] == PADDING_POLICY["cs3"]
    assert cs_throughput(tmp_path / "data", params) is None  # no loss log: no number, not a guess
