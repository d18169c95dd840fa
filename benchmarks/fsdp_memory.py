"""Memory held per rank with `--fsdp` vs plain torchrun (DDP-style) at N CPU ranks (gloo).

    python benchmarks/fsdp_memory.py                          # 2 ranks, hidden 512, 8 layers, s2s
    python benchmarks/fsdp_memory.py --mode s2d --nproc 2 --hidden 1024

Each variant runs under its own `torchrun --standalone --nproc-per-node N` on a random Llama
(seeded, identical on every rank, no download) pruned by 50% random masks, with sparse LoRA
(r 16) on all 7 projections, and trains `--steps` steps of the trainer's own step
(`gpu_reference.step.train_step`: loss, gradient sum over ranks, `gpu_reference.optim.AdamW`):

    ddp                the plain torchrun path: whole model on every rank, LoRA grads all-reduced
    fsdp               `--fsdp` (gpu_reference.distributed.shard_frozen_base): frozen base sharded,
                       LoRA factors whole on every rank, their grads all-reduced

(FSDP1 with the LoRA factors inside the decoder-layer units cannot be measured: the unsharded
frozen weights then come back as views that require grad, and the sparse-LoRA kernel refuses
them; see gpu_reference/distributed.py.)

Columns, per rank (the maximum over ranks): frozen / trainable parameter bytes held after
wrapping, gradient bytes held after the last backward (including any FSDP flat-parameter
gradient, read from its private `_flat_param`: none, as every unit is frozen), RSS after wrapping, peak RSS during the training
steps (the kernel's high-water mark reset after wrapping, `/proc/self/clear_refs`; Linux only),
and the median step time. Ratios are against `ddp` measured in the same invocation. On a GPU
the same split applies to device memory; this CPU run shows the sharding works.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("ddp", "fsdp")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def build(args):
    """The pruned random Llama with sparse LoRA applied, on the CPU (same on every rank)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from modelzoo_ext.sparse_lora import SparseLoRAConfig, apply_sparse_lora_

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 128, intermediate_size=int(args.hidden * 2.6875),
        vocab_size=args.vocab, max_position_embeddings=args.seq, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(1)
    masks = {}
    for name, p in model.named_parameters():
        if name.rsplit(".", 2)[-2] in TARGETS:
            masks[name] = torch.rand(p.shape, generator=g) >= 0.5
            with torch.no_grad():
                p.mul_(masks[name])
    mode = {"s2d": "sparse_to_dense", "s2s": "sparse_to_sparse"}[args.mode]
    lora = SparseLoRAConfig(mode=mode, r=16, alpha=32, target_modules=TARGETS, mask_path="bench")
    apply_sparse_lora_(model, lora, masks)
    return model


def wrap(model, variant: str):
    import torch

    from gpu_reference.distributed import shard_frozen_base

    return shard_frozen_base(model, torch.device("cpu")) if variant == "fsdp" else model


def grad_bytes(model) -> int:
    """Bytes of gradients held: parameters' .grad plus FSDP flat parameters' .grad, each tensor once."""
    seen = {}
    for p in model.parameters():
        if p.grad is not None:
            seen[p.grad.untyped_storage().data_ptr()] = p.grad.untyped_storage().nbytes()
    for m in model.modules():
        flat = getattr(m, "_flat_param", None)
        if flat is not None and flat.grad is not None:
            seen[flat.grad.untyped_storage().data_ptr()] = flat.grad.untyped_storage().nbytes()
    return sum(seen.values())


def worker(args) -> dict:
    """One rank of one variant (run under torchrun); returns this rank's measurements."""
    import torch
    import torch.distributed as dist

    from gpu_reference.distributed import local_parameter_bytes
    from gpu_reference.optim import AdamW
    from gpu_reference.step import StepConfig, train_step

    class MeasuringAdamW(AdamW):
        """AdamW that records the gradient bytes held when it steps (after the ranks' sum)."""

        grad_bytes = 0

        def step(self, closure=None):
            self.grad_bytes = grad_bytes(model)
            return super().step(closure)

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = wrap(build(args), args.variant).train()
    held = local_parameter_bytes(model)
    rss_after_wrap = _status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS high-water mark
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = MeasuringAdamW(trainable, lr=1e-4)
    config = StepConfig(batch_size=args.batch, world_size=world)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g, dtype=torch.int32)
    mine = slice(rank * args.batch // world, (rank + 1) * args.batch // world)
    loss_mask = torch.zeros(args.batch, args.seq, dtype=torch.int32)
    loss_mask[:, -16:] = 1
    batch = {"input_ids": ids[mine, :-1], "labels": ids[mine, 1:], "attention_mask": loss_mask[mine]}
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        train_step(model, optimizer, trainable, [batch], config)
        times.append(time.perf_counter() - t0)
    grads = optimizer.grad_bytes
    dist.barrier()
    dist.destroy_process_group()
    return {"rank": rank, "frozen": held["frozen"], "trainable": held["trainable"], "grads": grads,
            "rss_after_wrap": rss_after_wrap, "peak_rss_steps": _status_bytes("VmHWM"),
            "step_s": sorted(times)[len(times) // 2]}  # fmt: skip


def run_variant(args, variant: str) -> dict:
    """Launch one variant under torchrun; the maximum over ranks of each measurement."""
    result_dir = tempfile.mkdtemp(prefix="fsdp_memory_")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
           __file__, "--variant", variant, "--mode", args.mode, "--hidden", str(args.hidden),
           "--layers", str(args.layers), "--vocab", str(args.vocab), "--batch", str(args.batch),
           "--seq", str(args.seq), "--steps", str(args.steps), "--result-dir", result_dir]  # fmt: skip
    # A fixed mmap threshold makes glibc return freed tensors to the OS, so RSS follows live memory
    # (its default threshold grows after frees and keeps freed blocks in the heap).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(f.read_text()) for f in sorted(Path(result_dir).glob("rank_*.json"))]
    shutil.rmtree(result_dir)
    return {key: max(r[key] for r in rows) for key in rows[0] if key != "rank"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2, help="ranks [default: 2]")
    parser.add_argument("--mode", choices=("s2s", "s2d"), default="s2s")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4, help="global batch [default: 4]")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # a torchrun worker
    parser.add_argument("--result-dir", help=argparse.SUPPRESS)  # where a worker writes rank_<r>.json
    args = parser.parse_args(argv)
    if args.variant:
        result = worker(args)  # one file per rank: the ranks share stdout
        (Path(args.result_dir) / f"rank_{result['rank']}.json").write_text(json.dumps(result))
        return 0
    results = {variant: run_variant(args, variant) for variant in VARIANTS}
    base = results["ddp"]
    mib = 2**20
    print(f"random Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, {args.mode}, r 16, "
          f"{args.nproc} gloo ranks, global batch {args.batch} x {args.seq}, median of {args.steps} steps; "
          "per rank (max over ranks), MiB")  # fmt: skip
    header = ("variant", "frozen", "vs ddp", "LoRA", "grads", "RSS wrap", "peak RSS", "vs ddp", "step s")
    print(f"{header[0]:<18}" + "".join(f"{h:>10}" for h in header[1:]))
    for variant, r in results.items():
        cells = (r["frozen"] / mib, r["frozen"] / base["frozen"], r["trainable"] / mib, r["grads"] / mib,
                 r["rss_after_wrap"] / mib, r["peak_rss_steps"] / mib, r["peak_rss_steps"] / base["peak_rss_steps"],
                 r["step_s"])  # fmt: skip
        print(f"{variant:<18}" + "".join(f"{c:>10.2f}" for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
