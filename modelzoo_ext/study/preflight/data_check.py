"""Check 3: the prepared data against the model and the run's length.

    data_checks(subject, cfg)  ->  [Check, ...]

- vocabulary: every token id of the inputs and labels is in [0, vocab_size) of the model (a
  dataset tokenised for another model's vocabulary indexes past the embedding, or silently
  trains on other words); the whole data is read, in chunks;
- tokenizer: where `data_params.json` records it, the digest of the tokenizer's vocabulary files
  (`tokenizer_sha256`, written by `data prepare`; for older data, the recorded directory's files)
  equals the model directory's;
- sequence length: the samples' length fits the model's `max_position_embeddings`;
- examples: `max_steps x batch_size x grad_accum_steps` samples exist (times the epochs the sweep
  asked for), so the run does not repeat its data without being asked to.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from modelzoo_ext.data.hdf5 import DATASET, SampleDataset, read_params
from modelzoo_ext.data.prepare import tokenizer_digest
from modelzoo_ext.errors import UserError
from modelzoo_ext.run_config import RunConfig
from modelzoo_ext.study.preflight.report import FAIL, PASS, SKIP, Check
from modelzoo_ext.study.preflight.subject import Subject

CHUNK = 256  # samples read at a time


def token_range(dataset: SampleDataset) -> tuple[int, int]:
    """(smallest, largest) token id over the inputs and labels of every sample."""
    import h5py

    low, high = np.iinfo(np.int64).max, np.iinfo(np.int64).min
    for path in dataset.files:
        with h5py.File(path, "r") as f:
            data = f[DATASET]
            for start in range(0, data.shape[0], CHUNK):
                ids = data[start : start + CHUNK][:, [0, 2], :]
                low, high = min(low, int(ids.min())), max(high, int(ids.max()))
    return low, high


def data_checks(subject: Subject, cfg: RunConfig | None, *, prepared_later: bool = False) -> list[Check]:
    """The checks of the module docstring. `prepared_later`: the data is built before the run
    (a sweep's asset), so a missing directory is skipped, not failed."""
    data_dir = subject.data_dir
    if data_dir is None or not Path(data_dir).is_dir():
        status, why = (SKIP, "not prepared yet (the sweep prepares it before the run)") if prepared_later else (
            FAIL, "does not exist: the run has no training data (`sparse-lora data prepare`)")  # fmt: skip
        return [Check("data", status, f"{data_dir}: {why}")]
    try:
        dataset = SampleDataset(data_dir)
    except UserError as exc:
        return [Check("data", FAIL, str(exc))]
    hf_config, source = subject.hf_config()
    vocab = int(hf_config["vocab_size"])
    checks = [_vocabulary(dataset, vocab, source), _tokenizer(subject, data_dir)]
    if cfg is not None:
        checks += [_sequence_length(dataset, cfg), _examples(dataset, cfg, subject.allowed_epochs)]
    dataset.close()
    return checks


def _vocabulary(dataset: SampleDataset, vocab: int, source: str) -> Check:
    low, high = token_range(dataset)
    if low < 0 or high >= vocab:
        return Check("data: vocabulary", FAIL, f"token ids {low}..{high} but the model's vocab_size is {vocab} "
                     f"({source}): the data was tokenised for another vocabulary; prepare it with this model's "
                     "tokenizer (`sparse-lora data prepare --tokenizer <hf dir>`)")  # fmt: skip
    return Check(
        "data: vocabulary",
        PASS,
        f"token ids {low}..{high} < vocab_size {vocab} ({len(dataset)} samples read)",
    )


def _tokenizer(subject: Subject, data_dir: str) -> Check:
    name = "data: tokenizer"
    recorded = read_params(data_dir)
    if not recorded.get("tokenizer"):
        return Check(name, SKIP, "data_params.json records no tokenizer (data not made by `data prepare`)")
    theirs = recorded.get("tokenizer_sha256")
    if theirs is None and Path(recorded["tokenizer"]).is_dir():
        theirs = tokenizer_digest(recorded["tokenizer"])
    ours = tokenizer_digest(subject.hf_dir) if subject.hf_dir is not None else None
    if theirs is None:
        return Check(
            name, SKIP, f"the data records tokenizer {recorded['tokenizer']}, which is not here to compare"
        )
    if ours is None:
        return Check(
            name, SKIP, f"no tokenizer files in the HF model directory ({subject.hf_dir}) to compare"
        )
    if theirs != ours:
        return Check(name, FAIL, f"the data was tokenised with {recorded['tokenizer']}, whose vocabulary files differ "
                     f"from {subject.hf_dir}'s: prepare the data with this model's tokenizer")  # fmt: skip
    return Check(
        name, PASS, f"the data's tokenizer ({recorded['tokenizer']}) has the model's vocabulary files"
    )


def _sequence_length(dataset: SampleDataset, cfg: RunConfig) -> Check:
    limit = int(cfg.model_section.values["max_position_embeddings"])
    if dataset.max_seq_length > limit:
        return Check("data: sequence length", FAIL, f"samples of {dataset.max_seq_length} tokens exceed the model's "
                     f"max_position_embeddings {limit}: prepare with --max-seq-length {limit} or less")  # fmt: skip
    return Check(
        "data: sequence length", PASS, f"{dataset.max_seq_length} tokens <= max_position_embeddings {limit}"
    )


def _examples(dataset: SampleDataset, cfg: RunConfig, allowed_epochs: float) -> Check:
    batch = cfg.fit.train_dataloader.batch_size
    accum = cfg.init.loop.grad_accum_steps
    needed = cfg.max_steps * batch * accum
    have = len(dataset)
    epochs = needed / max(1, have)
    if epochs > allowed_epochs + 1e-9:
        return Check("data: examples", FAIL, f"{cfg.max_steps} steps x batch {batch} x accumulation {accum} = {needed:,} "
                     f"samples, but the data holds {have:,}: the run would go through it {epochs:.2f} times "
                     f"(asked: {allowed_epochs:g}); lower max_steps to {int(have * allowed_epochs) // (batch * accum)} "
                     f"(a sweep: train.epochs), or, where repeating the data is meant, allow it (`preflight --epochs "
                     f"{math.ceil(epochs * 100) / 100:g}`)")  # fmt: skip
    return Check("data: examples", PASS, f"{needed:,} samples for {cfg.max_steps} steps of {batch * accum}; "
                 f"the data holds {have:,} ({epochs:.2f} epochs)")  # fmt: skip
