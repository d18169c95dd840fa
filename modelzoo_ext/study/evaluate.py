"""Evaluation on BoolQ, HellaSwag and GSM8K through lm-eval's Python API, with its built-in protocol.

The protocol (prompts, choices, metrics, filters, shots, generation settings) is never restated
here: each task is lm-eval's own built-in task, and for local data we hand lm-eval a task *dict*
holding only the data-source keys (`dataset_path`, `dataset_kwargs`, splits). lm-eval merges that
dict over its registered built-in config itself (`TaskManager._load_individual_task_or_group`), so
prompts and metrics cannot drift from the built-in ones.

What is evaluated is the data layer's `DataProtocol` (one definition, shared with `data prepare`):
- official: the whole official evaluation split (BoolQ validation, HellaSwag validation, GSM8K
  test), from the hub (the built-in tasks as they are), a local directory, or the offline copies
  (`bundled`, which are those very splits); GSM8K's 5 shots come from its train split, as the
  built-in task draws them (so an official GSM8K evaluation needs the hub or a directory with it);
- offline: the held-out part of the evaluation split; GSM8K's shots from its training part.

Every evaluated example is logged (lm-eval `log_samples`): `<out stem>_samples/<task>.jsonl` holds, per
example, the digest of its key (the data layer's `example_key`, hashed as in `example_keys.txt`)
and its per-example scores, so that runs can be compared pairwise on the same examples. Each
primary metric is recorded with lm-eval's stderr and a 95% interval from the per-example scores
(`modelzoo_ext.study.stats`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelzoo_ext.atomic import atomic_dir, atomic_file
from modelzoo_ext.data.protocol import DataProtocol, evaluation_split, training_split
from modelzoo_ext.errors import UserError

# One source of truth for the headline number per task (lm-eval's "metric,filter" keys).
PRIMARY_METRICS: dict[str, tuple[str, ...]] = {
    "boolq": ("acc,none",),
    "hellaswag": ("acc_norm,none",),
    "gsm8k": ("exact_match,strict-match", "exact_match,flexible-extract"),
}


@dataclass(frozen=True)
class LocalTask:
    """How lm-eval's built-in task names the evaluated split."""

    eval_split: str  # the split key lm-eval's built-in config evaluates
    eval_split_key: str  # "validation_split" or "test_split"


LOCAL_TASKS = {
    "boolq": LocalTask("validation", "validation_split"),
    "hellaswag": LocalTask("validation", "validation_split"),
    "gsm8k": LocalTask("test", "test_split"),
}


def parse_tasks(text: str) -> list[str]:
    """`"boolq,gsm8k"` -> `["boolq", "gsm8k"]`, rejecting unknown names."""
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in PRIMARY_METRICS]
    if not tasks or unknown:
        raise UserError(
            f"unknown task(s) {unknown or text!r}", fix=f"use a comma list of {sorted(PRIMARY_METRICS)}"
        )
    return tasks


def to_builtin_schema(task: str, row: dict[str, Any]) -> dict[str, Any]:
    """A row with the fields the built-in task reads (BoolQ: `label` int, as `super_glue` has it)."""
    if task == "boolq" and "label" not in row:
        if "answer" not in row:
            raise UserError(
                "a BoolQ row has neither `label` nor `answer`", fix="use the super_glue boolq fields"
            )
        return {**row, "label": int(bool(row["answer"]))}
    return row


def write_local_task_files(
    task: str, protocol: DataProtocol, workdir: Path, limit: int | None = None
) -> dict[str, Any]:
    """Write the evaluated (and GSM8K few-shot) rows as JSONL; return lm-eval's data-source overrides.

    lm-eval's `limit` takes the first `limit` evaluated rows; writing only those changes nothing
    for 0-shot tasks and saves processing thousands of rows. GSM8K's shot rows are written whole:
    the built-in task draws its shots from them (`first_n`).
    """
    spec = LOCAL_TASKS[task]
    evaluated = [to_builtin_schema(task, row) for row in protocol.evaluated_rows(task)]
    if not evaluated:
        raise UserError(f"the evaluated part of {task} is empty", fix="raise --held-out-fraction")
    written = evaluated if limit is None else evaluated[:limit]
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
    if task == "gsm8k":  # shots: the train split (official) or the training part (offline)
        shots = list(protocol.training_rows(task))
        files["train"] = _write_jsonl(workdir / task / "train.jsonl", shots)
        overrides["fewshot_split"] = "train"
    overrides["dataset_kwargs"] = {"data_files": {name: str(path) for name, path in files.items()}}
    overrides["_provenance"] = {"rows_evaluated_before_limit": len(evaluated)}
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
    protocol: DataProtocol,
    adapter_dir: str | Path | None = None,
    limit: int | None = None,
    max_gen_toks: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str = "float32",
    max_length: int | None = None,
) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """Run lm-eval's built-in protocol for `tasks` on an HF model directory (plus a PEFT adapter).

    Returns (results, per-example scores by task). Results hold, per task, the primary metrics
    with stderr and 95% interval, all metrics, the shots, the protocol and data source, plus
    lm-eval's version and the run settings.
    """
    _check_inputs(model_dir, adapter_dir)
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
        task_specs, provenance = _task_specs(tasks, protocol, Path(workdir), limit)
        raw = lm_eval.simple_evaluate(
            model=model,
            tasks=task_specs,
            limit=limit,
            # the comma-separated string form: lm-eval 0.4.7 (ModelZoo 2.6, 2.7) parses only a string
            gen_kwargs=f"max_gen_toks={max_gen_toks}" if max_gen_toks else None,
            task_manager=builtin_task_manager(tasks),
            log_samples=True,
            bootstrap_iters=1000,
        )
    samples = {task: per_example_scores(task, raw["samples"][task]) for task in tasks}
    settings = {"limit": limit, "max_gen_toks": max_gen_toks, "started": started}
    return _summarise(raw, tasks, provenance, samples, model_dir, adapter_dir, protocol, settings), samples


def _task_specs(tasks: list[str], protocol: DataProtocol, workdir: Path, limit: int | None):
    """What lm-eval is handed per task: the built-in name (official protocol from the hub), or a
    dict of data-source overrides pointing at local JSONL files; plus per-task provenance."""
    if protocol.protocol == "official" and protocol.source == "hub":
        return list(tasks), {}
    specs, provenance = [], {}
    for task in tasks:
        overrides = write_local_task_files(task, protocol, workdir, limit)
        provenance[task] = overrides.pop("_provenance")
        specs.append(overrides)
    return specs, provenance


def per_example_scores(task: str, logged: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """lm-eval's logged samples -> one row per example: key digest, doc id, gold target and each
    `metric,filter` score."""
    from modelzoo_ext.data.prepare import key_digest
    from modelzoo_ext.data.templates import example_key

    rows: dict[int, dict[str, Any]] = {}
    for sample in logged:
        row = rows.setdefault(
            sample["doc_id"],
            {
                "doc_id": sample["doc_id"],
                "key": key_digest(example_key(task, sample["doc"])),
                "target": sample.get("target"),
            },
        )
        for metric in sample.get("metrics", []):
            row[f"{metric},{sample.get('filter', 'none')}"] = float(sample[metric])
    return [rows[doc_id] for doc_id in sorted(rows)]


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


def _check_inputs(model_dir, adapter_dir) -> None:
    if not (Path(model_dir) / "config.json").is_file():
        raise UserError("not a Hugging Face model directory (no config.json)", where=str(model_dir))
    if adapter_dir and not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise UserError("not a PEFT adapter directory (no adapter_config.json)", where=str(adapter_dir))


def _primary(task: str, metrics: dict[str, Any], samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Each primary metric with lm-eval's stderr and a 95% interval from the per-example scores."""
    from modelzoo_ext.study.stats import per_example_mean

    primary = {}
    for key in PRIMARY_METRICS[task]:
        metric, filt = key.split(",")
        estimate = per_example_mean([row[key] for row in samples if key in row])
        stderr = metrics.get(f"{metric}_stderr,{filt}")
        primary[key] = {
            **estimate.as_record(),
            "value": metrics[key],
            "stderr": stderr if isinstance(stderr, float) else None,
        }
    return primary


def _summarise(raw, tasks, provenance, samples, model_dir, adapter_dir, protocol: DataProtocol, settings):
    import lm_eval

    per_task = {}
    for task in tasks:
        metrics = {k: v for k, v in raw["results"][task].items() if k != "alias"}
        config = raw["configs"][task]
        per_task[task] = {
            "primary": _primary(task, metrics, samples[task]),
            "metrics": metrics,
            "num_fewshot": raw["n-shot"][task],
            "n_samples_evaluated": raw["n-samples"][task]["effective"],
            "lm_eval_task_version": raw["versions"][task],
            "evaluated_split": evaluation_split(task),
            "fewshot_from": (training_split(task) if protocol.protocol == "official" else "training part")
            if task == "gsm8k"
            else None,
            "protocol_description": protocol.describe(task),
            "dataset": {k: config.get(k) for k in ("dataset_path", "dataset_kwargs", "fewshot_split")},
            **provenance.get(task, {}),
        }
    version = lm_eval.__version__ if hasattr(lm_eval, "__version__") else _dist_version("lm_eval")
    return {
        "lm_eval_version": version,
        "model": str(Path(model_dir).resolve()),
        "adapter": str(Path(adapter_dir).resolve()) if adapter_dir else None,
        "tasks": per_task,
        "protocol": protocol.record(),
        "limit": settings["limit"],
        "max_gen_toks": settings["max_gen_toks"],
        "seconds": round(time.time() - settings["started"], 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def write_results(
    results: dict[str, Any], out: str | Path, samples: dict[str, list[dict[str, Any]]] | None = None
) -> Path:
    """Write the results JSON atomically; with `samples`, also `<stem>_samples/<task>.jsonl` beside it
    (the per-example scores; their folder is named in `results["samples_dir"]`)."""
    out = Path(out)
    if samples is not None:
        folder = out.with_name(f"{out.stem}_samples")
        with atomic_dir(folder) as tmp:
            for task, rows in samples.items():
                (tmp / f"{task}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        results = {**results, "samples_dir": str(folder)}
    with atomic_file(out) as tmp:
        tmp.write_text(json.dumps(results, indent=2, sort_keys=True, default=str) + "\n")
    return out


def read_samples(results: dict[str, Any], task: str) -> list[dict[str, Any]]:
    """The per-example scores `write_results` stored for `task`."""
    from modelzoo_ext.data.rows import read_jsonl

    return list(read_jsonl(Path(results["samples_dir"]) / f"{task}.jsonl"))


def primary_metrics(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """`{"boolq/acc": {"value", "ci95", "stderr", "n", "method"}, "gsm8k/exact_match,strict-match": ...}`."""
    flat = {}
    for task, entry in results["tasks"].items():
        for key, record in entry["primary"].items():
            metric, filt = key.split(",")
            flat[f"{task}/{metric}" if filt == "none" else f"{task}/{metric},{filt}"] = record
    return flat
