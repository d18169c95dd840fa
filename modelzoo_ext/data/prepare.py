"""`sparse-lora data prepare`: JSONL or a task's rows -> a ModelZoo fine-tuning HDF5 directory.

Lifecycle: read rows (a prompt/completion JSONL, or BoolQ/HellaSwag/GSM8K through a protocol:
`modelzoo_ext.data.protocol`) -> render each through its versioned template -> keep the rows of
the requested part -> tokenize and pad (`encode_example`) -> write `output_chunk_0_<k>.h5` files,
`data_params.json` (template, tokenizer with the digest of its vocabulary files and its size,
protocol, part, counts, data checksum) and
`example_keys.txt` (a digest of each sample's example key, to check training and evaluation never
overlap) into a temporary directory, renamed onto `--out` when complete. The same input gives
byte-identical files.
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
from modelzoo_ext.data.protocol import DataProtocol, evaluation_split, split_rows, training_split
from modelzoo_ext.data.rows import read_jsonl
from modelzoo_ext.data.split import DEFAULT_HELD_OUT_FRACTION, DEFAULT_SALT, split_of
from modelzoo_ext.data.templates import TEMPLATE_VERSION, Example, render
from modelzoo_ext.errors import UserError

SAMPLES_PER_FILE = 50_000
KEYS_FILE = "example_keys.txt"  # sha256 of each written example's key, in sample order
# The files that define a tokenizer's vocabulary (what `tokenizer_sha256` in data_params.json covers).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt")


def tokenizer_digest(directory: str | Path) -> str | None:
    """sha256 over the vocabulary files a tokenizer directory holds (`TOKENIZER_FILES`), or None
    when it holds none: two directories with the same digest tokenise alike."""
    digest, found = hashlib.sha256(), False
    for name in TOKENIZER_FILES:
        path = Path(directory) / name
        if path.is_file():
            digest.update(f"{name}\0".encode())
            digest.update(path.read_bytes())
            found = True
    return digest.hexdigest() if found else None


def key_digest(key: str) -> str:
    """What `example_keys.txt` lists for an example key (keys hold whole passages: hashed)."""
    return hashlib.sha256(key.encode()).hexdigest()


def task_source_split(task: str, protocol: DataProtocol, part: str) -> tuple[Iterator[Example], str]:
    """(the rendered examples of the split `part` is drawn from, the `split` filter `prepare` applies).

    Official: the training split for "train", the evaluation split for "heldout", no filter.
    Offline: the evaluation split, filtered to `part` by `split_of` ("all": unfiltered); the
    counts in data_params.json then say how many of the split's rows were kept.
    """
    if protocol.protocol == "official":
        if part == "all":
            raise UserError("--split all is for the offline protocol", fix="use --split train or heldout")
        split = training_split(task) if part == "train" else evaluation_split(task)
        return (render(task, row) for row in split_rows(task, split, protocol.source)), "all"
    rows = split_rows(task, evaluation_split(task), protocol.source)
    return (render(task, row) for row in rows), part


def jsonl_examples(
    path: Path, prompt_key: str = "prompt", completion_key: str = "completion"
) -> Iterator[Example]:
    """Prompt/completion JSONL rows as examples; the key is the row's `id`, else its prompt."""
    if not path.exists():
        raise UserError("input file not found", where=str(path))
    for i, row in enumerate(read_jsonl(path)):
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
    keys: list[str] = []
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
        keys.append(key_digest(example.key))
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
        "tokenizer_sha256": tokenizer_digest(tokenizer_dir),
        "vocab_size": len(tokenizer),
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
        (tmp / KEYS_FILE).write_text("".join(k + "\n" for k in keys))
    return params


def read_example_keys(data_dir: str | Path) -> list[str]:
    """The key digests of a prepared directory's samples, in sample order (see `KEYS_FILE`)."""
    path = Path(data_dir) / KEYS_FILE
    if not path.is_file():
        raise UserError(
            f"no {KEYS_FILE} (prepared by an older version)", where=str(data_dir), fix="rerun data prepare"
        )
    return path.read_text().split()


def run_prepare(args) -> int:
    """Handler of `sparse-lora data prepare`."""
    if bool(args.input) == bool(args.task):
        raise UserError("pass exactly one of --input JSONL or --task", fix="e.g. --task boolq")
    split, provenance = args.split, {"source": str(args.input), "task": None}
    if args.input:
        if args.protocol:
            raise UserError("--protocol is for --task data", where="--input", fix="drop --protocol")
        examples = jsonl_examples(Path(args.input))
    else:
        protocol = _protocol(args)
        examples, split = task_source_split(args.task, protocol, args.split)
        provenance = {
            "source": args.source,
            "task": args.task,
            "protocol": protocol.record(),
            "split": args.split,
        }
        provenance["protocol_description"] = protocol.describe(args.task)
        if protocol.protocol == "official":
            provenance.update(held_out_fraction=None, split_salt=None)
    params = prepare(
        examples,
        tokenizer_dir=args.tokenizer,
        max_seq_length=args.max_seq_length,
        out_dir=args.out,
        split=split,
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


def _protocol(args) -> DataProtocol:
    """The protocol of `--protocol` (default: official for hub or a directory, offline for bundled)."""
    kwargs = {"held_out_fraction": args.held_out_fraction, "salt": args.split_salt}
    if args.protocol:
        return DataProtocol(args.protocol, args.source, **kwargs)
    return DataProtocol.default_for(args.source, **kwargs)
