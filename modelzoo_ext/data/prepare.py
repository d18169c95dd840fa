"""`sparse-lora data prepare`: JSONL or a task's rows -> a ModelZoo fine-tuning HDF5 directory.

Lifecycle: read rows (a prompt/completion JSONL, or BoolQ/HellaSwag/GSM8K from the bundled
offline copy, the hub, or a local path) -> render each through its versioned template -> keep the
rows of the requested split (`split_of`) -> tokenize and pad (`encode_example`) -> write
`output_chunk_0_<k>.h5` files and `data_params.json` into a temporary directory, renamed onto
`--out` when complete. The same input gives byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from modelzoo_ext.atomic import atomic_dir
from modelzoo_ext.data.encode import MIN_SEQUENCE_LEN, encode_example, pad_id_of
from modelzoo_ext.data.hdf5 import PARAMS_FILE, write_samples
from modelzoo_ext.data.split import DEFAULT_HELD_OUT_FRACTION, DEFAULT_SALT, split_of
from modelzoo_ext.data.templates import TASKS, TEMPLATE_VERSION, Example, render
from modelzoo_ext.errors import UserError

SAMPLES_PER_FILE = 50_000
BUNDLED_ASSETS = {"boolq": "boolq_validation", "hellaswag": "hellaswag_validation", "gsm8k": "gsm8k_test"}
HUB_DATASETS = {  # (path, config, split): the splits the bundled copies come from
    "boolq": ("google/boolq", None, "validation"),
    "hellaswag": ("Rowan/hellaswag", None, "validation"),
    "gsm8k": ("openai/gsm8k", "main", "test"),
}


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"invalid JSON ({exc.msg})", where=f"{path}:{line_no}") from exc


def _rows_from_path(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a local dataset: a `save_to_disk` folder, or a .jsonl/.json/.parquet file."""
    if path.is_dir():
        from datasets import load_from_disk

        yield from load_from_disk(str(path))
    elif path.suffix == ".jsonl":
        yield from _read_jsonl(path)
    elif path.suffix in (".json", ".parquet"):
        from datasets import load_dataset

        yield from load_dataset(path.suffix[1:], data_files=str(path), split="train")
    else:
        raise UserError(
            "unsupported data source",
            where=str(path),
            fix="pass a save_to_disk folder or a .jsonl/.json/.parquet file",
        )


def task_rows(task: str, source: str) -> Iterator[dict[str, Any]]:
    """Raw rows of a task from `bundled` (offline copy), `hub`, or a local PATH."""
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}", fix=f"use one of {TASKS}")
    if source == "bundled":
        from modelzoo_ext.offline_assets import asset_path

        yield from _rows_from_path(asset_path(BUNDLED_ASSETS[task]))
    elif source == "hub":
        from datasets import load_dataset

        name, config, split = HUB_DATASETS[task]
        yield from load_dataset(name, config, split=split)
    else:
        path = Path(source)
        if not path.exists():
            raise UserError(
                "data source not found", where=source, fix="pass bundled, hub, or an existing path"
            )
        yield from _rows_from_path(path)


def jsonl_examples(
    path: Path, prompt_key: str = "prompt", completion_key: str = "completion"
) -> Iterator[Example]:
    """Prompt/completion JSONL rows as examples; the key is the row's `id`, else its prompt."""
    if not path.exists():
        raise UserError("input file not found", where=str(path))
    for i, row in enumerate(_read_jsonl(path)):
        if prompt_key not in row or completion_key not in row:
            raise UserError(
                f"row {i} lacks {prompt_key!r} or {completion_key!r}",
                where=str(path),
                fix="write one {'prompt': ..., 'completion': ...} object per line",
            )
        key = str(row.get("id", row[prompt_key]))
        yield Example(key=f"jsonl:{key}", prompt=row[prompt_key], completion=row[completion_key])


def prepare(
    examples: Iterator[Example],
    *,
    tokenizer_dir: str | Path,
    max_seq_length: int,
    out_dir: str | Path,
    split: str = "train",
    held_out_fraction: float = DEFAULT_HELD_OUT_FRACTION,
    salt: str = DEFAULT_SALT,
    provenance: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize the examples of `split` ("train", "heldout" or "all") into `out_dir`; return data_params."""
    from tqdm import tqdm
    from transformers import AutoTokenizer

    if split not in ("train", "heldout", "all"):
        raise UserError(f"unknown split {split!r}", fix="use train, heldout or all")
    if max_seq_length < 2:
        raise UserError(f"--max-seq-length must be at least 2, got {max_seq_length}")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if tokenizer.eos_token is None:
        raise UserError("the tokenizer has no EOS token", where=str(tokenizer_dir))
    counts = {"rows": 0, "in_split": 0, "written": 0, "skipped_too_long": 0, "skipped_too_short": 0}
    samples: list[np.ndarray] = []
    for example in tqdm(examples, desc="data prepare", unit="ex", disable=not progress):
        counts["rows"] += 1
        if split != "all" and split_of(example.key, held_out_fraction, salt) != split:
            continue
        counts["in_split"] += 1
        sample = encode_example(tokenizer, example.prompt, example.completion, max_seq_length)
        if sample is None:
            n_tokens = len(tokenizer(example.prompt + example.completion + tokenizer.eos_token)["input_ids"])
            counts["skipped_too_long" if n_tokens > max_seq_length else "skipped_too_short"] += 1
            continue
        samples.append(sample)
    if not samples:
        raise UserError(
            f"no examples left to write ({counts})",
            fix="raise --max-seq-length, or check --split and --held-out-fraction",
        )
    data = np.stack(samples)
    counts["written"] = len(samples)
    params = {
        "format": "modelzoo-finetuning-hdf5",
        "features": ["input_ids", "loss_mask", "labels"],
        "template_version": TEMPLATE_VERSION,
        "tokenizer": str(tokenizer_dir),
        "max_seq_length": max_seq_length,
        "pad_id": pad_id_of(tokenizer),
        "eos_id": tokenizer.eos_token_id,
        "min_sequence_len": MIN_SEQUENCE_LEN,
        "split": split,
        "held_out_fraction": held_out_fraction,
        "split_salt": salt,
        "counts": counts,
        "loss_tokens": int(data[:, 1].sum()),
        "data_sha256": hashlib.sha256(data.tobytes()).hexdigest(),
        **(provenance or {}),
    }
    with atomic_dir(out_dir) as tmp:
        for k, start in enumerate(range(0, len(data), SAMPLES_PER_FILE)):
            write_samples(tmp / f"output_chunk_0_{k}.h5", data[start : start + SAMPLES_PER_FILE])
        (tmp / PARAMS_FILE).write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")
    return params


def run_prepare(args) -> int:
    """Handler of `sparse-lora data prepare`."""
    if bool(args.input) == bool(args.task):
        raise UserError("pass exactly one of --input JSONL or --task", fix="e.g. --task boolq")
    if args.input:
        examples = jsonl_examples(Path(args.input))
        provenance = {"source": str(args.input), "task": None}
    else:
        examples = (render(args.task, row) for row in task_rows(args.task, args.source))
        provenance = {"source": args.source, "task": args.task}
    params = prepare(
        examples,
        tokenizer_dir=args.tokenizer,
        max_seq_length=args.max_seq_length,
        out_dir=args.out,
        split=args.split,
        held_out_fraction=args.held_out_fraction,
        salt=args.split_salt,
        provenance=provenance,
    )
    c = params["counts"]
    print(
        f"wrote {c['written']} samples (msl {params['max_seq_length']}, split {params['split']}, "
        f"{c['skipped_too_long']} too long, {c['skipped_too_short']} too short, of {c['rows']} rows) to {args.out}"
    )
    return 0
