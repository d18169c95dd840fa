"""TensorBoard event files of a reference run, under the tags a ModelZoo run writes.

`cszoo fit` writes its curves to `<model_dir>/events/events.out.tfevents.*` (ModelZoo's
`TensorBoardLogger`); the reference trainer writes the same tags to `RUN_DIR/events/`, so one
`tensorboard --logdir DIR` over both overlays a CS-3 run and its GPU twin. The default RUN_DIR,
`<model_dir>/gpu_reference`, already sits beside the CS run's `events/`.

The tags are ModelZoo 2.10's (read from the events of a tiny `cszoo fit` on the CPU backend;
`tests/test_gpu_reference_parity.py` compares the two sets on every `make test-slow`). One value
per optimizer step, at the step number ModelZoo uses (the global step after the update):

    loss                            the step's training loss (ModelZoo's loss callback)   = metrics.jsonl loss
    lr/0, lr/1                      learning rate per parameter group (LogOptimizerParamGroup): ModelZoo's
                                    two groups, with and without weight decay (it keeps the second even when
                                    empty); every group has the step's learning rate   = metrics.jsonl lr
    model_wise_params_norm          norm of the trainable parameters before the step (ComputeNorm)
    model_wise_grad_norm            norm of the step's gradients before clipping (ComputeNorm)
    per_layer_grad_norm/layer_{i}   the same over decoder layer i's parameters (ComputeNorm)
    local_samples_per_sec           samples/s since the previous step, smoothed as cerebras.pytorch's
                                    RateTracker smooths it (0.6 x new + 0.4 x previous; RateProfiler)
    avg_samples_per_sec             samples / seconds since the loop started (RateProfiler)
    avg_steps_per_sec               avg_samples_per_sec / batch_size (RateProfiler)
    loop_time_remaining, time_remaining
                                    seconds left at the mean step time so far (DurationProfiler's estimate)
    validate_0/loss                 the mean validation loss of an evaluation   = metrics.jsonl eval row

Not written: ModelZoo's per-batch `validate_0/val_loss`, its validation metrics
(`validate_0/eval/lm_perplexity`, `validate_0/eval/accuracy`) and validation rates. ModelZoo
logs every `logging.log_steps` steps; this writer logs every step (TensorBoard overlays both).

Resume: the writer is opened with `purge_step` = the resumed step + 1, so TensorBoard hides the
steps an interrupted run wrote after its last checkpoint (its `SessionLog.START` purge); the
rerun writes them again. `metrics.jsonl` drops the same rows.

The `tensorboard` package is a requirement of this package; where it is missing anyway the run
goes on without events, says so once on stderr and records why in `run.json` (`tensorboard`).
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

EVENTS_DIR = "events"
# ModelZoo's ComputeNorm: the layer of a parameter is the number after `layers.` in its name.
LAYER_PATTERN = re.compile(r".*(layers\.)(\d+)(\.).*")
MODELZOO_PARAM_GROUPS = 2  # with and without weight decay (configure_param_groups)
EVAL_SCOPE = "validate_0/"  # ModelZoo's name scope of the first validation dataloader
NOT_INSTALLED = "the tensorboard package is not installed (pip install tensorboard)"


class RateTracker:
    """The formulas of cerebras.pytorch's `RateTracker` (not imported: gpu_reference never
    imports cerebras): a smoothed rate since the previous query, and a global rate."""

    SMOOTH_FACTOR = 0.4

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.start = self.last = clock()
        self.pending = self.total = 0
        self.smoothed: float | None = None

    def add(self, count: int) -> None:
        self.pending += count
        self.total += count

    def rate(self) -> float:
        now = self.clock()
        delta = now - self.last
        if delta <= 0:
            return 0.0
        current = self.pending / delta
        smoothed = (
            current
            if self.smoothed is None
            else (1 - self.SMOOTH_FACTOR) * current + self.SMOOTH_FACTOR * self.smoothed
        )
        self.pending, self.last, self.smoothed = 0, now, smoothed
        return smoothed

    def global_rate(self) -> float:
        delta = self.clock() - self.start
        return self.total / delta if delta > 0 else 0.0


def _norm(tensors: Iterable[torch.Tensor]) -> float:
    norms = [t.detach().float().norm() for t in tensors]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


class TensorBoardWriter:
    """Writes a run's events (rank 0); every method is a no-op when disabled or not installed."""

    def __init__(
        self,
        run_dir: str | Path,
        model: torch.nn.Module,
        *,
        batch_size: int,
        max_steps: int,
        resume_step: int = 0,
        enabled: bool = True,
    ) -> None:
        self.directory = Path(run_dir) / EVENTS_DIR
        self.batch_size, self.max_steps, self.resume_step = batch_size, max_steps, resume_step
        self.writer = None
        self.reason: str | None = None
        self.tags: set[str] = set()
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.reason = NOT_INSTALLED
            print(f"gpu_reference: TensorBoard events not written: {NOT_INSTALLED}", file=sys.stderr)
            return
        self.writer = SummaryWriter(
            log_dir=str(self.directory), purge_step=resume_step + 1 if resume_step else None
        )
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.trainable = [p for _, p in named]
        self.layers: dict[str, list[torch.nn.Parameter]] = {}
        for name, param in named:
            if match := LAYER_PATTERN.match(name):
                self.layers.setdefault(match.group(2), []).append(param)
        self.grad_norms: dict[str, float] = {}
        self.params_norm: float | None = None
        self.rate = RateTracker()

    @property
    def active(self) -> bool:
        return self.writer is not None

    def before_step(self) -> None:
        """The trainable parameters' norm before the update (ComputeNorm reads it before backward)."""
        if self.active:
            self.params_norm = _norm(self.trainable)

    def read_gradients(self) -> None:
        """`train_step`'s `on_grads`: gradient norms of the whole step, before clipping."""
        grads = {
            layer: [p.grad for p in params if p.grad is not None] for layer, params in self.layers.items()
        }
        self.grad_norms = {
            "model_wise_grad_norm": _norm(p.grad for p in self.trainable if p.grad is not None),
            **{f"per_layer_grad_norm/layer_{layer}": _norm(g) for layer, g in grads.items() if g},
        }

    def write_step(self, step: int, loss: float, lr: float, samples: int) -> None:
        """Everything ModelZoo logs for a training step; `step` counts from 1."""
        if not self.active:
            return
        self.rate.add(samples)
        avg = self.rate.global_rate()
        seconds_per_step = (self.rate.clock() - self.rate.start) / (step - self.resume_step)
        remaining = (self.max_steps - step) * seconds_per_step
        scalars = {
            "loss": loss,
            **{f"lr/{group}": lr for group in range(MODELZOO_PARAM_GROUPS)},
            "model_wise_params_norm": self.params_norm,
            **self.grad_norms,
            "local_samples_per_sec": self.rate.rate(),
            "avg_samples_per_sec": avg,
            "avg_steps_per_sec": avg / self.batch_size,
            "loop_time_remaining": remaining,
            "time_remaining": remaining,
        }
        self._write(scalars, step)

    def write_eval(self, step: int, loss: float) -> None:
        if self.active:
            self._write({EVAL_SCOPE + "loss": loss}, step)

    def _write(self, scalars: dict[str, Any], step: int) -> None:
        for tag, value in scalars.items():
            if value is not None:
                self.writer.add_scalar(tag, float(value), step)
                self.tags.add(tag)
        self.writer.flush()  # per step, as metrics.jsonl: a killed run keeps its curves

    def close(self) -> None:
        if self.active:
            self.writer.close()

    def record(self) -> dict[str, Any]:
        """For run.json: where the events are and which tags they hold, or why there are none."""
        if not self.active:
            return {"written": False, "reason": self.reason}
        return {
            "written": True,
            "dir": EVENTS_DIR,
            "tags": sorted(self.tags),
            "purge_step": self.resume_step + 1 if self.resume_step else None,
        }
