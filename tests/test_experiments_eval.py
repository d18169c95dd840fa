"""`sparse-lora eval`: lm-eval's built-in protocol on local data, both data protocols, per-example
results with intervals, the held-out loss, clear errors."""

from __future__ import annotations

import json
from importlib.metadata import version

import pytest

from modelzoo_ext.cli import main
from modelzoo_ext.data.protocol import DataProtocol, split_rows
from modelzoo_ext.data.split import split_of
from modelzoo_ext.data.templates import example_key, render
from modelzoo_ext.errors import UserError
from modelzoo_ext.study.evaluate import (
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
OFFLINE = DataProtocol("offline", "bundled", 0.2, "test-salt")


def task_rows(task: str, source: str = "bundled") -> list[dict]:
    """The rows of the task's evaluation split in `source`."""
    return list(split_rows(task, "test" if task == "gsm8k" else "validation", source))


def _jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


@pytest.mark.parametrize("task", ["boolq", "gsm8k"])
def test_local_files_hold_exactly_the_held_out_part(tmp_path, task):
    overrides = write_local_task_files(task, OFFLINE, tmp_path)
    assert set(overrides) - {"_provenance"} <= DATA_SOURCE_KEYS  # nothing but the data source changes
    files = overrides["dataset_kwargs"]["data_files"]
    eval_split = "validation" if task == "boolq" else "test"
    evaluated = _jsonl(files[eval_split])
    all_rows = task_rows(task)
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


def hub_schema_dir(root, rows_per_split: int = 12):
    """A local directory in the hub datasets' schema for the three tasks: train and evaluation splits
    as JSONL, the evaluation split taken from the bundled copy's first rows, the training split from
    the next ones (disjoint)."""
    for task in ("boolq", "hellaswag", "gsm8k"):
        rows = task_rows(task)
        evaluation = "test" if task == "gsm8k" else "validation"
        (root / task).mkdir(parents=True)
        for split, part in (
            (evaluation, rows[:rows_per_split]),
            ("train", rows[rows_per_split : 3 * rows_per_split]),
        ):
            (root / task / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return root


def test_official_protocol_evaluates_the_whole_evaluation_split(tmp_path):
    data = hub_schema_dir(tmp_path / "hub")
    official = DataProtocol("official", str(data))
    for task in ("boolq", "gsm8k"):
        overrides = write_local_task_files(task, official, tmp_path / "work")
        files = overrides["dataset_kwargs"]["data_files"]
        evaluated = _jsonl(files["test" if task == "gsm8k" else "validation"])
        assert [example_key(task, r) for r in evaluated] == [
            example_key(task, r) for r in task_rows(task)[:12]
        ]
        if task == "gsm8k":  # the 5 shots come from the train split, as the built-in task draws them
            assert [r["question"] for r in _jsonl(files["train"])] == [
                r["question"] for r in task_rows(task)[12:36]
            ]
    # The offline copies hold evaluation splits only: an official GSM8K evaluation there is refused.
    with pytest.raises(UserError, match="holds only its evaluation split"):
        write_local_task_files("gsm8k", DataProtocol("official", "bundled"), tmp_path / "work2")
    boolq = write_local_task_files("boolq", DataProtocol("official", "bundled"), tmp_path / "work3")
    assert boolq["_provenance"]["rows_evaluated_before_limit"] == 3270  # all of BoolQ validation


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
    overrides = write_local_task_files(task, OFFLINE, tmp_path, limit=5)
    overrides.pop("_provenance")
    task_obj = manager.load_task_or_group([overrides])[task]
    loaded = task_obj.config
    for key in PROTOCOL_KEYS:
        if key in builtin:
            assert getattr(loaded, key) == builtin[key], key
    assert loaded.dataset_path == "json"
    # Training text (the data layer's template) is exactly what lm-eval scores for the gold answer.
    doc = next(iter(task_obj.eval_docs))
    example = render(task, next(r for r in task_rows(task) if example_key(task, r) == example_key(task, doc)))
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
    heldout = tmp_path / "heldout"
    prepare = ["data", "prepare", "--task", "boolq", "--tokenizer", str(tiny_llama_dir), "--max-seq-length", "512",
               "--split", "heldout", "--held-out-fraction", "0.2", "--split-salt", "test-salt", "--out", str(heldout)]  # fmt: skip
    assert main(prepare) == 0
    out = tmp_path / "results.json"
    argv = ["eval", "--model", str(tiny_llama_dir), "--tasks", "boolq,gsm8k", "--limit", "3", "--held-out-fraction",
            "0.2", "--split-salt", "test-salt", "--max-gen-toks", "8", "--loss-data", str(heldout), "--loss-limit",
            "10", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    results = json.loads(out.read_text())
    assert results["lm_eval_version"] == version("lm_eval")  # 0.4.7 (ModelZoo 2.6, 2.7) to 0.4.9.1
    assert results["limit"] == 3 and results["max_gen_toks"] == 8
    assert results["protocol"] == {
        "protocol": "offline",
        "source": "bundled",
        "held_out_fraction": 0.2,
        "salt": "test-salt",
    }
    boolq, gsm8k = results["tasks"]["boolq"], results["tasks"]["gsm8k"]
    assert boolq["num_fewshot"] == 0 and gsm8k["num_fewshot"] == 5
    assert boolq["n_samples_evaluated"] == gsm8k["n_samples_evaluated"] == 3
    acc = boolq["primary"]["acc,none"]
    assert acc["value"] in (0.0, 1 / 3, 2 / 3, 1.0) and acc["n"] == 3 and acc["method"].startswith("Wilson")
    assert acc["ci95"][0] <= acc["value"] <= acc["ci95"][1]
    assert set(gsm8k["primary"]) == {"exact_match,strict-match", "exact_match,flexible-extract"}
    # Every evaluated example is logged with its key; the keys are the held-out part's.
    samples = [
        json.loads(line) for line in (tmp_path / "results_samples" / "boolq.jsonl").read_text().splitlines()
    ]
    held_out_keys = set((heldout / "example_keys.txt").read_text().split())
    assert len(samples) == 3 and {s["key"] for s in samples} <= held_out_keys
    assert sum(s["acc,none"] for s in samples) / 3 == acc["value"]
    loss = results["heldout_loss"]
    assert loss["nll_per_token"]["n"] == 10 and len(loss["examples"]) == 10
    sums, tokens = sum(e["nll_sum"] for e in loss["examples"]), sum(e["tokens"] for e in loss["examples"])
    assert loss["nll_per_token"]["value"] == pytest.approx(sums / tokens)
    assert "boolq (0-shot, n=3): acc,none=" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tasks", "mmlu"], "unknown task"),
        (["--protocol", "official", "--held-out-fraction", "0.2"], "that is the offline protocol"),
        (["--protocol", "offline"], "needs --held-out-fraction"),
        (["--tasks", "none"], "nothing to evaluate"),
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
