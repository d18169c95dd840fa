"""`sparse-lora sweep`: a grid that is a list, one protocol and one params file for every backend, seeds
that vary, bad grids refused at plan, failure handling, and tiny CPU sweeps end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from modelzoo_ext.cli import main
from modelzoo_ext.study.grid import SEED_ROLES, derived_seeds, grid
from modelzoo_ext.study.registry import Registry
from modelzoo_ext.study.steps import StepFailed, SweepStopped, classify_failure, run_with_retries
from modelzoo_ext.study.sweep_spec import load_sweep

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "modelzoo_ext" / "study" / "examples"
TINY_PARAMS = REPO / "model_configs" / "params_sparse_lora_tiny.yaml"


def _tiny_sweep(tmp_path: Path, hf_dir: Path, **changes) -> Path:
    spec = yaml.safe_load((EXAMPLES / "sweep_tiny.yaml").read_text())
    spec["models"]["tiny"] = {"hf_dir": str(hf_dir), "params": str(TINY_PARAMS)}
    spec.update(changes)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _params(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / "params.yaml").read_text())


def test_the_example_study_is_its_list_on_both_backends(
    tmp_path, tiny_llama_dir, tiny_mistral_dir, tiny_mixtral_dir
):
    """The example plan with backends [cs3, gpu]: exactly the listed points, each backend's runs
    from the same params file (CSX-only settings ignored by the reference trainer, by rule)."""
    from modelzoo_ext.run_config import load_run_config

    spec = yaml.safe_load((EXAMPLES / "sweep_phoenix.yaml").read_text())
    spec["models"]["llama3p1_8b"]["hf_dir"] = str(tiny_llama_dir)
    spec["models"]["mistral_7b"]["hf_dir"] = str(tiny_mistral_dir)
    spec["models"]["mixtral_8x7b"]["hf_dir"] = str(tiny_mixtral_dir)
    for model in spec["models"].values():
        model["params"] = str(EXAMPLES / model["params"])
        model["cs_checkpoint"] = str(tmp_path / "base.mdl")
    spec["backends"] = ["cs3", "gpu"]
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(spec))
    runs = grid(load_sweep(tmp_path / "sweep.yaml"))
    modes = Counter(r["mode"] for r in runs)
    assert modes["s2s"] == modes["s2d"] == 3 * 3 * 3 * 9 * 2 * 3  # 0% is not a sparse fine-tune
    assert modes["lora"] == 3 * 3 * 2 * 3  # the dense-LoRA baseline, once per model, task, backend, seed
    assert modes["none"] == 3 * 3 * (1 + 9 * (1 + 3 + 3))  # dense; magnitude once; wanda and random per seed
    assert len({r["run_id"] for r in runs}) == len(runs)
    out = tmp_path / "planned"
    only = [r for r in runs if r["model"] == "llama3p1_8b" and r["task"] == "boolq" and r["sparsity"] == 0.5]
    assert main(["sweep", "plan", str(tmp_path / "sweep.yaml"), "--out", str(out)]) == 0
    for run in (r for r in only if r["mode"] == "s2s" and r["method"] == "wanda" and r["seed"] == 0):
        params = _params(out / "runs" / run["run_id"])
        config = load_run_config(out / "runs" / run["run_id"] / "params.yaml")  # the GPU side accepts it
        assert "CSX" in config.ignored["callbacks.ScopedTrainFlags"]  # ignored by rule, with its reason
        assert params["trainer"]["init"]["backend"]["backend_type"] == "CSX"  # nothing deleted per backend
    twins = [
        out / "runs" / f"llama3p1_8b__boolq__wanda__unstructured__s50__s2s__{b}__seed0"
        for b in ("cs3", "gpu")
    ]
    cs3, gpu = (_params(d) for d in twins)
    for p in (cs3, gpu):
        p["trainer"]["init"].pop("model_dir")
        p["trainer"]["fit"].pop("ckpt_path", None)
    assert cs3["trainer"]["init"].pop("callbacks") == gpu["trainer"]["init"].pop(
        "callbacks"
    )  # LossLog in the file
    assert cs3 == gpu


def test_n_m_points_and_zero_sparsity_plan_exactly_the_listed_runs(tmp_path, tiny_llama_dir):
    sweep = _tiny_sweep(
        tmp_path, tiny_llama_dir,
        method_structures=[["magnitude", "unstructured"], ["magnitude", "2:4"], ["random", "unstructured"]],
        sparsities=[0.0, 0.5, 0.7], seeds=[0, 1], baselines={"dense_lora": True, "no_finetune": True},
    )  # fmt: skip
    runs = grid(load_sweep(sweep))
    ids = {r["run_id"] for r in runs}
    # fine-tunes: unstructured magnitude at 0.5 and 0.7, 2:4 at its own 0.5 (once), random at 0.5 and 0.7
    assert sum(r["mode"] in ("s2s", "s2d") for r in runs) == 5 * 2 * 2
    assert "tiny__boolq__magnitude__2of4__s50__s2s__cpu__seed1" in ids
    assert not any("2of4__s70" in i or "__s00__s2" in i for i in ids)  # no N:M at 0.7, no 0% sparse fine-tune
    assert (
        sum(r["mode"] == "lora" for r in runs) == 2
    )  # the 0% fine-tune is the dense-LoRA baseline, per seed
    assert (
        sum(r["mode"] == "none" for r in runs) == 1 + 2 + 1 + 2 * 2
    )  # dense, magnitude x2, 2:4, random x2 x seeds
    assert len(runs) == 20 + 2 + 8 == len(ids)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"method_structures": [["snip", "unstructured"]]}, "unknown method 'snip'"),
        ({"method_structures": [["magnitude", "blocks"]]}, "unknown structure 'blocks'"),
        ({"method_structures": [["magnitude", "rows"]], "scope": "global"}, "unstructured masks only"),
        ({"tasks": ["mmlu"]}, "tasks"),
        ({"methods": ["magnitude"], "structures": ["unstructured"]}, "method_structures"),
        ({"data": {"protocol": "official", "source": "bundled"}}, "offline copies do not hold"),
    ],
)
def test_bad_grids_are_refused_at_plan_with_nothing_written(
    tmp_path, tiny_llama_dir, capsys, changes, message
):
    sweep = _tiny_sweep(tmp_path, tiny_llama_dir, **changes)
    out = tmp_path / "sweep"
    assert main(["sweep", "plan", str(sweep), "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_model_of_no_known_family_is_refused_at_plan(tmp_path, tiny_llama_dir, capsys):
    params = yaml.safe_load(TINY_PARAMS.read_text())
    params["trainer"]["init"]["model"]["name"] = "gpt2"
    (tmp_path / "gpt2.yaml").write_text(yaml.safe_dump(params))
    sweep = _tiny_sweep(
        tmp_path,
        tiny_llama_dir,
        models={"m": {"hf_dir": str(tiny_llama_dir), "params": str(tmp_path / "gpt2.yaml")}},
    )
    assert main(["sweep", "plan", str(sweep), "--out", str(tmp_path / "sweep")]) == 2
    assert "of no known family" in capsys.readouterr().err and not (tmp_path / "sweep").exists()


def test_seeds_set_init_order_masks_and_dropout(tmp_path, tiny_llama_dir):
    sweep = _tiny_sweep(tmp_path, tiny_llama_dir, seeds=[0, 1],
                        method_structures=[["magnitude", "unstructured"], ["random", "unstructured"]])  # fmt: skip
    out = tmp_path / "sweep"
    assert main(["sweep", "plan", str(sweep), "--out", str(out)]) == 0
    seeds, params, masks = {}, {}, {}
    for seed in (0, 1):
        for method in ("magnitude", "random"):
            run_dir = out / "runs" / f"tiny__boolq__{method}__unstructured__s50__s2s__cpu__seed{seed}"
            record = json.loads((run_dir / "run.json").read_text())
            seeds[seed], masks[(method, seed)] = record["seeds"], record["assets"]["masks"]
            params[seed] = _params(run_dir)
    assert seeds[0] == {"sweep": 0, **derived_seeds(0)} and seeds[0] != seeds[1]
    for seed in (0, 1):  # what each derived seed controls, written into the run's params
        init = params[seed]["trainer"]["init"]
        loader = params[seed]["trainer"]["fit"]["train_dataloader"]
        assert init["model"]["sparse_lora"]["init_seed"] == seeds[seed]["lora_init"]
        assert loader["shuffle"] is True and loader["shuffle_seed"] == seeds[seed]["data_order"]
        assert init["seed"] == seeds[seed]["trainer"]
    assert masks[("random", 0)] != masks[("random", 1)] and masks[("magnitude", 0)] == masks[("magnitude", 1)]
    assert json.loads((out / "seeds.json").read_text())["roles"] == SEED_ROLES


def test_plan_gives_every_backend_the_same_protocol(tmp_path, tiny_llama_dir):
    from modelzoo_ext.run_config import load_run_config

    sweep = _tiny_sweep(tmp_path, tiny_llama_dir, backends=["cpu", "gpu", "cs3"])
    out = tmp_path / "sweep"
    assert main(["sweep", "plan", str(sweep), "--out", str(out)]) == 0
    params = {}
    for backend in ("cpu", "gpu", "cs3"):
        run_dir = out / "runs" / f"tiny__boolq__magnitude__unstructured__s50__s2s__{backend}__seed0"
        params[backend] = _params(run_dir)
        load_run_config(run_dir / "params.yaml")  # the trainer accepts the generated config
        command = (run_dir / "command.sh").read_text()
        assert {"cpu": "gpu_reference.train", "gpu": "torch.distributed.run", "cs3": "--num_csx"}[
            backend
        ] in command
        if backend == "cs3":  # cszoo fit, then the CS checkpoint -> the same merged export the trainer writes
            assert (
                "--target_device CSX" in command
                and "convert cs-to-hf" in command
                and "--as merged" in command
            )
    for p in params.values():  # only the output folder differs between backends
        p["trainer"]["init"].pop("model_dir")
        p["trainer"]["fit"].pop("ckpt_path", None)
    assert params["cpu"] == params["gpu"] == params["cs3"]
    sl = params["cpu"]["trainer"]["init"]["model"]["sparse_lora"]
    assert sl["mode"] == "sparse_to_sparse" and sl["mask_path"].endswith("s50.safetensors")
    assert params["cpu"]["trainer"]["init"]["loop"]["max_steps"] == 2
    rows = Registry(out / "registry.sqlite").runs()
    assert {r.status for r in rows} == {"planned"} and len(rows) == 3 * 2 + 2  # 6 fine-tunes + 2 no-fine-tune
    assert all(r.config_hash and r.git_rev and r.protocol == "offline" and r.seeds for r in rows)


def test_gpu_side_commands_of_a_tiny_point_run_on_cpu(tmp_path, tiny_llama_dir):
    """The torchrun command planned for a GPU run, with `--device cuda` swapped for cpu: the same
    params file and trainer as on a GPU node, under torchrun."""
    sweep = _tiny_sweep(tmp_path, tiny_llama_dir, backends=["gpu"])
    out = tmp_path / "sweep"
    assert main(["sweep", "plan", str(sweep), "--out", str(out)]) == 0
    run_id = "tiny__boolq__magnitude__unstructured__s50__s2s__gpu__seed0"
    run = json.loads((out / "runs" / run_id / "run.json").read_text())
    assert (
        main(["sweep", "run", str(out), "--only", run_id, "--stage", "train", "--max-attempts", "1"]) == 1
    )  # no CUDA here
    command = [("cpu" if word == "cuda" else word) for word in run["train_command"]]
    assert command[1:4] == ["-m", "torch.distributed.run", "--nproc-per-node=1"]  # torchrun
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "runs" / run_id / "train" / "run.json").read_text())
    assert record["complete"] and record["config"] == str(out / "runs" / run_id / "params.yaml")
    assert record["export"] == "merged" and record["masks_provenance"] == "the masks' source"


@pytest.mark.parametrize(
    "log, kind",
    [
        (
            "grpc._channel._InactiveRpcError: status = StatusCode.UNAVAILABLE details = 'failed to connect'",
            "transient",
        ),
        ("RuntimeError: Connection reset by peer", "transient"),
        ("OSError: [Errno 28] No space left on device", "stop"),
        ("OSError: [Errno 122] Disk quota exceeded", "stop"),
        ("ValueError: mask shape (64, 64) does not match weight (64, 128)", "permanent"),
        ("modelzoo_ext.errors.UserError: the loss became nan at step 3", "permanent"),
    ],
)
def test_failure_classification(log, kind):
    assert classify_failure(log) == kind


def _flaky(tmp_path: Path, failures: int, message: str) -> list[str]:
    """A command that fails `failures` times printing `message`, then succeeds."""
    counter = tmp_path / "count"
    code = (
        f"import pathlib,sys; p=pathlib.Path({str(counter)!r}); n=int(p.read_text()) if p.exists() else 0; "
        f"p.write_text(str(n+1)); print({message!r}) if n < {failures} else None; sys.exit(1 if n < {failures} else 0)"
    )
    return [sys.executable, "-c", code]


def test_transient_failure_is_retried_with_backoff(tmp_path):
    sleeps = []
    command = _flaky(tmp_path, 2, "StatusCode.UNAVAILABLE: appliance not reachable")
    attempts = run_with_retries(command, tmp_path / "log", max_attempts=4, backoff_s=1.5, sleep=sleeps.append)
    assert attempts == 3 and sleeps == [1.5, 3.0]
    assert (tmp_path / "log").read_text().count(
        "\nStatusCode.UNAVAILABLE"
    ) == 2  # printed output, not the echo


def test_permanent_failure_is_not_retried(tmp_path):
    sleeps = []
    command = _flaky(tmp_path, 5, "ValueError: bad config")
    with pytest.raises(StepFailed, match="permanent failure after 1 attempt"):
        run_with_retries(command, tmp_path / "log", max_attempts=4, backoff_s=1.0, sleep=sleeps.append)
    assert sleeps == [] and (tmp_path / "count").read_text() == "1"


def test_transient_failure_gives_up_after_max_attempts(tmp_path):
    command = _flaky(tmp_path, 9, "StatusCode.UNAVAILABLE")
    with pytest.raises(StepFailed, match="transient failure after 3"):
        run_with_retries(command, tmp_path / "log", max_attempts=3, backoff_s=0.0, sleep=lambda s: None)


def test_disk_full_stops(tmp_path):
    command = _flaky(tmp_path, 5, "OSError: [Errno 28] No space left on device")
    with pytest.raises(SweepStopped):
        run_with_retries(command, tmp_path / "log", max_attempts=4, backoff_s=0.0, sleep=lambda s: None)
    assert (tmp_path / "count").read_text() == "1"


@pytest.mark.slow
def test_tiny_cpu_sweep_end_to_end(tmp_path, tiny_llama_dir, capsys):
    sweep = _tiny_sweep(tmp_path, tiny_llama_dir)
    out = tmp_path / "sweep"
    assert main(["sweep", "plan", str(sweep), "--out", str(out)]) == 0
    assert main(["sweep", "run", str(out), "--backend", "cpu", "--stage", "train"]) == 0
    runs = {r.run_id: r for r in Registry(out / "registry.sqlite").runs()}
    assert Counter(r.status for r in runs.values()) == {
        "trained": 2,
        "planned": 2,
    }  # train stage: no evaluation
    assert main(["sweep", "eval", str(out)]) == 0  # the evaluation stage, as on another machine
    runs = {r.run_id: r for r in Registry(out / "registry.sqlite").runs()}
    assert len(runs) == 4 and {r.status for r in runs.values()} == {"succeeded"}, [
        r.error for r in runs.values()
    ]
    s2s = runs["tiny__boolq__magnitude__unstructured__s50__s2s__cpu__seed0"]
    s2d = runs["tiny__boolq__magnitude__unstructured__s50__s2d__cpu__seed0"]
    assert s2s.mask_sha256 == s2d.mask_sha256 and len(s2s.mask_sha256) == 64
    assert s2s.throughput_tokens_per_s > 0 and s2s.throughput["padding_policy"].startswith("trimmed")
    acc = s2s.metrics["boolq/acc"]
    assert acc["value"] in (0.0, 0.25, 0.5, 0.75, 1.0) and acc["ci95"][0] <= acc["value"] <= acc["ci95"][1]
    assert s2s.metrics["heldout/nll_per_token"]["n"] == 16  # eval.heldout_limit
    assert s2s.artifacts["model"].endswith("train/merged") and s2s.artifacts.get("adapter") is None
    assert s2d.artifacts["adapter"].endswith("train/adapter") and "assets/pruned" in s2d.artifacts["model"]
    evaluated = json.loads(Path(s2s.artifacts["eval"]).read_text())
    assert (
        evaluated["protocol"]["held_out_fraction"] == 0.2
        and evaluated["tasks"]["boolq"]["n_samples_evaluated"] == 4
    )
    # Resumable: a second run skips everything.
    capsys.readouterr()
    assert main(["sweep", "run", str(out)]) == 0
    assert '"skipped_finished": 4' in capsys.readouterr().out
    assert main(["sweep", "status", str(out)]) == 0
    assert "succeeded=4" in capsys.readouterr().out
    # Never a dense checkpoint in place of a sparse one.
    from modelzoo_ext.study.sweep import load_plan
    from modelzoo_ext.study.sweep.executor import check_sparse

    with pytest.raises(StepFailed, match="refusing to evaluate a dense checkpoint"):
        check_sparse(load_plan(out, s2d.run_id), str(tiny_llama_dir))


def _hub_schema_dir(root: Path, evaluated: int = 10, training: int = 24) -> Path:
    """The three tasks in the hub datasets' schema (train + evaluation split JSONL), cut from the
    bundled copies: evaluation rows first, training rows after them (disjoint)."""
    from modelzoo_ext.data.protocol import evaluation_split, split_rows

    for task in ("boolq", "hellaswag", "gsm8k"):
        rows = []
        for row in split_rows(task, evaluation_split(task), "bundled"):
            rows.append(row)
            if len(rows) == evaluated + training:
                break
        (root / task).mkdir(parents=True)
        for split, part in ((evaluation_split(task), rows[:evaluated]), ("train", rows[evaluated:])):
            (root / task / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return root


def _split_rows(data: Path, task: str) -> dict[str, list[dict]]:
    """split name -> rows of a hub-schema directory's JSONL files for `task`."""
    return {
        p.stem: [json.loads(x) for x in p.read_text().splitlines()] for p in (data / task).glob("*.jsonl")
    }


@pytest.mark.slow
def test_official_protocol_sweep_with_seeds_intervals_and_paired_report(tmp_path, tiny_llama_dir):
    """Issue 12's acceptance: local hub-schema data for the three tasks, 2 seeds, 2 sparsities,
    s2s/s2d/dense LoRA: plan -> run -> report with intervals and paired differences; training and
    evaluated example keys come from the splits named, and never overlap."""
    import csv

    from modelzoo_ext.data.prepare import key_digest
    from modelzoo_ext.data.protocol import evaluation_split
    from modelzoo_ext.data.templates import example_key

    data = _hub_schema_dir(tmp_path / "hub")
    sweep = _tiny_sweep(
        tmp_path, tiny_llama_dir, tasks=["boolq", "hellaswag", "gsm8k"], sparsities=[0.3, 0.6], seeds=[0, 1],
        baselines={"dense_lora": True, "no_finetune": True},
        data={"protocol": "official", "source": str(data), "max_seq_length": 512},
        eval={"limit": 3, "batch_size": 4, "max_gen_toks": 4},
    )  # fmt: skip
    out = tmp_path / "sweep"
    assert main(["sweep", "plan", str(sweep), "--out", str(out)]) == 0
    assert main(["sweep", "run", str(out), "--max-attempts", "1", "--parallel", "2"]) == 0
    runs = Registry(out / "registry.sqlite").runs()
    assert {r.status for r in runs} == {"succeeded"} and len(runs) == 3 * (2 * 2 * 2 + 2 + 1 + 2)
    assert {r.protocol for r in runs} == {"official"}
    for task in ("boolq", "hellaswag", "gsm8k"):  # the splits named, and nothing shared
        rows = _split_rows(data, task)
        train_keys = {key_digest(example_key(task, r)) for r in rows["train"]}
        eval_keys = {key_digest(example_key(task, r)) for r in rows[evaluation_split(task)]}
        trained_on = set(
            (out / "assets" / "data" / f"tiny__{task}" / "train" / "example_keys.txt").read_text().split()
        )
        assert trained_on and trained_on <= train_keys and not trained_on & eval_keys
        for run in (r for r in runs if r.task == task):
            scored = Path(run.artifacts["samples"]) / f"{task}.jsonl"
            assert {json.loads(x)["key"] for x in scored.read_text().splitlines()} <= eval_keys
    assert (
        main(["report", "--registry", str(out / "registry.sqlite"), "--out", str(tmp_path / "report")]) == 0
    )
    with open(tmp_path / "report" / "paired_official.csv", newline="") as f:
        paired = list(csv.DictReader(f))
    assert {r["comparison"] for r in paired} >= {"s2s - s2d", "s2s - dense-LoRA", "s2d - dense-LoRA"}
    assert all(
        r["seeds"] == "2" and float(r["ci95_low"]) <= float(r["difference"]) <= float(r["ci95_high"])
        for r in paired
    )
    with open(tmp_path / "report" / "scores_official.csv", newline="") as f:
        scores = list(csv.DictReader(f))
    assert any(r["interval"] == "t 95% interval over 2 seeds" for r in scores)


def test_replanning_with_another_config_moves_the_old_outputs_aside(tmp_path, tiny_llama_dir):
    """A run that failed after training under one config, replanned with another: its complete
    `train/run.json` must not be taken for the new config's training (the executor skips a complete
    training), so the old outputs move to `superseded/<old hash>/` and the record starts over."""
    from modelzoo_ext.study.sweep.records import read_record, update_record

    out = tmp_path / "sweep"
    assert main(["sweep", "plan", str(_tiny_sweep(tmp_path, tiny_llama_dir)), "--out", str(out)]) == 0
    run_dir = next((out / "runs").glob("*__s2s__*"))
    old = read_record(run_dir)
    (run_dir / "train").mkdir()
    (run_dir / "train" / "run.json").write_text(json.dumps({"complete": True}))
    (run_dir / "train.log").write_text("trained\n")
    update_record(run_dir, status="failed", error="evaluation failed")
    spec = yaml.safe_load((tmp_path / "sweep.yaml").read_text())
    spec["train"]["max_steps"] = spec["train"].get("max_steps", 2) + 1
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(spec))
    assert main(["sweep", "plan", str(tmp_path / "sweep.yaml"), "--out", str(out)]) == 0
    new = read_record(run_dir)
    assert new.status == "planned" and new.config_hash != old.config_hash
    assert not (run_dir / "train").exists() and not (run_dir / "train.log").exists()
    moved = run_dir / "superseded" / old.config_hash
    assert json.loads((moved / "train" / "run.json").read_text()) == {"complete": True}
    assert (moved / "train.log").read_text() == "trained\n"
    # the same config replanned: nothing moves, the record stays
    update_record(run_dir, status="failed", error="again")
    (run_dir / "train").mkdir()
    assert main(["sweep", "plan", str(tmp_path / "sweep.yaml"), "--out", str(out)]) == 0
    assert read_record(run_dir).status == "failed" and (run_dir / "train").is_dir()


def test_the_sweep_s_gpu_memory_settings_reach_the_gpu_command(tmp_path, tiny_llama_dir):
    """`gpu: {micro_batch_size, activation_checkpointing, sampled_product, fsdp}` become the trainer's options on GPU runs only;
    a micro-batch below 1 is refused when the sweep is loaded."""
    sweep = _tiny_sweep(tmp_path, tiny_llama_dir, backends=["gpu", "cpu"],
                        gpu={"nproc_per_node": 2, "micro_batch_size": "auto", "activation_checkpointing": True,
                             "fsdp": True, "sampled_product": "never"})  # fmt: skip
    assert main(["sweep", "plan", str(sweep), "--out", str(tmp_path / "out")]) == 0
    commands = {
        p.parent.name: json.loads(p.read_text())["train_command"]
        for p in (tmp_path / "out" / "runs").glob("*/run.json")
    }
    gpu = [c for name, c in commands.items() if "__gpu__" in name and c]
    cpu = [c for name, c in commands.items() if "__cpu__" in name and c]
    wanted = [
        "--micro-batch-size",
        "auto",
        "--activation-checkpointing",
        "--sampled-product",
        "never",
        "--fsdp",
    ]
    assert gpu and all(c[-6:] == wanted for c in gpu)
    assert cpu and not any("--micro-batch-size" in c or "--fsdp" in c for c in cpu)
    with pytest.raises(Exception, match="micro_batch_size"):
        load_sweep(_tiny_sweep(tmp_path, tiny_llama_dir, gpu={"micro_batch_size": 0}))
