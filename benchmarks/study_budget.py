"""What a CPU study sweep costs: per-unit work measured on one thread, and the sweep's total.

    python benchmarks/study_budget.py modelzoo_ext/study/examples/sweep_smollm2_mini.yaml [--work DIR]

On a shared machine, wall time measures the neighbours; and a two-thread process's CPU time includes
the OpenMP spin-waits of a thread whose partner was descheduled, which overstated the work several-fold
here (load ~12 on 2 cores). So every unit is measured on ONE torch thread as process CPU time, which is
the work itself; a quiet 2-core machine does it in that time / --speedup (two threads against one).

Measured, in this process, on the sweep's own assets (planned into --work; data, masks and the pruned
model built by the sweep's own commands) and its first sparse point:
  train    s2d and s2s steps of the sweep's batch (--steps, the first excluded as warm-up), and the
           trainer's setup (model load, LoRA layers, masks)
  heldout  the held-out loss on 32 and on 128 examples: seconds per example and fixed cost
  lm-eval  BoolQ (the sweep's protocol) on 16 and on 64 questions: seconds per question and fixed cost
Then the sweep's total: per fine-tune, steps x step + evaluations during training x heldout_limit x
example + setup; per run, one evaluation (fixed costs + the held-out part's questions, or eval.limit,
+ heldout_limit examples), converted to a quiet 2-core machine's wall time with --speedup (default:
calibrated on the one quiet measurement on record, below). Printed as tables with the load averages.
Not counted: building the shared assets (data, masks, pruned models: minutes) and process start-up.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

# The one quiet measurement on record (docs/demo.md, "nothing else running"): s2d fine-tune of SmolLM2-135M,
# batch 4 x 256, two threads. Dividing it by this benchmark's one-thread s2d throughput on the same batch
# shape gives the factor from one-thread CPU seconds measured *now* (whatever the load) to quiet
# two-thread wall seconds, assuming the load slows every unit alike.
QUIET_S2D_TOKENS_PER_S = 137.0
QUIET_SHAPE = (4, 256)  # (batch, max_seq_length) of that measurement
SPEEDUP_NOTE = (
    "one-thread CPU s -> quiet 2-core wall s; default: docs/demo.md's quiet s2d throughput (137 tokens/s, "
    "batch 4 x 256) over this run's one-thread s2d tokens/s, when the sweep has that batch shape"
)


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = _clock()
    return wall - start[0], cpu - start[1]


def prepare(spec_path: Path, work: Path) -> tuple[object, dict, list]:
    """Plan the sweep into `work` and build the assets of its first sparse s2s/s2d point."""
    from modelzoo_ext.study.steps import StepPolicy
    from modelzoo_ext.study.sweep import load_plans, plan_sweep
    from modelzoo_ext.study.sweep.assets import AssetBuilder

    plan_sweep(spec_path, work)
    spec, plans = load_plans(work)
    pair = {}
    for plan in plans:
        if plan.mode in ("s2s", "s2d") and plan.seed == spec.seeds[0]:
            pair.setdefault(plan.sparsity, {})[plan.mode] = plan
    point = pair[min(pair)]
    failed = AssetBuilder(work, StepPolicy(max_attempts=1, backoff_s=0.0)).build_for(list(point.values()))
    if failed:
        raise SystemExit(f"assets failed: {failed}")
    return spec, point, plans


def train_costs(plan, steps: int) -> dict:
    """One-thread CPU seconds of the trainer's setup and per step (mean after the first), tokens per step."""
    from gpu_reference.step import train_step
    from gpu_reference.train import _micro_batches, setup

    base = plan.assets.pruned if plan.mode == "s2d" else plan.hf_dir
    start = _clock()
    state = setup(plan.params_path, base, plan.run_dir / "budget_train", "cpu", None, False, False)
    setup_s = _since(start)[1]
    trainable = [p for p in state.model.parameters() if p.requires_grad]
    rows = []
    for _ in range(steps):
        batches = _micro_batches(state)
        start = _clock()
        result = train_step(state.model, state.optimizer, trainable, batches, state.step_config)
        rows.append((_since(start)[1], result.tokens))
    kept = rows[1:] or rows
    return {
        "setup_cpu_s": setup_s,
        "step_cpu_s": sum(c for c, _ in kept) / len(kept),
        "tokens_per_step": sum(t for _, t in kept) / len(kept),
        "steps_measured": len(kept),
    }


def linear_cost(measure, small: int, large: int) -> dict:
    """(per-unit, fixed) one-thread CPU seconds from two sizes."""
    small_s, large_s = measure(small), measure(large)
    per_unit = (large_s - small_s) / (large - small)
    return {"per_unit_cpu_s": per_unit, "fixed_cpu_s": max(0.0, small_s - per_unit * small)}


def heldout_costs(model_dir: str, data_dir: str, batch_size: int) -> dict:
    from modelzoo_ext.study.heldout_loss import heldout_loss

    def measure(n: int) -> float:
        start = _clock()
        heldout_loss(model_dir, data_dir, batch_size=batch_size, limit=n)
        return _since(start)[1]

    return linear_cost(measure, 32, 128)


def lm_eval_costs(model_dir: str, spec) -> dict:
    from modelzoo_ext.data.protocol import DataProtocol
    from modelzoo_ext.study.evaluate import evaluate

    data = spec.data
    protocol = DataProtocol(
        data.protocol, data.source, held_out_fraction=data.held_out_fraction, salt=data.split_salt
    )

    def measure(n: int) -> float:
        start = _clock()
        evaluate(model_dir, list(spec.tasks), protocol=protocol, limit=n, batch_size=spec.eval.batch_size)
        return _since(start)[1]

    return linear_cost(measure, 16, 64)


def held_out_questions(heldout_dir: str) -> int:
    """Questions lm-eval scores in the held-out part (all of them, whatever their length)."""
    return int(json.loads((Path(heldout_dir) / "data_params.json").read_text())["counts"]["in_split"])


def sweep_total(spec, runs: list, costs: dict, questions: int, speedup: float) -> list[dict]:
    """Per kind of run: count, one-thread CPU seconds each, and the quiet-machine total in minutes."""
    ev = spec.eval
    examples = ev.heldout_limit or 0
    evaluation = (costs["lm_eval"]["fixed_cpu_s"] + costs["lm_eval"]["per_unit_cpu_s"] * (ev.limit or questions)
                  + costs["heldout"]["fixed_cpu_s"] + costs["heldout"]["per_unit_cpu_s"] * examples)  # fmt: skip
    steps = spec.train.max_steps or 0
    curve_points = steps // ev.heldout_every if ev.heldout_every else 0
    rows = []
    for kind, modes in (("s2s fine-tune", ("s2s",)), ("s2d fine-tune", ("s2d",)), ("dense LoRA", ("lora",)),
                        ("no fine-tune", ("none",))):  # fmt: skip
        count = sum(r.mode in modes for r in runs)
        train = costs["train"].get(modes[0]) or costs["train"]["s2d"]  # dense LoRA: an s2d-like step
        each = evaluation
        if modes[0] != "none":
            each += train["setup_cpu_s"] + steps * train["step_cpu_s"]
            each += curve_points * examples * costs["heldout"]["per_unit_cpu_s"]
        rows.append({"runs": kind, "count": count, "one-thread CPU s each": round(each),
                     "quiet 2-core minutes, all": round(count * each / speedup / 60, 1)})  # fmt: skip
    return rows


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("spec", type=Path, help="the sweep YAML (its models must exist)")
    parser.add_argument(
        "--work", type=Path, default=Path("build/study_budget"), help="planned sweep and assets"
    )
    parser.add_argument("--steps", type=int, default=5, help="training steps per mode (first excluded)")
    parser.add_argument("--speedup", type=float, help=SPEEDUP_NOTE)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)
    load_start = os.getloadavg()
    spec, point, runs = prepare(args.spec, args.work.resolve())
    s2d = point["s2d"]
    costs = {"train": {mode: train_costs(run, args.steps) for mode, run in point.items()}}
    costs["heldout"] = heldout_costs(s2d.assets.pruned, s2d.assets.heldout, spec.eval.batch_size)
    costs["lm_eval"] = lm_eval_costs(s2d.assets.pruned, spec)
    questions = held_out_questions(s2d.assets.heldout)
    load_end = os.getloadavg()
    s2d_rate = costs["train"]["s2d"]["tokens_per_step"] / costs["train"]["s2d"]["step_cpu_s"]
    speedup = args.speedup
    if speedup is None:
        if (spec.train.batch_size, spec.data.max_seq_length) != QUIET_SHAPE:
            raise SystemExit(f"the sweep's batch shape is not {QUIET_SHAPE}: pass --speedup")
        speedup = QUIET_S2D_TOKENS_PER_S / s2d_rate
    print(f"\n{args.spec.name}: one torch thread; load average {load_start[0]:.1f} at start, {load_end[0]:.1f} at end "
          f"({os.cpu_count()} CPUs); speedup {speedup:.2f} ({SPEEDUP_NOTE})")  # fmt: skip
    unit_rows = [{"unit": f"train step, {m}, batch {spec.train.batch_size}", "one-thread CPU s": c["step_cpu_s"],
                  "note": f"{c['tokens_per_step']:.0f} non-padding tokens/step, {c['tokens_per_step'] / c['step_cpu_s']:.1f} tokens/s, "
                  f"mean of {c['steps_measured']} steps"} for m, c in costs["train"].items()]  # fmt: skip
    unit_rows += [{"unit": f"trainer setup, {m}", "one-thread CPU s": c["setup_cpu_s"], "note": "model, LoRA, masks"}
                  for m, c in costs["train"].items()]  # fmt: skip
    for name, unit in (("heldout", "held-out loss example"), ("lm_eval", "lm-eval BoolQ question")):
        unit_rows += [{"unit": unit, "one-thread CPU s": costs[name]["per_unit_cpu_s"], "note": "slope"},
                      {"unit": f"{unit}s: fixed", "one-thread CPU s": costs[name]["fixed_cpu_s"],
                       "note": "model load, task setup"}]  # fmt: skip
    print_table("Per unit", unit_rows)
    rows = sweep_total(spec, runs, costs, questions, speedup)
    total = sum(r["quiet 2-core minutes, all"] for r in rows)
    rows.append({"runs": "total (assets not included)", "count": sum(r["count"] for r in rows),
                 "one-thread CPU s each": "", "quiet 2-core minutes, all": round(total, 1)})  # fmt: skip
    print_table(f"The sweep ({questions} held-out questions, {spec.train.max_steps} steps)", rows)


if __name__ == "__main__":
    main()
