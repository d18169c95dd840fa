"""Where a task's training and evaluated examples come from: the two protocols, one definition.

    official   train on the task's training split, evaluate the whole official evaluation split,
               as published work does (BoolQ train 9,427 / validation 3,270; HellaSwag train
               39,905 / validation 10,042; GSM8K train 7,473 / test 1,319). Sources: `hub`, or a
               local directory in the hub datasets' schema; the evaluation split alone is also
               shipped offline (`bundled`), so an official evaluation needs no hub.
    offline    for machines without a hub, where only the evaluation splits exist: a deterministic
               training part and held-out part of the evaluation split (`data.split.split_of`,
               by a hash of each example's content, a fraction and a salt). Numbers measured this
               way are not comparable with published ones, and every record says which protocol
               produced it.

A local directory DIR holds, per task, `DIR/<task>/<split>.jsonl|.json|.parquet`, or a
`save_to_disk` folder `DIR/<task>/<split>/`, or one `save_to_disk` DatasetDict `DIR/<task>/`
(split names as on the hub: train, validation, test).

`DataProtocol.training_rows(task)` and `.evaluated_rows(task)` are what `data prepare`, the
evaluation and the calibration of data-aware masks read: the two sides cannot overlap.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from modelzoo_ext.data.rows import rows_from_path
from modelzoo_ext.data.split import DEFAULT_HELD_OUT_FRACTION, DEFAULT_SALT, split_of
from modelzoo_ext.data.templates import TASKS, example_key
from modelzoo_ext.errors import UserError

PROTOCOLS = ("official", "offline")
# task -> (hub dataset, config, training split, evaluation split)
HUB_DATASETS = {
    "boolq": ("google/boolq", None, "train", "validation"),
    "hellaswag": ("Rowan/hellaswag", None, "train", "validation"),
    "gsm8k": ("openai/gsm8k", "main", "train", "test"),
}
# The offline copies are the official evaluation splits (see docs/offline-assets in the design notes).
BUNDLED_EVALUATION = {"boolq": "boolq_validation", "hellaswag": "hellaswag_validation", "gsm8k": "gsm8k_test"}
OFFICIAL_ROWS = {  # for the record and for sanity checks of local copies
    ("boolq", "train"): 9427, ("boolq", "validation"): 3270,
    ("hellaswag", "train"): 39905, ("hellaswag", "validation"): 10042,
    ("gsm8k", "train"): 7473, ("gsm8k", "test"): 1319,
}  # fmt: skip
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


def training_split(task: str) -> str:
    """The hub name of `task`'s training split."""
    return HUB_DATASETS[_known(task)][2]


def evaluation_split(task: str) -> str:
    """The hub name of `task`'s official evaluation split (`validation`, or `test` for GSM8K)."""
    return HUB_DATASETS[_known(task)][3]


def _known(task: str) -> str:
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}", fix=f"use one of {', '.join(TASKS)}")
    return task


def local_split_rows(directory: Path, task: str, split: str) -> Iterator[dict[str, Any]]:
    """The rows of `split` of `task` in a local directory of the hub datasets' schema."""
    base = directory / task
    for suffix in LOCAL_SUFFIXES:
        if (base / f"{split}{suffix}").is_file():
            yield from rows_from_path(base / f"{split}{suffix}")
            return
    from datasets import load_from_disk

    if (base / split).is_dir():
        yield from load_from_disk(str(base / split))
        return
    if (base / "dataset_dict.json").is_file():
        splits = load_from_disk(str(base))
        if split in splits:
            yield from splits[split]
            return
    raise UserError(
        f"no {task} {split} split in the data directory",
        where=str(base),
        fix=f"put it there as {split}.jsonl / .parquet, a save_to_disk folder {split}/, or a DatasetDict "
        f"(see docs/data.md), or use --source hub",
    )


def split_rows(task: str, split: str, source: str) -> Iterator[dict[str, Any]]:
    """The raw rows of one split of `task` from `hub`, `bundled` (evaluation split only) or a directory."""
    name, config, train, evaluation = HUB_DATASETS[_known(task)]
    if split not in (train, evaluation):
        raise UserError(f"{task} has no split {split!r} here", fix=f"use {train} or {evaluation}")
    if source == "hub":
        from datasets import load_dataset

        yield from load_dataset(name, config, split=split)
    elif source == "bundled":
        if split != evaluation:
            raise UserError(
                f"the offline copy of {task} holds only its evaluation split ({evaluation}), not {split}",
                where="--source bundled",
                fix="use --protocol offline (training part of the evaluation split), or --source hub / DIR",
            )
        from modelzoo_ext.offline_assets import asset_path

        yield from rows_from_path(asset_path(BUNDLED_EVALUATION[task]))
    else:
        directory = Path(source)
        if not directory.is_dir():
            raise UserError(
                "data source not found", where=source, fix="pass hub, bundled, or a data directory"
            )
        yield from local_split_rows(directory, task, split)


@dataclass(frozen=True)
class DataProtocol:
    """A protocol, a source, and (offline) the held-out fraction and salt of the split."""

    protocol: str = "offline"
    source: str = "bundled"
    held_out_fraction: float = DEFAULT_HELD_OUT_FRACTION
    salt: str = DEFAULT_SALT

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise UserError(f"unknown protocol {self.protocol!r}", fix=f"use one of {PROTOCOLS}")
        if self.protocol == "offline" and not 0.0 < self.held_out_fraction < 1.0:
            raise UserError(
                f"held-out fraction must lie in (0, 1), got {self.held_out_fraction}",
                where="--held-out-fraction",
                fix="pass e.g. --held-out-fraction 0.2",
            )

    @classmethod
    def default_for(cls, source: str, **kwargs: Any) -> DataProtocol:
        """`official` for `hub` or a directory, `offline` for `bundled` (which holds evaluation splits only)."""
        return cls("offline" if source == "bundled" else "official", source, **kwargs)

    def _part(self, task: str, part: str) -> Iterator[dict[str, Any]]:
        for row in split_rows(task, evaluation_split(task), self.source):
            if split_of(example_key(task, row), self.held_out_fraction, self.salt) == part:
                yield row

    def training_rows(self, task: str) -> Iterator[dict[str, Any]]:
        """The examples fine-tuning reads."""
        if self.protocol == "official":
            return split_rows(task, training_split(task), self.source)
        return self._part(task, "train")

    def evaluated_rows(self, task: str) -> Iterator[dict[str, Any]]:
        """The examples evaluation scores (never one of `training_rows`)."""
        if self.protocol == "official":
            return split_rows(task, evaluation_split(task), self.source)
        return self._part(task, "heldout")

    def describe(self, task: str | None = None) -> str:
        """One line for tables and reports."""
        if self.protocol == "official":
            if task is None:
                return f"official (training split / whole evaluation split, {self.source})"
            return f"official ({training_split(task)} / whole {evaluation_split(task)}, {self.source})"
        return (
            f"offline (training part / held-out part {self.held_out_fraction:g} of the evaluation split, "
            f"salt {self.salt!r}, {self.source})"
        )

    def record(self) -> dict[str, Any]:
        """JSON-able record (what every prepared dataset, evaluation and registry row stores)."""
        record = asdict(self)
        if self.protocol == "official":
            record.pop("held_out_fraction")
            record.pop("salt")
        return record
