"""Held-out loss: the fine-tuning objective measured on examples no run trained on.

    heldout = sum over held-out examples of the completion tokens' NLL / number of those tokens

on a directory prepared by `data prepare --split heldout` (the same tokenisation, prompts and
loss mask as the training data, so both backends' models are scored on identical inputs), for an
HF model directory, optionally with a PEFT adapter (s2d exports). The loss is the reference
trainer's (`gpu_reference.loss`), kept per example so that two models can be compared pairwise on
the same examples: far more sensitive than accuracy on a few hundred yes/no questions, and it is
what fine-tuning lowers.

The result holds the loss per token with a bootstrap 95% interval over examples, the per-example
sums (with each example's key digest, to pair runs), and where the data came from.

During training (sweep option `eval.heldout_every`) the reference trainer validates on the same
held-out examples and logs the same quantity (`nll_per_token` of its `metrics.jsonl` eval rows);
`heldout_curve` reads those rows back: the curve of held-out loss against steps, which the
registry keeps under `CURVE_KEY` and the report plots.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from modelzoo_ext.data.hdf5 import read_params
from modelzoo_ext.data.prepare import read_example_keys
from modelzoo_ext.errors import UserError
from modelzoo_ext.study.stats import ratio

CURVE_KEY = "heldout_curve"  # registry metrics key: a list, never taken for a score (no "/")
CURVE_FIELDS = ("step", "nll_per_token", "loss", "loss_tokens", "samples")


def heldout_curve(metrics_path: str | Path) -> list[dict[str, Any]]:
    """The evaluations a reference run logged during training, in step order ([] when none).

    Each: step, nll_per_token (the held-out loss's quantity), loss (ModelZoo's mean of batch
    losses), loss_tokens and samples scored.
    """
    from gpu_reference.metrics import read_metrics

    rows = [row for row in read_metrics(metrics_path) if row.get("split") == "eval"]
    return [{k: row.get(k) for k in CURVE_FIELDS} for row in sorted(rows, key=lambda r: r["step"])]


def _load_model(model_dir: str | Path, adapter_dir: str | Path | None, device: str):
    import torch

    from gpu_reference.model import load_hf_model

    model = load_hf_model(model_dir)
    if adapter_dir:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    return model.to(torch.device(device)).eval()


def heldout_loss(
    model_dir: str | Path,
    data_dir: str | Path,
    *,
    adapter_dir: str | Path | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    limit: int | None = None,
) -> dict[str, Any]:
    """Per-example completion NLL of the model on `data_dir` (see the module doc); JSON-ready."""
    import torch

    from gpu_reference.data import collate
    from gpu_reference.loss import per_example_loss_sums
    from modelzoo_ext.data.hdf5 import SampleDataset

    dataset = SampleDataset(data_dir)
    keys = read_example_keys(data_dir)
    count = min(len(dataset), limit) if limit else len(dataset)
    if count == 0:
        raise UserError("the held-out data is empty", where=str(data_dir))
    model = _load_model(model_dir, adapter_dir, device)
    started = time.time()
    sums, tokens = [], []
    for start in range(0, count, batch_size):
        batch = collate(dataset, list(range(start, min(start + batch_size, count))))
        with torch.inference_mode():
            loss_sum, loss_tokens = per_example_loss_sums(model, batch, False, torch.device(device))
        sums += loss_sum.cpu().tolist()
        tokens += loss_tokens.cpu().tolist()
    estimate = ratio(np.array(sums), np.array(tokens))
    params = read_params(data_dir)
    return {
        "nll_per_token": estimate.as_record(),
        "examples": [
            {"key": k, "nll_sum": s, "tokens": t} for k, s, t in zip(keys[:count], sums, tokens, strict=True)
        ],
        "data_dir": str(Path(data_dir).resolve()),
        "data_sha256": params.get("data_sha256"),
        "protocol": params.get("protocol"),
        "split": params.get("split"),
        "task": params.get("task"),
        "seconds": round(time.time() - started, 2),
    }


def write(result: dict[str, Any], path: str | Path) -> Path:
    from modelzoo_ext.atomic import atomic_file

    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(result) + "\n")
    return Path(path)
