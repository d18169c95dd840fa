"""`sparse-lora eval`: lm-eval's built-in protocol on local data, the held-out split, clear errors."""

from __future__ import annotations

import json

import pytest

from modelzoo_ext.cli import main
from modelzoo_ext.data.prepare import task_rows
from modelzoo_ext.data.split import split_of
from modelzoo_ext.data.templates import example_key, render
from modelzoo_ext.study.evaluate import (
    HeldOutSplit,
    builtin_task_manager,
    lm_eval_runs_with_this_transformers,
    write_local_task_files,
)

DATA_SOURCE_KEYS = {
    "task",
    "dataset_path",
    "dataset_name",
    "dataset_kwargs",
    "training_split",
    "validation_split",
    "test_split",
    "fewshot_split",
}
PROTOCOL_KEYS = (
    "output_type",
    "doc_to_text",
    "doc_to_target",
    "doc_to_choice",
    "target_delimiter",
    "fewshot_delimiter",
    "metric_list",
    "filter_list",
    "generation_kwargs",
    "num_fewshot",
    "repeats",
)
SPLIT = HeldOutSplit(0.2, "test-salt")


def _jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


@pytest.mark.parametrize("task", ["boolq", "gsm8k"])
def test_local_files_hold_exactly_the_held_out_part(tmp_path, task):
    overrides = write_local_task_files(task, "bundled", SPLIT, tmp_path)
    assert set(overrides) - {"_provenance"} <= DATA_SOURCE_KEYS  # nothing but the data source changes
    files = overrides["dataset_kwargs"]["data_files"]
    eval_split = "validation" if task == "boolq" else "test"
    evaluated = _jsonl(files[eval_split])
    all_rows = list(task_rows(task, "bundled"))
    held_out = [r for r in all_rows if split_of(example_key(task, r), 0.2, "test-salt") == "heldout"]
    assert len(evaluated) == len(held_out) == overrides["_provenance"]["rows_evaluated_before_limit"]
    assert 0.1 * len(all_rows) < len(held_out) < 0.3 * len(all_rows)
    assert [example_key(task, r) for r in evaluated] == [example_key(task, r) for r in held_out]
    if task == "boolq":  # super_glue's schema: label 1 = yes
        assert [r["label"] for r in evaluated] == [int(r["answer"]) for r in held_out]
    else:  # GSM8K shots come from the training part, never from the held-out part
        shots = _jsonl(files["train"])
        assert overrides["fewshot_split"] == "train"
        assert len(shots) + len(evaluated) == len(all_rows)
        assert not {r["question"] for r in shots} & {r["question"] for r in evaluated}


@pytest.fixture(scope="module")
def full_task_manager():
    """lm-eval's default index of every built-in task (slow to build: once per module)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


@pytest.mark.parametrize("task", ["boolq", "hellaswag", "gsm8k"])
def test_protocol_is_lm_evals_builtin(tmp_path, task, full_task_manager):
    """The task lm-eval builds from our overrides has the built-in prompts, metrics and shots."""
    builtin = full_task_manager._get_config(task)
    manager = builtin_task_manager([task])
    # the narrow index reads the very same YAML file
    assert manager._task_index[task]["yaml_path"] == full_task_manager._task_index[task]["yaml_path"]
    assert manager.all_tasks != full_task_manager.all_tasks  # ...and only a few folders of it
    overrides = write_local_task_files(task, "bundled", SPLIT, tmp_path, limit=5)
    overrides.pop("_provenance")
    task_obj = manager.load_task_or_group([overrides])[task]
    loaded = task_obj.config
    for key in PROTOCOL_KEYS:
        if key in builtin:
            assert getattr(loaded, key) == builtin[key], key
    assert loaded.dataset_path == "json"
    # Training text (the data layer's template) is exactly what lm-eval scores for the gold answer.
    doc = next(iter(task_obj.eval_docs))
    example = render(
        task, next(r for r in task_rows(task, "bundled") if example_key(task, r) == example_key(task, doc))
    )
    gold = task_obj.doc_to_target(doc)
    target = task_obj.doc_to_choice(doc)[gold] if task != "gsm8k" else gold
    assert (
        task_obj.doc_to_text(doc) + task_obj.config.target_delimiter + target
        == example.prompt + example.completion
    )


def test_eval_refuses_clearly_where_lm_eval_cannot_run(tmp_path, tiny_llama_dir, capsys):
    """Where lm-eval cannot load its model class (transformers 5), one clear error, exit 2, no file;
    where it can, this test has nothing to check and the full evaluation test below runs."""
    if lm_eval_runs_with_this_transformers():
        pytest.skip("lm-eval runs in this environment: covered by test_eval_cli_on_tiny_model_with_split")
    out = tmp_path / "results.json"
    assert (
        main(["eval", "--model", str(tiny_llama_dir), "--tasks", "boolq", "--limit", "1", "--out", str(out)])
        == 2
    )
    assert "predates transformers 5" in capsys.readouterr().err
    assert not out.exists()


def test_eval_cli_on_tiny_model_with_split(tmp_path, tiny_llama_dir, capsys):
    if not lm_eval_runs_with_this_transformers():
        pytest.skip("lm-eval 0.4.9.1 cannot run with this transformers (5.x): see the refusal test")
    out = tmp_path / "results.json"
    argv = ["eval", "--model", str(tiny_llama_dir), "--tasks", "boolq,gsm8k", "--limit", "3"]
    argv += [
        "--held-out-fraction",
        "0.2",
        "--split-salt",
        "test-salt",
        "--max-gen-toks",
        "8",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    results = json.loads(out.read_text())
    assert results["lm_eval_version"] == "0.4.9.1"
    assert results["limit"] == 3 and results["max_gen_toks"] == 8 and results["data_source"] == "bundled"
    boolq, gsm8k = results["tasks"]["boolq"], results["tasks"]["gsm8k"]
    assert boolq["num_fewshot"] == 0 and gsm8k["num_fewshot"] == 5
    assert boolq["n_samples_evaluated"] == gsm8k["n_samples_evaluated"] == 3
    assert boolq["split"] == {"held_out_fraction": 0.2, "salt": "test-salt", "evaluated_part": "heldout"}
    assert boolq["primary"]["acc,none"] in (0.0, 1 / 3, 2 / 3, 1.0)
    assert set(gsm8k["primary"]) == {"exact_match,strict-match", "exact_match,flexible-extract"}
    assert "boolq (0-shot, n=3): acc,none=" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tasks", "mmlu"], "unknown task"),
        (["--data", "hub", "--held-out-fraction", "0.2"], "held-out split"),
        (["--held-out-fraction", "1.5"], "held-out-fraction"),
        (["--adapter", "/nonexistent"], "PEFT adapter"),
    ],
)
def test_bad_input_exits_2_without_output(tmp_path, tiny_llama_dir, capsys, extra, message):
    out = tmp_path / "results.json"
    assert main(["eval", "--model", str(tiny_llama_dir), "--out", str(out), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_not_a_model_directory(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path), "--out", str(tmp_path / "r.json")]) == 2
    assert "config.json" in capsys.readouterr().err
