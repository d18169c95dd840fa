"""The reference sparse-LoRA trainer: one flat recipe, setup -> loop -> save.

    python -m gpu_reference.train PARAMS_YAML --hf-model HF_DIR [--out RUN_DIR] [--device cuda|cpu]
    torchrun --nproc-per-node N -m gpu_reference.train PARAMS_YAML --hf-model HF_DIR ... [--fsdp]
    sparse-lora train PARAMS_YAML --hf-model HF_DIR ...            (the same command)

It reads the run config the Cerebras run reads (`params_sparse_lora*.yaml`) and computes what
ModelZoo's Trainer computes on it: the transformers Llama/Mistral model from HF_DIR with the
shared sparse-LoRA layers (`modelzoo_ext.sparse_lora`), ModelZoo's GPT loss (the data's loss
mask, `loss_scaling`), cerebras-pytorch's AdamW/SGD and per-step LR formulas
(`gpu_reference.optim`, `gpu_reference.schedulers`), gradient clipping by
`max_gradient_norm`, bf16 autocast when `precision.enabled`, gradient accumulation, and the
batches `GptHDF5MapDataProcessor` yields for the same seed (`gpu_reference.data`).

Under torchrun each rank takes a slice of every global batch; the loss of a slice is its summed
token loss divided by the *global* token count and gradients are summed over ranks, so N
processes compute what one process computes on the whole batch. With `--fsdp` the frozen base is
sharded across the ranks (`gpu_reference.distributed`); the LoRA factors, the optimizer and
everything below stay as they are, and rank 0 builds the exports from the base on disk plus the
trained factors.

RUN_DIR (rank 0 writes it):
    metrics.jsonl           one row per step (see gpu_reference.metrics)
    checkpoints/step_N.pt   LoRA factors + optimizer + RNG, every `checkpoint.steps` and at the end;
                            rerunning the same command resumes from the latest one
    lora.safetensors        the trained LoRA factors (HF module names)
    adapter/                sparse_to_dense: a PEFT adapter (for the base pruned with the masks)
    merged/                 sparse_to_sparse: the merged sparse HF model (zero violations)
    masks.safetensors       the mask file the run used
    sparsity_report.json    check_sparsity of the merged model against the masks
    run.json                provenance: config sha256, model, masks, data, versions, ignored keys
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from gpu_reference.checkpoint import (
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from gpu_reference.data import collate, global_batches, rank_slice
from gpu_reference.distributed import (
    check_fsdp_request,
    load_lora_factors_,
    lora_factors,
    shard_frozen_base,
)
from gpu_reference.metrics import MetricsWriter, non_padding_tokens, peak_memory_bytes
from gpu_reference.optim import build_optimizer
from gpu_reference.run_config import RunConfig, load_run_config
from gpu_reference.schedulers import build_lr_schedule
from gpu_reference.train_args import add_train_arguments
from modelzoo_ext.atomic import atomic_dir, atomic_file
from modelzoo_ext.data.hdf5 import SampleDataset, read_params
from modelzoo_ext.errors import UserError

# ModelZoo model keys -> transformers config attributes; the HF model must agree where both are set.
ARCHITECTURE_KEYS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "filter_size": "intermediate_size",
    "max_position_embeddings": "max_position_embeddings",
    "layer_norm_epsilon": "rms_norm_eps",
    "rope_theta": "rope_theta",
    "share_embedding_weights": "tie_word_embeddings",
}


# ----------------------------------------------------------------------------- setup helpers
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


def _all_reduce_(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _check_architecture(architecture: dict[str, Any], hf_config, where: str) -> list[str]:
    """Compare the YAML's model keys with the HF config; return the keys taken from the HF model."""
    mismatches = []
    for key, attr in ARCHITECTURE_KEYS.items():
        if key in architecture and getattr(hf_config, attr, None) is not None:
            yaml_value, hf_value = architecture[key], getattr(hf_config, attr)
            if (
                isinstance(hf_value, float) and not math.isclose(float(yaml_value), hf_value, rel_tol=1e-9)
            ) or (not isinstance(hf_value, float) and yaml_value != hf_value):
                mismatches.append(f"{key}: yaml {yaml_value!r} vs HF {attr} {hf_value!r}")
    kv = (architecture.get("extra_attention_params") or {}).get("num_kv_groups")
    if kv is not None and kv != getattr(hf_config, "num_key_value_heads", kv):
        mismatches.append(
            f"extra_attention_params.num_kv_groups: yaml {kv} vs HF {hf_config.num_key_value_heads}"
        )
    if mismatches:
        raise UserError(
            f"the run config and the HF model disagree: {mismatches}",
            where=where,
            fix="pass the --hf-model the run config describes",
        )
    return sorted(set(architecture) - set(ARCHITECTURE_KEYS) - {"extra_attention_params"})


def _load_hf_model(hf_model: str | Path):
    """The HF causal LM in float32 (ModelZoo keeps float32 weights; bf16 is autocast only)."""
    import transformers
    from transformers import AutoModelForCausalLM

    major_minor = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    dtype_key = "dtype" if major_minor >= (4, 56) else "torch_dtype"  # renamed in transformers 4.56
    if not Path(hf_model).is_dir():
        raise UserError("HF model directory not found", where=str(hf_model))
    return AutoModelForCausalLM.from_pretrained(str(hf_model), **{dtype_key: torch.float32})


def _load_masks(path: str | None, config_path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from modelzoo_ext.masks.format import load_masks

    if path is None:
        return {}, {}
    masks, metadata = load_masks(path)
    if metadata.get("naming") != "hf":
        raise UserError(
            f"the mask file uses {metadata.get('naming')!r} parameter names; gpu_reference needs HF names",
            where=str(path),
            fix=f"convert it with `sparse-lora masks cs-to-hf` and pass it with --masks (run config {config_path})",
        )
    return masks, metadata


def _loss_sums(
    model, batch: dict[str, torch.Tensor], autocast: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed token loss over the loss mask, number of loss tokens) of one batch, ModelZoo's GPT loss.

    The model attends causally only (ModelZoo's `attention_mask` is a loss mask, not a padding
    mask); logits at position i are scored against labels[i] (the data is already shifted).
    Causality also makes two savings exact for the loss: positions after the batch's last
    loss-bearing one are dropped (fine-tuning samples are mostly padding), and the LM head runs
    only at loss-bearing positions (`logits_to_keep`; completions are a few tokens of a long prompt).
    """
    loss_mask = batch["attention_mask"].to(device)
    keep = loss_mask.any(dim=0).nonzero().squeeze(1)  # [P] positions with a loss in some row
    length = int(keep[-1]) + 1 if keep.numel() else 1
    input_ids = batch["input_ids"][:, :length].to(device).long()
    labels = batch["labels"].to(device).long()[:, keep]
    loss_mask = loss_mask[:, keep]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=input_ids, logits_to_keep=keep).logits  # [B, P, vocab]
        token_loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none"
        )
        weights = loss_mask.to(dtype=logits.dtype).reshape(-1)
        return (token_loss * weights).sum(), weights.sum()


def _normalise(loss_sum, count, scaling: str, batch_size: int, loss_weight: float):
    if scaling == "num_tokens":
        return loss_sum / count
    return loss_sum / batch_size * loss_weight


@torch.no_grad()
def _evaluate(model, dataset, cfg: RunConfig, autocast: bool, device, rank: int, world_size: int) -> float:
    """Mean loss over `eval_steps` batches of the validation data (all of it when unset)."""
    val = cfg.val_dataloader
    num_batches = len(dataset) // val.batch_size
    if cfg.init.loop.eval_steps:
        num_batches = min(num_batches, cfg.init.loop.eval_steps)
    model.eval()
    losses = []
    batches = global_batches(len(dataset), val.batch_size, val.shuffle, val.shuffle_seed, val.drop_last)
    for _ in range(num_batches):
        batch = collate(dataset, rank_slice(next(batches), rank, world_size))
        loss_sum, count = _loss_sums(model, batch, autocast, device)
        totals = _all_reduce_(torch.stack([loss_sum.float(), count.float()]), world_size)
        scaling = cfg.init.model.loss_scaling.lower()
        losses.append(
            float(_normalise(totals[0], totals[1], scaling, val.batch_size, cfg.init.model.loss_weight))
        )
    model.train()
    return sum(losses) / max(1, len(losses))


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


def _versions() -> dict[str, str]:
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
    }


# ----------------------------------------------------------------------------- the recipe
def train(
    params_yaml: str | Path,
    hf_model: str | Path,
    out: str | Path | None = None,
    device: str | None = None,
    masks_path: str | Path | None = None,
    progress: bool = True,
    fsdp: bool = False,
) -> Path:
    """Run (or resume) a training run; returns RUN_DIR. See the module docstring."""
    from tqdm import tqdm

    from modelzoo_ext.sparse_lora import apply_sparse_lora_

    # ---- setup: config, processes, model, masks, optimizer, data, resume
    cfg = load_run_config(params_yaml)
    config_sha256 = hashlib.sha256(Path(params_yaml).read_bytes()).hexdigest()
    rank, world_size, device = _distributed(device)
    if fsdp:
        check_fsdp_request(world_size)
    run_dir = Path(out or Path(cfg.init.model_dir or "model_dir") / "gpu_reference")
    if (run_dir / "run.json").exists() and json.loads((run_dir / "run.json").read_text()).get("complete"):
        raise UserError("this run directory holds a finished run", where=str(run_dir), fix="pass a new --out")
    sl = cfg.sparse_lora
    train_dl = cfg.fit.train_dataloader
    if train_dl.batch_size % world_size:
        raise UserError(
            f"batch_size {train_dl.batch_size} does not divide over {world_size} processes",
            where="trainer.fit.train_dataloader.batch_size",
        )
    torch.manual_seed(cfg.init.seed if cfg.init.seed is not None else 0)

    model = _load_hf_model(hf_model)
    taken_from_hf = _check_architecture(
        cfg.init.model.architecture, model.config, f"{params_yaml} vs {hf_model}"
    )
    masks_file = str(masks_path or sl.mask_path) if (masks_path or sl.mask_path) else None
    masks, mask_metadata = _load_masks(masks_file, str(params_yaml))
    # "auto": a pruned base (zero off the mask, as `masks apply` writes it) is not re-masked per step.
    summary = apply_sparse_lora_(model, sl, masks, mask_base_in_forward="auto")
    model = shard_frozen_base(model, device) if fsdp else model.to(device)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]

    optimizer = build_optimizer(model, cfg.init.optimizer)
    base_lr = optimizer.param_groups[0]["lr"]
    lr_at = build_lr_schedule(cfg.init.schedulers, base_lr)
    precision = cfg.init.precision
    autocast = bool(precision and precision.enabled)
    max_norm = precision.max_gradient_norm if precision else None
    max_value = precision.max_gradient_value if precision else None
    scaling = cfg.init.model.loss_scaling.lower()
    grad_accum = cfg.init.loop.grad_accum_steps
    max_steps = cfg.max_steps
    checkpoint_every = cfg.init.checkpoint.steps if cfg.init.checkpoint and cfg.init.checkpoint.steps else 0
    eval_every = _eval_every(cfg)

    dataset = SampleDataset(train_dl.data_dir)
    val_dataset = SampleDataset(cfg.val_dataloader.data_dir) if eval_every else None
    batches = global_batches(
        len(dataset), train_dl.batch_size, train_dl.shuffle, train_dl.shuffle_seed, train_dl.drop_last
    )

    start_step = 0
    resume_from = latest_checkpoint(run_dir)
    if resume_from is not None:
        state = load_checkpoint(resume_from, config_sha256)
        load_lora_factors_(model, {k: v.to(device) for k, v in state["lora"].items()})
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        start_step = int(state["step"])
        for _ in range(start_step * grad_accum):  # the batches the finished steps consumed
            next(batches)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        print(
            summary if resume_from is None else f"resuming from {resume_from} (step {start_step})", flush=True
        )
    metrics = MetricsWriter(run_dir, resume_step=start_step, enabled=rank == 0)

    # ---- loop: one optimizer step per `grad_accum` global batches
    bar = tqdm(
        total=max_steps, initial=start_step, desc="train", unit="step", disable=not progress or rank != 0
    )
    last_loss = float("nan")
    for step in range(start_step, max_steps):
        t0 = time.perf_counter()
        lr = lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss = torch.zeros((), device=device)
        tokens = loss_tokens = samples = 0
        for _ in range(grad_accum):
            global_batch = next(batches)
            batch = collate(dataset, rank_slice(global_batch, rank, world_size))
            loss_sum, count = _loss_sums(model, batch, autocast, device)
            global_count = _all_reduce_(count.detach().float().clone(), world_size)
            loss = (
                _normalise(loss_sum, global_count, scaling, train_dl.batch_size, cfg.init.model.loss_weight)
                / grad_accum
            )
            loss.backward()
            step_loss += loss.detach().float()
            tokens += non_padding_tokens(batch["attention_mask"])
            loss_tokens += int(global_count)
            samples += len(global_batch)
        for p in trainable:  # sum the slices' gradients: the gradient of the global batch's loss
            if p.grad is not None:
                _all_reduce_(p.grad, world_size)
        _all_reduce_(step_loss, world_size)
        if max_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm)
        else:
            if max_value is not None:
                torch.nn.utils.clip_grad_value_(trainable, max_value)
            grad_norm = torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in trainable if p.grad is not None])
            )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
        tokens = int(_all_reduce_(torch.tensor(tokens, device=device), world_size))
        last_loss = float(step_loss)
        if not math.isfinite(last_loss):
            raise UserError(
                f"the loss became {last_loss} at step {step + 1}",
                fix="lower the learning rate or check the data",
            )
        metrics.write(
            {
                "step": step + 1,
                "loss": last_loss,
                "lr": float(lr),
                "grad_norm": float(grad_norm),
                "loss_tokens": loss_tokens,
                "tokens_per_s": tokens / elapsed,
                "samples_per_s": samples / elapsed,
                "peak_memory_bytes": peak_memory_bytes(device),
                "time_s": elapsed,
            }
        )
        bar.update(1)
        bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{float(lr):.2e}")
        if eval_every and (step + 1) % eval_every == 0:
            eval_loss = _evaluate(model, val_dataset, cfg, autocast, device, rank, world_size)
            metrics.write({"step": step + 1, "split": "eval", "loss": eval_loss})
        if rank == 0 and ((checkpoint_every and (step + 1) % checkpoint_every == 0) or step + 1 == max_steps):
            save_checkpoint(
                checkpoint_path(run_dir, step + 1),
                {
                    "step": step + 1,
                    "lora": {k: v.cpu() for k, v in lora_factors(model).items()},
                    "optimizer": optimizer.state_dict(),
                    "rng": rng_state(),
                    "config_sha256": config_sha256,
                },
            )
    bar.close()

    # ---- save: LoRA factors, mode-specific export, masks, sparsity report, provenance
    if rank == 0:
        if fsdp:  # rank 0 holds only a shard of the base: rebuild the whole model on the CPU
            trained = lora_factors(model)
            model = _load_hf_model(hf_model)
            apply_sparse_lora_(model, sl, masks)
            load_lora_factors_(model, trained)
        _export(model, cfg, run_dir, hf_model, masks, masks_file)
        record = {
            "complete": True,
            "config": str(params_yaml),
            "config_sha256": config_sha256,
            "hf_model": str(hf_model),
            "mode": summary.mode,
            "masks": masks_file,
            "masks_metadata_sha256": mask_metadata.get("metadata_sha256"),
            "data_dir": train_dl.data_dir,
            "data_params": read_params(train_dl.data_dir),
            "max_steps": max_steps,
            "world_size": world_size,
            "fsdp": fsdp,
            "device": str(device),
            "final_loss": last_loss,
            "trainable_params": summary.trainable_params,
            "ignored_config_keys": cfg.ignored,
            "model_keys_taken_from_hf_model": taken_from_hf,
            "versions": _versions(),
        }
        with atomic_file(run_dir / "run.json") as tmp:
            tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    if world_size > 1:
        dist.barrier()
    return run_dir


def _export(
    model, cfg: RunConfig, run_dir: Path, hf_model, masks: dict[str, torch.Tensor], masks_file: str | None
) -> None:
    """Write lora.safetensors, the mask file copy, and adapter/ (s2d) or merged/ + sparsity_report.json (s2s)."""
    from safetensors.torch import save_file

    from modelzoo_ext.sparse_lora import check_sparsity, merge_sparse_lora_, save_adapter

    sl = cfg.sparse_lora
    with atomic_file(run_dir / "lora.safetensors") as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in lora_factors(model).items()}, str(tmp))
    if masks_file:
        with atomic_file(run_dir / "masks.safetensors") as tmp:
            shutil.copyfile(masks_file, tmp)
    if sl.mode == "sparse_to_dense" and not sl.preserve_sparsity_on_merge:
        save_adapter(model, run_dir / "adapter", base_model_name_or_path=str(hf_model))
        return
    model = model.cpu()
    merge_sparse_lora_(model)
    with atomic_dir(run_dir / "merged") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        for item in Path(hf_model).iterdir():
            if item.is_file() and ("token" in item.name or item.name == "special_tokens_map.json"):
                shutil.copy(item, tmp / item.name)
    if masks:
        report = check_sparsity(model, masks)
        with atomic_file(run_dir / "sparsity_report.json") as tmp:
            tmp.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        if not report.ok:
            raise UserError(
                f"the merged model violates its masks ({report.total_violations} weights)",
                where=str(run_dir / "sparsity_report.json"),
            )


# ----------------------------------------------------------------------------- command line
def run_train(args: argparse.Namespace) -> int:
    """Handler shared by both entry points."""
    run_dir = train(
        args.params,
        args.hf_model,
        args.out,
        args.device,
        args.masks,
        progress=not args.no_progress,
        fsdp=args.fsdp,
    )
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
