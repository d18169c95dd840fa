"""`sparse-lora parity`: do a Cerebras run and a gpu_reference run compute the same losses?

Losses of the CS run come from its loss log (`modelzoo_ext.loss_log`, written by this package's
`SparseLoRALossLog` callback, full precision) or, without it, from ModelZoo's TensorBoard
events (`loss` scalars of the training writer); the GPU run's from `<gpu-run>/metrics.jsonl`.
Both are keyed by optimizer step; the steps both runs have are compared:

    rel_diff(step) = |loss_cs - loss_gpu| / max(|loss_cs|, tiny)

The table goes to stdout, the plot to a PNG, and the last line is the largest relative
difference. Exit status 0 when it is <= rtol, 1 above, 2 for unusable input.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from modelzoo_ext.atomic import atomic_file
from modelzoo_ext.errors import UserError
from modelzoo_ext.loss_log import LOSS_LOG_NAME, loss_log_path, read_loss_log

TINY = 1e-12


def cs_losses(run_dir: str | Path) -> dict[int, float]:
    """step -> training loss of a ModelZoo run directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError("CS run directory not found", where=str(run_dir))
    rows = read_loss_log(loss_log_path(run_dir))
    if rows:
        return {step: row.loss for step, row in rows.items()}
    return _tensorboard_losses(run_dir)


def _tensorboard_losses(run_dir: Path) -> dict[int, float]:
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError as exc:
        raise UserError(
            f"no {LOSS_LOG_NAME} in the CS run and tensorboard is not installed to read its events",
            where=str(run_dir),
            fix="pip install tensorboard, or add the SparseLoRALossLog callback to the run config",
        ) from exc
    losses: dict[int, float] = {}
    for events in sorted(run_dir.rglob("events.out.tfevents.*")):
        if any(part in ("eval", "validate") for part in events.relative_to(run_dir).parts):
            continue
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            if tag == "loss" or (tag.endswith("/loss") and "val" not in tag and "eval" not in tag):
                losses.update({int(e.step): float(e.value) for e in acc.Scalars(tag)})
    if not losses:
        raise UserError(
            "no training losses found in the CS run",
            where=str(run_dir),
            fix=f"add the SparseLoRALossLog callback ({LOSS_LOG_NAME})",
        )
    return losses


def gpu_losses(run_dir: str | Path) -> dict[int, float]:
    """step -> training loss of a gpu_reference run directory."""
    from gpu_reference.metrics import METRICS_FILE, read_metrics

    rows = read_metrics(Path(run_dir) / METRICS_FILE)
    if not rows:
        raise UserError(
            "no metrics.jsonl rows in the GPU run",
            where=str(run_dir),
            fix="point --gpu-run at a gpu_reference run directory",
        )
    return {int(r["step"]): float(r["loss"]) for r in rows if r.get("split", "train") == "train"}


def compare(cs: dict[int, float], gpu: dict[int, float]) -> list[tuple[int, float, float, float]]:
    """(step, cs loss, gpu loss, relative difference) for every step both runs logged."""
    steps = sorted(set(cs) & set(gpu))
    if not steps:
        raise UserError(
            f"the runs share no step (CS steps {sorted(cs)[:5]}..., GPU steps {sorted(gpu)[:5]}...)",
            fix="compare runs of the same config",
        )
    return [(s, cs[s], gpu[s], abs(cs[s] - gpu[s]) / max(abs(cs[s]), TINY)) for s in steps]


def plot(rows: list[tuple[int, float, float, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r[0] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r[1] for r in rows], label="Cerebras (cszoo fit)", marker="o", markersize=3)
    ax.plot(steps, [r[2] for r in rows], label="gpu_reference", linestyle="--", marker="x", markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(f"loss parity: max relative difference {max(r[3] for r in rows):.2e}")
    ax.legend()
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def run_parity(args: argparse.Namespace) -> int:
    """Handler of `sparse-lora parity`."""
    cs, gpu = cs_losses(args.cs_run), gpu_losses(args.gpu_run)
    rows = compare(cs, gpu)
    print(f"{'step':>6} {'cs_loss':>14} {'gpu_loss':>14} {'rel_diff':>10}")
    for step, a, b, rel in rows:
        print(f"{step:>6} {a:>14.8f} {b:>14.8f} {rel:>10.2e}")
    for run, losses in (("CS", cs), ("GPU", gpu)):
        if len(losses) > len(rows):
            print(f"({len(losses) - len(rows)} {run} steps have no counterpart and were not compared)")
    plot_path = Path(args.plot) if args.plot else Path(args.gpu_run) / "parity.png"
    plot(rows, plot_path)
    print(f"plot: {plot_path}")
    worst = max(rows, key=lambda r: r[3])
    verdict = "ok" if worst[3] <= args.rtol else "FAIL"
    print(
        f"max relative difference {worst[3]:.3e} at step {worst[0]} over {len(rows)} steps (rtol {args.rtol:g}): {verdict}"
    )
    return 0 if verdict == "ok" else 1
