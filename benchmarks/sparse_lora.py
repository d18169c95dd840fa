"""Benchmark: PEFT LoRA (dense base) vs our sparse_to_dense vs sparse_to_sparse, one training step.

The same HF Llama-shaped model (random weights), batch and sequence for every method; LoRA r=16 on
all seven projections; AdamW on the LoRA factors. Each configuration runs in its own subprocess
(so its peak RSS is its own) with MALLOC_MMAP_THRESHOLD_=65536 (otherwise glibc keeps freed
buffers and the peak says more about the allocator than the method). Prints the median step time
and peak memory of each, as ratios to PEFT measured in the same run.

    python benchmarks/sparse_lora.py                          # CPU, the issue's default shape
    python benchmarks/sparse_lora.py --shape small            # a quick run (seconds per step)
    python benchmarks/sparse_lora.py --device cuda --shape 1b --dtype bf16
    python benchmarks/sparse_lora.py --kernel-only            # sampled vs dense weight-gradient product
    ... --json PATH                                           # also write the rows as JSON

Targets (issue 3): s2d <= 1.02x PEFT time; s2s <= 1.15x at every sparsity and <= 1.08x at 0.9;
s2s peak memory <= 1.05x PEFT; on a GPU at ~1B in bf16, s2s <= 1.10x at sparsity >= 0.7.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time

SHAPES = {
    # layers, hidden, intermediate, heads, kv heads, vocab, seq, batch
    "small": dict(layers=2, hidden=512, intermediate=1408, heads=8, kv_heads=8, vocab=8000, seq=256, batch=2),
    "default": dict(
        layers=4, hidden=1024, intermediate=2816, heads=16, kv_heads=16, vocab=32000, seq=512, batch=4
    ),
    # TinyLlama-1.1B's shape.
    "1b": dict(
        layers=22, hidden=2048, intermediate=5632, heads=32, kv_heads=4, vocab=32000, seq=2048, batch=4
    ),
}
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
METHODS = ["peft", "s2d", "s2s", "s2s-dense"]


# ---------------------------------------------------------------- one configuration (subprocess)


def build_model(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    s = SHAPES[args.shape]
    config = LlamaConfig(
        vocab_size=s["vocab"],
        hidden_size=s["hidden"],
        intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        max_position_embeddings=s["seq"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    dtype = getattr(torch, DTYPES[args.dtype])
    with torch.device(args.device):
        model = LlamaForCausalLM(config).to(dtype)
    return model


def add_lora(model, args):
    """PEFT LoRA on the dense base, or our sparse LoRA on the base pruned with random masks."""
    import torch
    from torch import nn

    if args.method == "peft":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(
            model, LoraConfig(r=16, lora_alpha=32, target_modules=PROJECTIONS, lora_dropout=0.0)
        )
    from modelzoo_ext.sparse_lora import SparseLoRAConfig, apply_sparse_lora_

    gen = torch.Generator(device=args.device).manual_seed(0)
    masks = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in PROJECTIONS:
                mask = torch.rand(module.weight.shape, generator=gen, device=args.device) >= args.sparsity
                module.weight.mul_(mask)
                masks[f"{name}.weight"] = mask
    mode = "sparse_to_dense" if args.method == "s2d" else "sparse_to_sparse"
    config = SparseLoRAConfig(mode=mode, r=16, alpha=32.0, mask_path="random")
    sampled = "never" if args.method == "s2s-dense" else "auto"
    # The weights are pruned above, as `masks apply` writes them and gpu_reference loads them.
    apply_sparse_lora_(model, config, masks, sampled_product=sampled, mask_base_in_forward="auto")
    return model


def peak_memory_mb(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_worker(args) -> None:
    import torch

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    model = add_lora(build_model(args), args)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    s = SHAPES[args.shape]
    ids = torch.randint(0, s["vocab"], (s["batch"], s["seq"]), generator=torch.Generator().manual_seed(1))
    ids = ids.to(args.device)
    wall, cpu = [], []
    for step in range(args.warmup + args.steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        if args.device == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    result = {"median_s": statistics.median(wall), "median_cpu_s": statistics.median(cpu)}
    print(json.dumps({**result, "peak_mb": peak_memory_mb(args.device)}))


# ---------------------------------------------------------------- the table (parent process)


def configurations(args) -> list[tuple[str, float]]:
    from modelzoo_ext.sparse_lora.kernels import use_sampled_product

    runs = [("peft", 0.0)]
    for sparsity in args.sparsities:
        runs += [("s2d", sparsity), ("s2s", sparsity)]
        # Where "auto" takes the sampled product, also time the dense path to show what it buys.
        if use_sampled_product(args.device, 1.0 - sparsity):
            runs.append(("s2s-dense", sparsity))
    return [run for run in runs if run[0] in args.methods]


def run_config(args, method: str, sparsity: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--method", method, "--sparsity", str(sparsity)]
    cmd += ["--shape", args.shape, "--device", args.device, "--dtype", args.dtype]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{method} at sparsity {sparsity} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_table(args) -> None:
    from tqdm import tqdm

    runs = configurations(args)
    results = {run: [] for run in runs}
    with tqdm(total=len(runs) * args.rounds, desc="configurations", file=sys.stderr) as bar:
        for _ in range(args.rounds):
            for run in runs:
                results[run].append(run_config(args, *run))
                bar.update()
    median = {run: statistics.median(r["median_s"] for r in rs) for run, rs in results.items()}
    cpu = {run: statistics.median(r["median_cpu_s"] for r in rs) for run, rs in results.items()}
    peak = {run: max(r["peak_mb"] for r in rs) for run, rs in results.items()}
    base = ("peft", 0.0)
    print(
        f"\nshape={args.shape} {SHAPES[args.shape]} device={args.device} dtype={args.dtype} "
        f"threads={args.threads} steps={args.steps} (+{args.warmup} warmup) rounds={args.rounds}"
    )
    # On a shared CPU, process CPU time is less disturbed by other processes than wall time.
    print(
        f"{'method':<10} {'sparsity':>8} {'wall s':>8} {'wall/PEFT':>10} {'cpu s':>8} {'cpu/PEFT':>9} "
        f"{'peak MB':>8} {'mem/PEFT':>9}"
    )
    rows = []
    for run in runs:
        method, sparsity = run
        print(
            f"{method:<10} {sparsity:>8.2f} {median[run]:>8.3f} {median[run] / median[base]:>9.3f}x "
            f"{cpu[run]:>8.3f} {cpu[run] / cpu[base]:>8.3f}x {peak[run]:>8.0f} {peak[run] / peak[base]:>8.3f}x"
        )
        rows.append({"method": method, "sparsity": sparsity, "wall_s": median[run], "time_vs_peft": median[run] / median[base],
                     "peak_mb": peak[run], "memory_vs_peft": peak[run] / peak[base]})  # fmt: skip
    write_json(args, rows)


def write_json(args, rows: list[dict]) -> None:
    """`--json PATH`: the table's rows, with the arguments."""
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, f, indent=1)


# ---------------------------------------------------------------- sampled vs dense product


def kernel_table(args) -> None:
    """Time the s2s weight-gradient step (G*M, dA, dB) dense vs sampled, per projection shape."""
    import torch

    from modelzoo_ext.sparse_lora.kernels import SampledPattern, dense_lora_grads

    torch.set_num_threads(args.threads)
    s = SHAPES[args.shape]
    tokens = s["batch"] * s["seq"]
    h, f = s["hidden"], s["intermediate"]
    dtype = getattr(torch, DTYPES[args.dtype])
    print(f"\nweight-gradient product, T={tokens} tokens, r=16, device={args.device}, dtype={args.dtype}")
    print(f"{'out x in':<12} {'density':>7} {'dense ms':>9} {'sampled ms':>11} {'sampled/dense':>14}")
    rows = []
    for out_f, in_f in sorted({(h, h), (f, h), (h, f)}):
        gen = torch.Generator().manual_seed(0)
        g = torch.randn(tokens, out_f, generator=gen).to(args.device, dtype)
        x = torch.randn(tokens, in_f, generator=gen).to(args.device, dtype)
        a = torch.randn(16, in_f, generator=gen).to(args.device, dtype)
        b = torch.randn(out_f, 16, generator=gen).to(args.device, dtype)
        for density in args.densities:
            mask = (torch.rand(out_f, in_f, generator=gen) < density).to(args.device)
            pattern = SampledPattern.from_mask(mask)

            dense = functools.partial(dense_lora_grads, g, x, mask, a, b, 2.0)
            sampled = functools.partial(_sampled_lora_grads, pattern, g, x, a, b, 2.0)
            t_dense, t_sampled = _time(dense, args), _time(sampled, args)
            print(
                f"{out_f}x{in_f:<7} {density:>7.2f} {1e3 * t_dense:>9.1f} {1e3 * t_sampled:>11.1f} "
                f"{t_sampled / t_dense:>13.2f}x"
            )
            rows.append(
                {"shape": [out_f, in_f], "density": density, "dense_s": t_dense, "sampled_s": t_sampled}
            )
    write_json(args, rows)


def _sampled_lora_grads(pattern, g, x, a, b, scaling):
    return pattern.lora_grads(pattern.masked_weight_grad(g, x), a, b, scaling)


def _time(fn, args) -> float:
    """Median over `args.steps` calls: process CPU time on the CPU (robust on a shared machine)."""
    import torch

    clock = time.process_time if args.device == "cpu" else time.perf_counter
    fn()
    times = []
    for _ in range(args.steps):
        start = clock()
        fn()
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(clock() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="default")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration (median)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1, help="repeat the whole sequence; median over rounds")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--methods", nargs="+", default=METHODS, choices=METHODS, help="subset to run (PEFT is the baseline)"
    )
    parser.add_argument(
        "--kernel-only", action="store_true", help="time only the s2s weight-gradient product"
    )
    parser.add_argument(
        "--densities",
        type=float,
        nargs="+",
        default=[0.5, 0.3, 0.2, 0.1, 0.05],
        help="--kernel-only: mask densities",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the table's rows as JSON")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--sparsity", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        run_worker(args)
    elif args.kernel_only:
        kernel_table(args)
    else:
        print_table(args)


if __name__ == "__main__":
    main()
