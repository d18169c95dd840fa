"""The reference sparse-LoRA trainer: one flat recipe, setup -> loop -> save.

    python -m gpu_reference.train PARAMS_YAML --hf-model HF_DIR [--out RUN_DIR] [--device cuda|cpu]
    torchrun --nproc-per-node N -m gpu_reference.train PARAMS_YAML --hf-model HF_DIR ... [--fsdp]
    sparse-lora train PARAMS_YAML --hf-model HF_DIR ...            (the same command)

It reads the run config the Cerebras run reads (`params_sparse_lora*.yaml`) and computes what
ModelZoo's Trainer computes on it: the transformers model from HF_DIR with the shared sparse-LoRA
layers (`modelzoo_ext.sparse_lora`), ModelZoo's GPT loss (`gpu_reference.loss`; for Mixtral plus ModelZoo's router load-balancing loss),
cerebras-pytorch's AdamW/SGD and per-step LR formulas (`gpu_reference.optim`,
`gpu_reference.schedulers`), gradient clipping, bf16 autocast when `precision.enabled`, gradient
accumulation (`gpu_reference.step`), and the batches `GptHDF5MapDataProcessor` yields for the
same seed (`gpu_reference.data`).

Before any weight is read, the HF directory's config.json is checked against the run config and
the mask file's provenance against the directory (`gpu_reference.model`).

Under torchrun each rank takes a slice of every global batch; the loss of a slice is its summed
token loss divided by the *global* token count and gradients are summed over ranks, so N
processes compute what one process computes on the whole batch. With `--fsdp` the frozen base is
sharded across the ranks (`gpu_reference.distributed`); the LoRA factors, the optimizer and
everything below stay as they are, and rank 0 builds the exports from the base on disk plus the
trained factors.

RUN_DIR (rank 0 writes it):
    metrics.jsonl           one row per step (see gpu_reference.metrics)
    events/                 TensorBoard events under the tags a ModelZoo run writes (gpu_reference.tensorboard)
    checkpoints/step_N.pt   LoRA factors + optimizer + RNG, every `checkpoint.steps` and at the end;
                            the newest n kept with `KeepNCheckpoints: {n: ...}` (as ModelZoo);
                            rerunning the same command resumes from the latest one
    lora.safetensors, masks.safetensors, adapter/ or merged/, sparsity_report.json
                            the exports (`gpu_reference.export`)
    run.json                provenance: config sha256, model, masks, data, versions, ignored keys (with
                            their reasons), the architecture check, the TensorBoard record
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from gpu_reference.checkpoint import (
    CheckpointRetention,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from gpu_reference.data import collate, global_batches, rank_slice
from gpu_reference.distributed import check_fsdp_request, load_lora_factors_, lora_factors, shard_frozen_base
from gpu_reference.evaluate import Validation, validation_loss
from gpu_reference.export import export_run, whole_model
from gpu_reference.loss import RouterLoss
from gpu_reference.metrics import MetricsWriter, peak_memory_bytes
from gpu_reference.micro_batch import AUTO, probe_micro_batch
from gpu_reference.model import BaseModel, check_hf_config, load_hf_model, load_masks, open_base
from gpu_reference.optim import build_optimizer
from gpu_reference.run_plan import (
    CheckedMemory,
    check_memory,
    not_fitting,
    plan_device,
    planned_world_size,
    with_probe,
)
from gpu_reference.run_record import is_complete
from gpu_reference.schedulers import build_lr_schedule
from gpu_reference.step import StepConfig, train_step
from gpu_reference.tensorboard import TensorBoardWriter
from gpu_reference.train_args import MemoryOptions, add_train_arguments
from modelzoo_ext.atomic import atomic_file
from modelzoo_ext.data.hdf5 import SampleDataset, read_params
from modelzoo_ext.errors import UserError
from modelzoo_ext.run_config import RunConfig, load_run_config
from modelzoo_ext.versions import run_versions


@dataclass
class Run:
    """Everything the loop and the save need, built by `setup`."""

    cfg: RunConfig
    params_yaml: Path
    config_sha256: str
    hf_model: Path
    run_dir: Path
    rank: int
    world_size: int
    device: torch.device
    fsdp: bool
    base: BaseModel
    model: torch.nn.Module
    summary: Any
    masks: dict[str, torch.Tensor]
    masks_file: str | None
    mask_metadata: dict[str, Any]
    mask_provenance: str | None
    optimizer: torch.optim.Optimizer
    lr_at: Any
    step_config: StepConfig
    dataset: SampleDataset
    batches: Any
    memory: CheckedMemory
    options: MemoryOptions
    start_step: int = 0
    tensorboard: dict[str, Any] | None = None  # what run_loop's TensorBoardWriter wrote (rank 0)
    peak_bytes: int | None = None  # this rank's peak memory over the loop (metrics.peak_memory_bytes)
    retention: CheckpointRetention | None = None  # KeepNCheckpoints of the run config (set by `setup`)


# ----------------------------------------------------------------------------- setup
def _distributed(device_arg: str | None) -> tuple[int, int, torch.device]:
    """(rank, world_size, device); initialises the process group under torchrun (gloo on CPU, NCCL on CUDA)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    wants_cuda = device_arg == "cuda" or (device_arg is None and torch.cuda.is_available())
    if wants_cuda and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but CUDA is not available", fix="pass --device cpu")
    if wants_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


def _step_config(cfg: RunConfig, world_size: int, device: torch.device, micro_batch_size: int) -> StepConfig:
    precision = cfg.init.precision
    return StepConfig(
        micro_batch_size=micro_batch_size,
        batch_size=cfg.fit.train_dataloader.batch_size,
        loss_scaling=cfg.init.model.loss_scaling,
        loss_weight=cfg.init.model.loss_weight,
        autocast=bool(precision and precision.enabled),
        max_norm=precision.max_gradient_norm if precision else None,
        max_value=precision.max_gradient_value if precision else None,
        world_size=world_size,
        device=device,
        router=RouterLoss.from_model_section(cfg.model_section),
    )


def setup(
    params_yaml: str | Path, hf_model: str | Path, out: str | Path | None, device_arg: str | None,
    masks_path: str | Path | None, fsdp: bool, skip_provenance_check: bool, memory: MemoryOptions | None = None,
) -> Run:  # fmt: skip
    """Config, processes, checks and the memory plan (before any weight is read), model, masks,
    optimizer, data, micro-batch, resume."""
    from modelzoo_ext.sparse_lora import apply_sparse_lora_

    memory = memory or MemoryOptions()
    cfg = load_run_config(params_yaml)
    rank, world_size, device = _distributed(device_arg)
    if fsdp:
        check_fsdp_request(world_size)
    run_dir = Path(out or Path(cfg.init.model_dir or "model_dir") / "gpu_reference")
    if is_complete(run_dir):
        raise UserError("this run directory holds a finished run", where=str(run_dir), fix="pass a new --out")
    train_dl = cfg.fit.train_dataloader
    if train_dl.batch_size % world_size:
        raise UserError(
            f"batch_size {train_dl.batch_size} does not divide over {world_size} processes",
            where="trainer.fit.train_dataloader.batch_size",
        )
    base = open_base(hf_model, cfg)
    sl = cfg.sparse_lora
    masks_file = str(masks_path or sl.mask_path) if (masks_path or sl.mask_path) else None
    checked = check_memory(cfg, base.hf_config, masks_file=masks_file, world_size=world_size, device=device,
                           fsdp=fsdp, memory=memory)  # fmt: skip
    if rank == 0:
        print(checked.plan.table(), flush=True)
    if checked.plan.fits is False:  # refused before any weight is read
        raise not_fitting(checked)
    skip = skip_provenance_check or sl.skip_provenance_check
    masks, mask_metadata, provenance = load_masks(masks_file, base, skip_provenance_check=skip)
    torch.manual_seed(cfg.init.seed if cfg.init.seed is not None else 0)
    model = load_hf_model(hf_model, torch.bfloat16 if memory.bf16_base else torch.float32)
    # "auto": a pruned base (zero off the mask, as `masks apply` writes it) is not re-masked per step.
    # Masks held as bits (1/8 of a bool's memory, unpacked per layer call; the same numbers).
    summary = apply_sparse_lora_(
        model, sl, masks, mask_base_in_forward="auto", sampled_product=memory.sampled_product, pack_mask=True
    )
    if memory.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = shard_frozen_base(model, device) if fsdp else model.to(device)
    model.train()
    step_config = _step_config(cfg, world_size, device, checked.micro_batch_size)
    if checked.setting.requested == AUTO and device.type == "cuda":
        checked = _probe(model, checked, step_config, world_size)
        step_config = _step_config(cfg, world_size, device, checked.micro_batch_size)
    optimizer = build_optimizer(model, cfg.init.optimizer)
    dataset = SampleDataset(train_dl.data_dir)
    run = Run(
        cfg=cfg, params_yaml=Path(params_yaml), config_sha256=hashlib.sha256(Path(params_yaml).read_bytes()).hexdigest(),
        hf_model=Path(hf_model), run_dir=run_dir, rank=rank, world_size=world_size, device=device, fsdp=fsdp,
        base=base, model=model, summary=summary, masks=masks, masks_file=masks_file, mask_metadata=mask_metadata,
        mask_provenance=provenance, optimizer=optimizer,
        lr_at=build_lr_schedule(cfg.init.schedulers, optimizer.param_groups[0]["lr"]),
        step_config=step_config, dataset=dataset,
        batches=global_batches(len(dataset), train_dl.batch_size, train_dl.shuffle, train_dl.shuffle_seed, train_dl.drop_last),
        memory=checked, options=memory,
        retention=CheckpointRetention(cfg.keep_checkpoints),
    )  # fmt: skip
    _resume(run)
    return run


def _probe(
    model: torch.nn.Module, checked: CheckedMemory, config: StepConfig, world_size: int
) -> CheckedMemory:
    """`auto` on a GPU: confirm the planned micro-batch with one forward/backward (halved on an
    out-of-memory); every rank then takes the smallest size any rank could run."""
    micro, peak = probe_micro_batch(model, checked.micro_batch_size, checked.sequences, config)
    agreed = torch.tensor(micro, device=config.device)
    if world_size > 1:
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
    probe = {"planned": checked.micro_batch_size, "ran": micro, "agreed": int(agreed),
             "peak_bytes": peak, "plan_total_bytes": checked.plan.total}  # fmt: skip
    torch.cuda.reset_peak_memory_stats(config.device)  # the run's peaks are its own
    return with_probe(checked, probe, int(agreed))


def _resume(run: Run) -> None:
    """Continue from the run directory's latest checkpoint, if any (factors, optimizer, RNG, data)."""
    resume_from = latest_checkpoint(run.run_dir)
    if resume_from is not None:
        state = load_checkpoint(resume_from, run.config_sha256)
        load_lora_factors_(run.model, {k: v.to(run.device) for k, v in state["lora"].items()})
        run.optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        run.start_step = int(state["step"])
        for _ in range(run.start_step * run.cfg.init.loop.grad_accum_steps):  # the batches already consumed
            next(run.batches)
    if run.rank == 0:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        print(
            run.summary if resume_from is None else f"resuming from {resume_from} (step {run.start_step})",
            flush=True,
        )


# ----------------------------------------------------------------------------- loop
def _eval_every(cfg: RunConfig) -> int:
    """Steps between evaluations (0 = never): an int is a step count, a float in (0, 1] a fraction of the run."""
    frequency = cfg.init.loop.eval_frequency
    if not frequency or cfg.val_dataloader is None:
        return 0
    if isinstance(frequency, float):
        if not 0.0 < frequency <= 1.0:
            raise UserError(
                f"eval_frequency {frequency} must be an int or a float in (0, 1]", where="trainer.init.loop"
            )
        return max(1, math.floor(frequency * cfg.max_steps))
    return int(frequency)


def _evaluate(run: Run, dataset: SampleDataset) -> Validation:
    c = run.step_config
    return validation_loss(
        run.model, dataset, run.cfg.val_dataloader, eval_steps=run.cfg.init.loop.eval_steps, scaling=c.loss_scaling,
        loss_weight=c.loss_weight, autocast=c.autocast, device=run.device, rank=run.rank, world_size=run.world_size,
        micro_batch_size=c.micro_batch_size,
    )  # fmt: skip


def _micro_batches(run: Run) -> list[dict[str, torch.Tensor]]:
    """This rank's slices of the step's `grad_accum_steps` global batches."""
    return [
        collate(run.dataset, rank_slice(next(run.batches), run.rank, run.world_size))
        for _ in range(run.cfg.init.loop.grad_accum_steps)
    ]


def _save_checkpoint(run: Run, step: int) -> None:
    state = {
        "step": step,
        "lora": {k: v.cpu() for k, v in lora_factors(run.model).items()},
        "optimizer": run.optimizer.state_dict(),
        "rng": rng_state(),
        "config_sha256": run.config_sha256,
    }
    path = checkpoint_path(run.run_dir, step)
    save_checkpoint(path, state)
    run.retention.record(path)


def run_loop(run: Run, progress: bool = True) -> float:
    """Train from `run.start_step` to `max_steps`; returns the last step's loss."""
    from tqdm import tqdm

    cfg, max_steps = run.cfg, run.cfg.max_steps
    trainable = [p for p in run.model.parameters() if p.requires_grad]
    checkpoint_every = cfg.init.checkpoint.steps if cfg.init.checkpoint and cfg.init.checkpoint.steps else 0
    eval_every = _eval_every(cfg)
    val_dataset = SampleDataset(cfg.val_dataloader.data_dir) if eval_every else None
    metrics = MetricsWriter(run.run_dir, resume_step=run.start_step, enabled=run.rank == 0)
    events = TensorBoardWriter(
        run.run_dir, run.model, batch_size=cfg.fit.train_dataloader.batch_size, max_steps=max_steps,
        resume_step=run.start_step, enabled=run.rank == 0,
    )  # fmt: skip
    bar = tqdm(
        total=max_steps,
        initial=run.start_step,
        desc="train",
        unit="step",
        disable=not progress or run.rank != 0,
    )
    loss = float("nan")
    for step in range(run.start_step, max_steps):
        events.before_step()
        t0 = time.perf_counter()
        lr = run.lr_at(step)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        result = train_step(
            run.model, run.optimizer, trainable, _micro_batches(run), run.step_config,
            on_grads=events.read_gradients if events.active else None,
        )  # fmt: skip
        if run.device.type == "cuda":
            torch.cuda.synchronize(run.device)
        elapsed, loss = time.perf_counter() - t0, result.loss
        if not math.isfinite(loss):
            raise UserError(
                f"the loss became {loss} at step {step + 1}", fix="lower the learning rate or check the data"
            )
        metrics.write({
            "step": step + 1, "loss": loss, "lr": float(lr), "grad_norm": result.grad_norm,
            "loss_tokens": result.loss_tokens, "tokens": result.tokens, "samples": result.samples,
            "tokens_per_s": result.tokens / elapsed, "samples_per_s": result.samples / elapsed,
            "peak_memory_bytes": peak_memory_bytes(run.device), "time_s": elapsed,
        })  # fmt: skip
        events.write_step(step + 1, loss, float(lr), result.samples)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{float(lr):.2e}")
        if eval_every and (step + 1) % eval_every == 0:
            val = _evaluate(run, val_dataset)
            metrics.write({
                "step": step + 1, "split": "eval", "loss": val.loss, "nll_per_token": val.nll_per_token,
                "loss_tokens": val.loss_tokens, "samples": val.samples,
            })  # fmt: skip
            events.write_eval(step + 1, val.loss)
        if run.rank == 0 and (
            (checkpoint_every and (step + 1) % checkpoint_every == 0) or step + 1 == max_steps
        ):
            _save_checkpoint(run, step + 1)
    bar.close()
    events.close()
    run.peak_bytes = peak_memory_bytes(run.device)
    run.tensorboard = events.record() if run.rank == 0 else None
    return loss


# ----------------------------------------------------------------------------- save
def _versions() -> dict[str, str | None]:
    """The software stack (`modelzoo_ext.versions.run_versions`: ModelZoo release, cerebras-pytorch,
    transformers, lm-eval, torch's build, Python, git revision; None where not installed)."""
    return run_versions()


def finish(run: Run, last_loss: float) -> None:
    """Rank 0: the exports, then `run.json` (its `complete: true` marks the run finished)."""
    if run.rank != 0:
        return
    sl = run.cfg.sparse_lora
    # Under FSDP or on a bfloat16 base the float32 base is rebuilt from disk for the exports.
    model = whole_model(run.model, run.hf_model, sl, run.masks, rebuild=run.fsdp or run.options.bf16_base)
    export = export_run(model, sl, run.run_dir, run.hf_model, run.masks, run.masks_file)
    train_dl = run.cfg.fit.train_dataloader
    record = {
        "complete": True, "config": str(run.params_yaml), "config_sha256": run.config_sha256,
        "hf_model": str(run.hf_model), "mode": run.summary.mode, "export": export, "masks": run.masks_file,
        "masks_metadata_sha256": run.mask_metadata.get("metadata_sha256"), "masks_provenance": run.mask_provenance,
        "data_dir": train_dl.data_dir, "data_params": read_params(train_dl.data_dir), "max_steps": run.cfg.max_steps,
        "world_size": run.world_size, "fsdp": run.fsdp, "device": str(run.device), "final_loss": last_loss,
        "trainable_params": run.summary.trainable_params, "ignored_config_keys": run.cfg.ignored,
        "architecture_check": run.base.architecture.as_record(), "tensorboard": run.tensorboard,
        "memory": {**run.memory.as_record(), "activation_checkpointing": run.options.activation_checkpointing,
                   "base_dtype": "bfloat16" if run.options.bf16_base else "float32",
                   "sampled_product": run.options.sampled_product, "peak_bytes": run.peak_bytes},
        "versions": _versions(),
    }  # fmt: skip
    with atomic_file(run.run_dir / "run.json") as tmp:
        tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")


def train(
    params_yaml: str | Path,
    hf_model: str | Path,
    out: str | Path | None = None,
    device: str | None = None,
    masks_path: str | Path | None = None,
    progress: bool = True,
    fsdp: bool = False,
    skip_provenance_check: bool = False,
    memory: MemoryOptions | None = None,
) -> Path:
    """Run (or resume) a training run; returns RUN_DIR. See the module docstring."""
    memory = memory or MemoryOptions()
    run = setup(params_yaml, hf_model, out, device, masks_path, fsdp, skip_provenance_check, memory)
    last_loss = run_loop(run, progress)
    finish(run, last_loss)
    if run.world_size > 1:
        dist.barrier()
    return run.run_dir


# ----------------------------------------------------------------------------- command line
def plan_only(args: argparse.Namespace) -> int:
    """`--plan`: the memory plan of the run the other arguments describe; no weight is read,
    nothing is written. Exit 0 when it fits (or the device memory is unknown), 2 when not."""
    cfg = load_run_config(args.params)
    checked_config = check_hf_config(args.hf_model, cfg)
    masks_file = args.masks or cfg.sparse_lora.mask_path
    world_size = planned_world_size(args.world_size)
    checked = check_memory(
        cfg, checked_config.hf_config, masks_file=masks_file, world_size=world_size,
        device=plan_device(args.device), fsdp=args.fsdp, memory=MemoryOptions.from_args(args),
    )  # fmt: skip
    print(checked.plan.table())
    print(f"micro-batch {checked.micro_batch_size} per rank ({checked.setting.source})")
    if checked.plan.fits is False:
        raise not_fitting(checked)
    return 0


def run_train(args: argparse.Namespace) -> int:
    """Handler shared by both entry points."""
    if args.plan:
        return plan_only(args)
    if args.world_size is not None:
        raise UserError(
            "--world-size is for --plan only", fix="under torchrun the world size is its process count"
        )
    run_dir = train(
        args.params, args.hf_model, args.out, args.device, args.masks,
        progress=not args.no_progress, fsdp=args.fsdp, skip_provenance_check=args.skip_provenance_check,
        memory=MemoryOptions.from_args(args),
    )  # fmt: skip
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"run complete: {run_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gpu_reference.train", description=__doc__.split("\n\n")[0]
    )
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_train(args)
    except UserError as exc:
        print(f"gpu_reference.train: error: {exc}", file=sys.stderr)
        return exc.exit_status
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
