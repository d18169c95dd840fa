"""Training-step throughput and peak memory: gpu_reference (s2d, s2s) vs a plain PEFT LoRA loop.

    python benchmarks/train_step.py                      # CPU, small Llama shape (runs anywhere)
    python benchmarks/train_step.py --device cuda        # ~1B Llama shape (Llama-3.2-1B), bf16 autocast

Every variant trains the same randomly initialised Llama (no download), pruned by the same
random masks, on the same batch, with the reference trainer's own step
(`gpu_reference.step.train_step`: loss, backward, `gpu_reference.optim.AdamW`); only the LoRA
layer differs:

    peft_lora  PEFT's LoRA on the pruned weights (no mask in the layer: the baseline)
    s2d        SparseLoRALinear sparse_to_dense   y = x (W*M)^T + s x A^T B^T
    s2s        SparseLoRALinear sparse_to_sparse  y = x ((W + s B A) * M)^T

Each variant runs in its own process (peak memory is the process's peak: CUDA allocator peak on
GPU, peak RSS on CPU). Ratios are against `peft_lora` measured in the same invocation.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

SHAPES = {
    # name: (hidden, layers, heads, kv heads, intermediate, vocab, batch, seq)
    "cpu-small": (256, 4, 8, 4, 688, 8192, 4, 128),
    "llama-1b": (2048, 16, 32, 8, 8192, 128256, 4, 1024),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = ("peft_lora", "s2d", "s2s")


def build(variant: str, shape: str, sparsity: float, rank: int, device):
    """(model, trainable params) for one variant; same weights and masks for all (seeded)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, kv, inter, vocab, _, seq = SHAPES[shape]
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
        intermediate_size=inter, vocab_size=vocab, max_position_embeddings=seq, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(1)
    masks = {}
    for name, p in model.named_parameters():
        if name.endswith(".weight") and name.rsplit(".", 2)[-2] in TARGETS:
            masks[name] = torch.rand(p.shape, generator=g) >= sparsity
            with torch.no_grad():
                p.mul_(masks[name])
    if variant == "peft_lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, lora_dropout=0.0)
        )
    else:
        from modelzoo_ext.sparse_lora import SparseLoRAConfig, apply_sparse_lora_

        mode = {"s2d": "sparse_to_dense", "s2s": "sparse_to_sparse"}[variant]
        config = SparseLoRAConfig(mode=mode, r=rank, alpha=2 * rank, mask_path="bench")
        apply_sparse_lora_(model, config, masks, mask_base_in_forward="auto")  # as gpu_reference.train
    model.to(device).train()
    return model, [p for p in model.parameters() if p.requires_grad]


def measure(
    variant: str, shape: str, sparsity: float, rank: int, device_name: str, steps: int, warmup: int
) -> dict:
    """Time `steps` optimizer steps after `warmup`; returns tokens/s and peak memory."""
    import torch

    from gpu_reference.metrics import peak_memory_bytes
    from gpu_reference.optim import AdamW
    from gpu_reference.step import StepConfig, train_step

    device = torch.device(device_name)
    model, trainable = build(variant, shape, sparsity, rank, device)
    optimizer = AdamW(trainable, lr=1e-4)
    *_, vocab, batch, seq = SHAPES[shape]
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, vocab, (batch, seq + 1), generator=g, dtype=torch.int32)
    data = {
        "input_ids": ids[:, :-1],
        "labels": ids[:, 1:],
        "attention_mask": torch.ones(batch, seq, dtype=torch.int32),
    }
    config = StepConfig(batch_size=batch, autocast=device.type == "cuda", device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        train_step(model, optimizer, trainable, [data], config)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    median = sorted(times)[len(times) // 2]
    return {"variant": variant, "tokens_per_s": batch * seq / median, "step_s": median,
            "peak_memory_bytes": peak_memory_bytes(device), "trainable": sum(p.numel() for p in trainable)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--shape", choices=sorted(SHAPES), help="[default: cpu-small on CPU, llama-1b on CUDA]"
    )
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--variant", choices=VARIANTS, help=argparse.SUPPRESS
    )  # one variant, JSON out (child process)
    args = parser.parse_args(argv)
    shape = args.shape or ("llama-1b" if args.device == "cuda" else "cpu-small")
    if args.variant:
        print(
            json.dumps(
                measure(args.variant, shape, args.sparsity, args.rank, args.device, args.steps, args.warmup)
            )
        )
        return 0
    results = {}
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", variant, "--device", args.device, "--shape", shape,
               "--sparsity", str(args.sparsity), "--rank", str(args.rank), "--steps", str(args.steps), "--warmup", str(args.warmup)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
            return 1
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    base = results["peft_lora"]
    hidden, layers, *_, batch, seq = SHAPES[shape]
    print(f"shape {shape} (hidden {hidden}, {layers} layers, batch {batch} x {seq}), device {args.device}, "
          f"sparsity {args.sparsity}, rank {args.rank}, median of {args.steps} steps after {args.warmup} warm-up")  # fmt: skip
    print(f"{'variant':<10} {'tokens/s':>10} {'vs peft':>8} {'step s':>8} {'peak MiB':>9} {'vs peft':>8}")
    for variant, r in results.items():
        print(
            f"{variant:<10} {r['tokens_per_s']:>10.1f} {r['tokens_per_s'] / base['tokens_per_s']:>8.2f} {r['step_s']:>8.3f} "
            f"{r['peak_memory_bytes'] / 2**20:>9.1f} {r['peak_memory_bytes'] / base['peak_memory_bytes']:>8.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
