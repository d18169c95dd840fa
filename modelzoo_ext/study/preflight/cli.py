"""`sparse-lora preflight` and `sparse-lora sweep preflight`, and the gate `sweep run` / `submit` call.

    sparse-lora preflight PARAMS.yaml [--hf-model DIR] [--masks FILE] [--data DIR] [--backend cs3|gpu|cpu]
                          [--device-memory 80GB --gpus N] [--work DIR] [--no-twin] [--json]
    sparse-lora sweep preflight DIR [--backend cs3|gpu|cpu] [--parallel N] [--device-memory 80GB]
                          [--no-twin] [--rerun] [--json]

Both print one table (check, status, detail) and exit 2 with the reasons when anything failed.
`preflight_gate` is what `sweep run --backend cs3` and `sweep submit` run first (unless
`--skip-preflight`): the same sweep preflight, its table on stderr, nothing started on a failure.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path


def register(subparsers: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    """Add `preflight` and `sweep preflight`."""
    _add_preflight(subparsers)
    _add_sweep_preflight(groups["sweep"])


def _add_preflight(subparsers) -> None:
    p = subparsers.add_parser(
        "preflight",
        help="check a run config the way it will run, before any cluster time is spent",
        description="Checks, cheapest first: the run config against the installed ModelZoo's config classes "
        "(as cszoo fit validates) and the reference trainer's; config.json; the checkpoints it writes; the mask "
        "callback's run-time rules and the mask file against the model; mask provenance; the data against the "
        "model (vocabulary, tokenizer, sequence length, enough examples); the memory per GPU (gpu); a scaled-down "
        "twin (2 layers, width 64, the same YAML, callbacks, mask recipe and data) trained 2 steps through cszoo "
        "fit on ModelZoo's CPU backend and the reference trainer, losses compared; the disk budget. One table; "
        "exit 2 when a check failed. See docs/cluster.md, 'Preflight'.",
    )
    p.add_argument("params", metavar="PARAMS_YAML", help="the run config (ModelZoo trainer layout)")
    p.add_argument(
        "--hf-model", metavar="DIR", help="the HF model directory (config.json; weights for provenance)"
    )
    p.add_argument("--masks", metavar="FILE", help="a mask file overriding sparse_lora.mask_path")
    p.add_argument(
        "--data", metavar="DIR", help="prepared training data overriding train_dataloader.data_dir"
    )
    p.add_argument("--backend", choices=("cs3", "gpu", "cpu"), help="[default: the params' backend_type]")
    p.add_argument("--device-memory", metavar="SIZE", help="gpu: one device's memory, e.g. 80GB")
    p.add_argument("--gpus", type=int, default=1, help="gpu: processes (torchrun --nproc-per-node) [1]")
    p.add_argument(
        "--micro-batch-size", metavar="N|auto|none", help="gpu: as the trainer's option [the run config's]"
    )
    p.add_argument("--activation-checkpointing", action="store_true", help="gpu: as the trainer's option")
    p.add_argument("--fsdp", action="store_true", help="gpu: as the trainer's option")
    p.add_argument("--sampled-product", choices=("auto", "never", "always"), default="auto",
                   help="gpu: as the trainer's option [auto]")  # fmt: skip
    p.add_argument(
        "--epochs", type=float, default=1.0,
        help="how many times the run may go through its training data (max_steps x batch) [1]",
    )  # fmt: skip
    p.add_argument("--work", metavar="DIR", help="where the twin is built [a temporary directory]")
    p.add_argument("--no-twin", action="store_true", help="leave out the scaled-down twin")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.set_defaults(func=_run_preflight)


def _add_sweep_preflight(sweep) -> None:
    p = sweep.add_parser(
        "preflight",
        help="check every distinct configuration of a planned sweep once, and its disk budget",
        description="Groups the runs that still have training by model, task, mode, mask method/structure and "
        "backend, runs the preflight checks once per group (mask files and data once each), one scaled-down "
        "twin per group without its backend (remembered while its inputs stay the same), and the disk budget of "
        "every run with work left plus the assets still to build. Writes DIR/preflight/report.txt/.json.",
    )
    p.add_argument("sweep_dir")
    p.add_argument("--backend", choices=("cs3", "gpu", "cpu"), help="only runs of this backend")
    p.add_argument("--only", help="comma list of run ids")
    p.add_argument("--parallel", type=int, default=1, help="runs training at once (for the disk peak) [1]")
    p.add_argument(
        "--device-memory", metavar="SIZE", help="gpu: one device's memory [the sweep's gpu.device_memory]"
    )
    p.add_argument("--no-twin", action="store_true", help="leave out the scaled-down twins")
    p.add_argument("--rerun", action="store_true", help="train the twins again even where remembered")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.set_defaults(func=_run_sweep_preflight)


def add_skip_preflight_argument(parser: argparse.ArgumentParser) -> None:
    """`--skip-preflight` for the commands that run `preflight_gate` first."""
    parser.add_argument(
        "--skip-preflight", action="store_true", help="do not run `sweep preflight` first (not recommended)"
    )


def _show(report, as_json: bool) -> int:
    from modelzoo_ext.study.preflight.report import dumps

    print(dumps(report) if as_json else report.table())
    report.refuse_if_failed()
    return 0


def _run_preflight(args) -> int:
    import shutil
    import tempfile

    from modelzoo_ext.study.preflight.configuration import preflight_params
    from modelzoo_ext.study.preflight.subject import subject_from_options

    subject = subject_from_options(
        args.params, hf_model=args.hf_model, masks=args.masks, data=args.data, backend=args.backend,
        gpus=args.gpus, device_memory=args.device_memory, micro_batch_size=args.micro_batch_size,
        activation_checkpointing=args.activation_checkpointing, fsdp=args.fsdp,
        sampled_product=args.sampled_product, allowed_epochs=args.epochs,
    )  # fmt: skip
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="sparse-lora-preflight-"))
    report = preflight_params(subject, work, twin=not args.no_twin)
    if not args.work and report.ok:
        shutil.rmtree(work, ignore_errors=True)
        report.notes[-1] = "work directory: removed (everything passed)"
    return _show(report, args.json)


def _run_sweep_preflight(args) -> int:
    from modelzoo_ext.study.preflight.sweep import preflight_sweep

    only = [r.strip() for r in args.only.split(",")] if args.only else None
    report = preflight_sweep(
        args.sweep_dir, backend=args.backend, only=only, twin=not args.no_twin, rerun=args.rerun,
        concurrency=args.parallel, device_memory=args.device_memory,
    )  # fmt: skip
    return _show(report, args.json)


def preflight_gate(
    sweep_dir: str | Path, *, backend: str | None, concurrency: int, only: list[str] | None = None
) -> Callable[[], None]:
    """What `sweep run --backend cs3` and `sweep submit` run before starting anything: the sweep
    preflight of the runs they would start; its table on stderr; `PreflightRefused` (exit 2) when
    a check failed."""

    def gate() -> None:
        from modelzoo_ext.study.preflight.sweep import preflight_sweep

        report = preflight_sweep(sweep_dir, backend=backend, only=only, concurrency=concurrency)
        print(report.table(), file=sys.stderr, flush=True)
        report.refuse_if_failed()

    return gate


def preflight_before_submit(args: argparse.Namespace, sweep_dir: Path) -> None:
    """`sweep submit`'s first step: the preflight of the runs it would submit (skipped with
    `--skip-preflight`, which it says). Every run of an array may train at once unless
    `--max-concurrent` throttles it: that is the disk budget's peak."""
    if getattr(args, "skip_preflight", False):
        print("preflight skipped (--skip-preflight)", file=sys.stderr)
        return
    preflight_gate(sweep_dir, backend=args.backend, concurrency=args.max_concurrent or 10**6)()
