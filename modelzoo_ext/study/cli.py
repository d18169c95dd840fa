"""Subcommands of the last pipeline stage: `eval`, `sweep plan|run|eval|assets|status`, `report`, `demo`.

Handlers import their modules (and through them torch, lm-eval, matplotlib) only when run, so
`sparse-lora --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from modelzoo_ext.study.preflight.cli import add_skip_preflight_argument

if TYPE_CHECKING:
    from modelzoo_ext.data.protocol import DataProtocol


def register(subparsers: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    """Add this stage's subcommands to `sparse-lora`."""
    _add_eval(subparsers)
    _add_sweep(subparsers, groups)
    _add_report(subparsers)
    _add_demo(subparsers)


# -- eval -----------------------------------------------------------------------------------------
def _add_eval(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate an HF model (optionally with a PEFT adapter): lm-eval BoolQ/HellaSwag/GSM8K, held-out loss",
        description="Run the installed lm-eval's built-in protocol (0.4.7 to 0.4.9.1: ModelZoo 2.6-2.10's pins; BoolQ acc 0-shot, HellaSwag acc_norm 0-shot, "
        "GSM8K 5-shot exact match strict+flexible) on an HF model directory, logging every example; with "
        "--loss-data, also the held-out loss (mean NLL of the completion tokens). Official protocol: the whole "
        "official evaluation split; offline protocol (--held-out-fraction): its held-out part. Local data "
        "sources keep the built-in prompts and metrics and swap only the data files.",
    )
    p.add_argument(
        "--model", required=True, help="HF model directory (config.json + safetensors + tokenizer)"
    )
    p.add_argument("--adapter", help="PEFT adapter directory to load on top of --model (s2d exports)")
    p.add_argument(
        "--tasks", default="boolq", help="comma list of boolq,hellaswag,gsm8k, or none (default: boolq)"
    )
    p.add_argument("--limit", type=int, help="evaluate only the first N documents per task (smoke tests)")
    p.add_argument(
        "--data",
        default="bundled",
        help="hub (downloads), bundled (the offline copies of the evaluation splits, default), or a "
        "directory in the hub datasets' schema (docs/data.md)",
    )
    p.add_argument(
        "--protocol",
        choices=("official", "offline"),
        help="official: the whole evaluation split; offline: its held-out part [default: offline when "
        "--held-out-fraction is given, else official]",
    )
    p.add_argument(
        "--held-out-fraction",
        type=float,
        help="offline protocol: the fraction of the evaluation split held out by `data prepare` (use the same "
        "fraction and salt as the fine-tuning data)",
    )
    p.add_argument("--split-salt", help="offline protocol: the split's salt (default: the data layer's)")
    p.add_argument(
        "--loss-data",
        metavar="DIR",
        help="also the held-out loss on this `data prepare --split heldout` directory (same tokenizer)",
    )
    p.add_argument(
        "--loss-limit", type=int, metavar="N", help="score only the first N examples of --loss-data"
    )
    p.add_argument(
        "--max-gen-toks", type=int, help="cap on generated tokens per GSM8K answer (CPU smoke runs)"
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:0, ... (default: cpu)")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (default: float32)")
    p.add_argument("--out", required=True, help="results JSON to write (per-example scores beside it)")
    p.set_defaults(func=_run_eval)


def eval_protocol(args) -> DataProtocol:
    """The `DataProtocol` of `eval`'s options (also used by the sweep's eval step)."""
    from modelzoo_ext.data.protocol import DataProtocol
    from modelzoo_ext.data.split import DEFAULT_SALT
    from modelzoo_ext.errors import UserError

    protocol = args.protocol or ("offline" if args.held_out_fraction is not None else "official")
    if protocol == "official" and (args.held_out_fraction is not None or args.split_salt):
        raise UserError(
            "--held-out-fraction / --split-salt select a held-out part: that is the offline protocol",
            fix="drop them, or pass --protocol offline",
        )
    if protocol == "offline" and args.held_out_fraction is None:
        raise UserError("the offline protocol needs --held-out-fraction", fix="e.g. --held-out-fraction 0.2")
    fraction = args.held_out_fraction if args.held_out_fraction is not None else 0.2
    return DataProtocol(protocol, args.data, fraction, args.split_salt or DEFAULT_SALT)


def _run_eval(args) -> int:
    from modelzoo_ext.study.evaluate import evaluate, parse_tasks, write_results

    protocol = eval_protocol(args)
    tasks = [] if args.tasks.strip().lower() == "none" else parse_tasks(args.tasks)
    results, samples = _check_eval_inputs(args, tasks)
    if tasks:
        results, samples = evaluate(
            args.model, tasks, protocol=protocol, adapter_dir=args.adapter, limit=args.limit,
            max_gen_toks=args.max_gen_toks, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
        )  # fmt: skip
    if args.loss_data:
        from modelzoo_ext.study.heldout_loss import heldout_loss

        results["heldout_loss"] = heldout_loss(
            args.model,
            args.loss_data,
            adapter_dir=args.adapter,
            batch_size=args.batch_size,
            device=args.device,
            limit=args.loss_limit,
        )
    write_results(results, args.out, samples)
    for task, entry in results.get("tasks", {}).items():
        shown = ", ".join(
            f"{k}={v['value']:.4f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]"
            for k, v in entry["primary"].items()
        )
        print(f"{task} ({entry['num_fewshot']}-shot, n={entry['n_samples_evaluated']}): {shown}")
    if "heldout_loss" in results:
        nll = results["heldout_loss"]["nll_per_token"]
        print(f"held-out loss (NLL per completion token, n={nll['n']} examples): {nll['value']:.4f} "
              f"[{nll['ci95'][0]:.4f}, {nll['ci95'][1]:.4f}]")  # fmt: skip
    print(f"wrote {args.out}")
    return 0


def _check_eval_inputs(args, tasks: list[str]) -> tuple[dict, dict]:
    """Refuse an evaluation that would do nothing; the results of one that does no lm-eval task."""
    from pathlib import Path

    from modelzoo_ext.errors import UserError

    if not tasks and not args.loss_data:
        raise UserError(
            "nothing to evaluate: --tasks none and no --loss-data", fix="name a task or pass --loss-data"
        )
    if not (Path(args.model) / "config.json").is_file():
        raise UserError("not a Hugging Face model directory (no config.json)", where=str(args.model))
    if args.adapter and not (Path(args.adapter) / "adapter_config.json").is_file():
        raise UserError("not a PEFT adapter directory (no adapter_config.json)", where=str(args.adapter))
    return {"model": str(Path(args.model).resolve()), "adapter": args.adapter, "tasks": {}}, {}


# -- sweep ----------------------------------------------------------------------------------------
def _add_sweep(subparsers, groups) -> None:
    sweep = subparsers.add_parser(
        "sweep",
        help="plan, run and inspect a grid of fine-tuning runs (cs3 | gpu | cpu backends)",
        description="A sweep YAML (models x tasks x listed (method, structure) pairs x sparsities x modes x "
        "backends x seeds, plus the baselines) becomes one run directory each with its params YAML (one for "
        "every backend), derived seeds, mask reference and command; `run` executes them resumably, each run "
        "writing its own record, and `status` rebuilds the SQLite registry from the records.",
    )
    sub = sweep.add_subparsers(dest="sweep_command", metavar="SUBCOMMAND", required=True)
    groups["sweep"] = sub

    plan = sub.add_parser("plan", help="expand a sweep YAML into run directories (checks everything first)")
    plan.add_argument("sweep_yaml", help="the sweep definition (see modelzoo_ext/study/examples/)")
    plan.add_argument(
        "--out", required=True, help="sweep directory to create (holds runs/ and registry.sqlite)"
    )
    plan.set_defaults(func=_run_sweep_plan)

    run = sub.add_parser("run", help="run the planned runs (resumable: finished work is skipped)")
    _add_run_arguments(run)
    run.add_argument(
        "--stage",
        choices=("all", "train", "eval"),
        default="all",
        help="train: up to checked exports (status trained); eval: evaluate trained runs (e.g. on a GPU node); "
        "all: both [default]",
    )
    run.set_defaults(func=_run_sweep_run)

    evaluate = sub.add_parser(
        "eval", help="evaluate the trained runs of a sweep (= sweep run --stage eval), where the GPU is"
    )
    _add_run_arguments(evaluate)
    evaluate.set_defaults(func=_run_sweep_run, stage="eval")

    assets = sub.add_parser(
        "assets",
        help="build the missing shared assets (data, masks, pruned models) of the runs not done, in this process",
        description="What `sweep run` does before it starts the runs, alone: every missing shared asset of the "
        "selected runs that are not done, built one at a time in this one process (tasks never build them: two "
        "building one asset at once would race). `sweep submit`'s assets job runs it before the job arrays. "
        "Exit status 1 when an asset failed (its log: DIR/assets/logs/).",
    )
    assets.add_argument("sweep_dir")
    assets.add_argument(
        "--backend",
        choices=("cs3", "gpu", "cpu"),
        help="only runs of this backend (and evaluation-only ones)",
    )
    assets.add_argument("--only", help="comma list of run ids")
    assets.add_argument("--run-list", metavar="FILE", help="the run ids in FILE, one per line (`INDEX<TAB>RUN_ID` "
                        "lines, as `sweep submit` writes its run lists, are read too)")  # fmt: skip
    assets.add_argument("--max-attempts", type=int, default=4, help="tries per step for transient failures")
    assets.add_argument("--backoff-s", type=float, default=30.0, help="first retry delay, doubled each retry")
    assets.set_defaults(func=_run_sweep_assets)

    status = sub.add_parser(
        "status",
        help="each run's status from its record (the registry rebuilt from them), beside its latest "
        "SLURM / PBS tasks' state when the sweep was submitted",
    )
    status.add_argument("sweep_dir")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.set_defaults(func=_run_sweep_status)


def _add_run_arguments(parser) -> None:
    parser.add_argument("sweep_dir")
    parser.add_argument("--backend", choices=("cs3", "gpu", "cpu"), help="only runs of this backend")
    parser.add_argument("--parallel", type=int, default=1, help="runs at once (default 1)")
    parser.add_argument("--max-attempts", type=int, default=4, help="tries per step for transient failures")
    parser.add_argument("--backoff-s", type=float, default=30.0, help="first retry delay, doubled each retry")
    parser.add_argument("--only", help="comma list of run ids")
    add_skip_preflight_argument(parser)  # `run --backend cs3` runs `sweep preflight` before any appliance job


def _run_sweep_plan(args) -> int:
    from modelzoo_ext.study.sweep import plan_sweep

    runs = plan_sweep(args.sweep_yaml, args.out)
    counts: dict[str, int] = {}
    for run in runs:
        counts[run["mode"]] = counts.get(run["mode"], 0) + 1
    print(
        f"planned {len(runs)} runs in {args.out}: " + ", ".join(f"{n} {m}" for m, n in sorted(counts.items()))
    )
    print(f"what each seed controls: {args.out}/seeds.json")
    return 0


def _run_sweep_run(args) -> int:
    from modelzoo_ext.study.sweep import run_sweep

    gate = None
    if args.backend == "cs3" and args.stage != "eval" and not args.skip_preflight:
        from modelzoo_ext.study.preflight.cli import preflight_gate

        gate = preflight_gate(
            args.sweep_dir, backend="cs3", concurrency=args.parallel, only=_selected_ids(args)
        )
    summary = run_sweep(
        args.sweep_dir,
        backend=args.backend,
        parallel=args.parallel,
        max_attempts=args.max_attempts,
        backoff_s=args.backoff_s,
        only=_selected_ids(args),
        stage=args.stage,
        before_runs=gate,
    )
    print(json.dumps(summary, sort_keys=True))
    return 0 if summary.get("failed", 0) == 0 and not summary.get("stopped_reason") else 1


def _selected_ids(args) -> list[str] | None:
    """The run ids of `--only ID,ID` and `--run-list FILE` (None: no selection by id)."""
    from pathlib import Path

    from modelzoo_ext.errors import UserError

    run_list = getattr(args, "run_list", None)
    if not args.only and not run_list:
        return None
    only = [r.strip() for r in (args.only or "").split(",") if r.strip()]
    if run_list:
        try:
            lines = Path(run_list).read_text().splitlines()
        except OSError as exc:
            raise UserError(f"cannot read the run list: {exc.strerror}", where=run_list) from exc
        only += [line.split("\t")[-1].strip() for line in lines if line.strip()]
    return only


def _run_sweep_assets(args) -> int:
    from modelzoo_ext.study.sweep import build_assets

    summary = build_assets(args.sweep_dir, backend=args.backend, only=_selected_ids(args),
                           max_attempts=args.max_attempts, backoff_s=args.backoff_s)  # fmt: skip
    print(f"shared assets of {summary['runs']} runs not done: built {len(summary['built'])}, "
          f"failed {len(summary['failed'])}")  # fmt: skip
    for path in summary["built"]:
        print(f"  built  {path}")
    for path, why in summary["failed"].items():
        print(f"  FAILED {path}: {why}")
    return 1 if summary["failed"] else 0


_STAGE_COLUMNS = ("train", "eval")


def _run_sweep_status(args) -> int:
    from modelzoo_ext.study.cluster.submit import task_states
    from modelzoo_ext.study.sweep import sweep_status

    rows = sweep_status(args.sweep_dir)
    tasks = task_states(args.sweep_dir, unreachable_ok=True)
    for row in rows:
        row["scheduler"] = {stage: task.to_dict() for stage, task in tasks.get(row["run_id"], {}).items()}
    if args.json:
        print(json.dumps(rows, indent=2, sort_keys=True))
        return 0
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
        tasks_shown = [
            f"{s}: {row['scheduler'][s]['describe']}" for s in _STAGE_COLUMNS if s in row["scheduler"]
        ]
        parts = [f"{row['run_id']:<60}", f"{row['status']:<10}", f"attempts={row['attempts']}", *tasks_shown]
        print("  ".join([*parts, row.get("error") or ""]).rstrip())
    print(" ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "no runs")
    jobs = {t.job_id: t for stages in tasks.values() for stage, t in stages.items() if stage == "assets"}
    for task in sorted(jobs.values(), key=lambda t: t.round):
        print(f"assets job, round {task.round}: {task.describe()}")
    return 0


# -- report ---------------------------------------------------------------------------------------
def _add_report(subparsers) -> None:
    p = subparsers.add_parser(
        "report",
        help="CSV + Markdown tables and PNG plots built only from a run registry",
        description="Per data protocol (never mixed): every score per grid point with its 95% interval (mean "
        "over seeds), paired differences on the same examples (s2s - s2d, each vs dense LoRA and vs no "
        "fine-tune) with a verdict, plots vs sparsity with error bars (no-fine-tune per method, dense LoRA per "
        "backend), training throughput per run with each backend's padding policy. Published numbers come "
        "only from --published CSV (with a citation column). See docs/experiments.md.",
    )
    p.add_argument(
        "--registry", required=True,
        help="a sweep's DIR/registry.sqlite (rebuilt from the sweep's run records first), or another registry",
    )  # fmt: skip
    p.add_argument("--out", required=True, help="output directory (replaced atomically)")
    p.add_argument(
        "--published",
        help="CSV of published results, joined on every key but value and citation: "
        "model,task,method,structure,sparsity,mode,metric,protocol,value,citation",
    )
    p.set_defaults(func=_run_report)


def _run_report(args) -> int:
    from modelzoo_ext.study.report import build_report

    written = build_report(args.registry, args.out, published_csv=args.published)
    for path in written:
        print(path)
    return 0


# -- demo -----------------------------------------------------------------------------------------
def _add_demo(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="the end-to-end demo on SmolLM2-135M (same as `make demo`)",
        description="SmolLM2-135M -> 50% magnitude masks -> s2s and s2d LoRA fine-tunes on CPU -> exports "
        "with zero-violation checks -> held-out loss and lm-eval BoolQ on held-out examples -> registry -> "
        "report with 95% intervals and paired comparisons (offline protocol).",
    )
    from modelzoo_ext.study.demo import add_demo_arguments

    add_demo_arguments(p)
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    from modelzoo_ext.study.demo import run_demo

    run_demo(args)
    return 0
