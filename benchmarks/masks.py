"""Benchmark `masks compute` (magnitude) on a synthetic sharded bf16 checkpoint; prints a table.

    python benchmarks/masks.py                 # 1.1B-like (hidden 2048, intermediate 5632, 22 layers)
    python benchmarks/masks.py --shape 7b      # 7B-like (hidden 4096, intermediate 11008, 32 layers)
    python benchmarks/masks.py --shape small   # quick check (a few hundred MB)

Each configuration runs in a fresh subprocess (its own peak RSS), on the same files, after one
untimed read that puts the shards in the page cache; all rows are measured in the same run:
- raw read: `safe_open(...).get_tensor(...).clone()` of every targeted tensor (get_tensor alone
  maps the file lazily and reads nothing; one copy reads every byte once): the ceiling;
- sha256: the same read plus the sha256 of every tensor that the mask file records (one core):
  what the format's source checksums alone cost, and so the ceiling of any exact mask method here;
- naive: the seed project's way: load every tensor, `torch.kthvalue` of |W| per tensor, masks
  saved at 1 byte per weight;
- ours layer / ours global: `compute_masks(..., MaskRequest(method="magnitude", scope=...))`
  (exact counts, source sha256 of every weight, bit-packed file; no figure).
GB/s counts the bytes of the targeted bf16 weights. Targets (issue 2): layer >= 60% of the raw
read GB/s; global <= 1.5x the layer time; peak RSS <= largest shard + 1 GB; file <= 1.02 x numel/8.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {  # hidden, intermediate, layers, attention heads, kv heads, vocab
    "small": (1024, 2816, 4, 16, 4, 32000),
    "1.1b": (2048, 5632, 22, 32, 4, 32000),
    "7b": (4096, 11008, 32, 32, 32, 32000),
}
CONFIGS = ("raw", "sha256", "naive", "layer", "global")


def model_tensors(shape: str) -> list[tuple[str, tuple[int, int]]]:
    """(name, shape) of a Llama-like model in Hugging Face naming and order."""
    hidden, inter, layers, heads, kv_heads, vocab = SHAPES[shape]
    kv = hidden // heads * kv_heads
    names = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}"
        names += [
            (f"{p}.self_attn.q_proj.weight", (hidden, hidden)),
            (f"{p}.self_attn.k_proj.weight", (kv, hidden)),
            (f"{p}.self_attn.v_proj.weight", (kv, hidden)),
            (f"{p}.self_attn.o_proj.weight", (hidden, hidden)),
            (f"{p}.mlp.gate_proj.weight", (inter, hidden)),
            (f"{p}.mlp.up_proj.weight", (inter, hidden)),
            (f"{p}.mlp.down_proj.weight", (hidden, inter)),
            (f"{p}.input_layernorm.weight", (hidden,)),
            (f"{p}.post_attention_layernorm.weight", (hidden,)),
        ]
    return names + [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def write_checkpoint(directory: Path, shape: str, shard_bytes: int) -> None:
    """Random bf16 weights (std 0.02) in shards of about `shard_bytes`, with an index.

    Shards are planned from the shapes first and generated one at a time, so this process
    never holds more than one shard.
    """
    from safetensors.torch import save_file

    plan: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, dims in model_tensors(shape):
        nbytes = 2 * int(torch.tensor(dims).prod())
        if size and size + nbytes > shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append((name, dims))
        size += nbytes
    generator = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, entries in enumerate(plan):
        file = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
        tensors = {
            name: (torch.randn(dims, generator=generator) * 0.02).to(torch.bfloat16) for name, dims in entries
        }
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        total += sum(t.numel() * 2 for t in tensors.values())
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    (directory / "config.json").write_text(
        json.dumps({"model_type": "llama", "_name_or_path": f"synthetic-{shape}"})
    )


def peak_rss_bytes() -> int:
    """This process's peak RSS since exec (VmHWM). `ru_maxrss` would also count the parent's
    memory at fork time, which Linux carries across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def targeted(directory: Path) -> list[str]:
    from modelzoo_ext.hf_checkpoint import HFCheckpoint
    from modelzoo_ext.masks.targets import TargetRule

    return [n for n in HFCheckpoint(directory).keys() if TargetRule().matches(n)]  # noqa: SIM118


def run_config(config: str, directory: Path, out: Path, sparsity: float) -> dict:
    """One configuration, timed, in this (fresh) process."""
    from safetensors.torch import load_file, save_file

    from modelzoo_ext.hf_checkpoint import HFCheckpoint
    from modelzoo_ext.masks.compute import MaskRequest, compute_masks  # imports are not timed

    names = targeted(directory)
    checkpoint = HFCheckpoint(directory)
    started = time.perf_counter()
    file_bytes = 0
    if config == "raw":
        for _name, tensor in checkpoint.iter_tensors(names):
            tensor.clone()  # get_tensor maps the file lazily: copying reads every byte once
    elif config == "sha256":
        from modelzoo_ext.masks.format import tensor_sha256

        for _name, tensor in checkpoint.iter_tensors(names):
            tensor_sha256(tensor)  # what the mask file's source checksums cost alone, one core
    elif config == "naive":
        state = {}
        for shard in checkpoint.shards():
            state.update(load_file(str(shard)))
        masks = {}
        for name in names:
            scores = state[name].float().abs().reshape(-1)
            k = round(sparsity * scores.numel())
            threshold = torch.kthvalue(scores, k).values if k else scores.min() - 1
            masks[name] = (state[name].float().abs() > threshold).contiguous()
        save_file(masks, str(out))
        file_bytes = out.stat().st_size
    else:
        request = MaskRequest(method="magnitude", scope=config, sparsities=(sparsity,))
        compute_masks(directory, request, out, plot=False)
        file_bytes = out.stat().st_size
    seconds = time.perf_counter() - started
    return {
        "config": config,
        "seconds": seconds,
        "peak_rss_bytes": peak_rss_bytes(),
        "file_bytes": file_bytes,
    }


def evict_from_page_cache(directory: Path) -> None:
    """Drop this checkpoint's pages from the OS page cache (other files untouched)."""
    for path in directory.glob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_in_subprocess(
    config: str, directory: Path, workdir: Path, sparsity: float, cold: bool = False, threads: int = 1
) -> dict:
    """Run one configuration in a fresh interpreter (its own peak RSS); returns its row."""
    if cold:
        evict_from_page_cache(directory)
    command = [sys.executable, __file__, "--worker", config, "--dir", str(directory)]
    command += ["--sparsity", str(sparsity), "--threads", str(threads)]
    command += ["--out", str(workdir / f"{config}.safetensors")]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    result = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1.1b")
    parser.add_argument("--shard-gb", type=float, default=1.0, help="approximate shard size (default 1 GB)")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument(
        "--cache",
        choices=("warm", "cold"),
        default="warm",
        help="warm: shards in the page cache (measures compute); cold: evicted before each row (reads the disk)",
    )
    parser.add_argument("--workdir", help="where to write the checkpoint (default: a temporary directory)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads in every row (default 1: 2 shared cores)"
    )
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        torch.set_num_threads(args.threads)
        print(json.dumps(run_config(args.worker, Path(args.dir), Path(args.out), args.sparsity)))
        return

    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="bench_masks_") as tmp:
        directory = Path(tmp) / "model"
        directory.mkdir()
        t0 = time.perf_counter()
        write_checkpoint(directory, args.shape, int(args.shard_gb * 1e9))
        shard_sizes = [p.stat().st_size for p in directory.glob("*.safetensors")]
        print(
            f"synthetic {args.shape} bf16 checkpoint: {len(shard_sizes)} shards, largest "
            f"{max(shard_sizes) / 1e9:.2f} GB, written in {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
        from modelzoo_ext.hf_checkpoint import HFCheckpoint

        checkpoint = HFCheckpoint(directory)
        names = targeted(directory)
        numel = sum(int(torch.tensor(checkpoint.shape(n)).prod()) for n in names)
        weight_bytes = numel * 2
        cold = args.cache == "cold"
        run_in_subprocess("raw", directory, Path(tmp), args.sparsity)  # warm the page cache, untimed
        rows = {
            c: run_in_subprocess(c, directory, Path(tmp), args.sparsity, cold, args.threads)
            for c in args.configs
        }

    raw = rows.get("raw")
    print(
        f"\n{len(names)} targeted tensors, {numel / 1e9:.3f} G weights ({weight_bytes / 1e9:.2f} GB bf16), "
        f"sparsity {args.sparsity}, page cache {args.cache}, torch threads {args.threads}"
    )
    header = f"{'config':<8} {'seconds':>8} {'GB/s':>6} {'x raw':>6} {'peak RSS GB':>11} {'file MB':>9} {'file/(numel/8)':>14}"
    print(header)
    print("-" * len(header))
    for config, row in rows.items():
        gbps = weight_bytes / row["seconds"] / 1e9
        ratio = f"{gbps / (weight_bytes / raw['seconds'] / 1e9):.2f}" if raw else "-"
        file_mb = f"{row['file_bytes'] / 1e6:.1f}" if row["file_bytes"] else "-"
        file_ratio = f"{row['file_bytes'] / (numel / 8):.4f}" if row["file_bytes"] else "-"
        print(
            f"{config:<8} {row['seconds']:>8.2f} {gbps:>6.2f} {ratio:>6} {row['peak_rss_bytes'] / 1e9:>11.2f} "
            f"{file_mb:>9} {file_ratio:>14}"
        )
    if {"raw", "layer", "global"} <= rows.keys():
        layer, glob = rows["layer"], rows["global"]
        largest = max(shard_sizes)
        checks = [
            (
                "layer GB/s >= 0.60 x raw read",
                raw["seconds"] / layer["seconds"] >= 0.60,
                f"{raw['seconds'] / layer['seconds']:.2f}",
            ),
            (
                "global time <= 1.5 x layer time",
                glob["seconds"] <= 1.5 * layer["seconds"],
                f"{glob['seconds'] / layer['seconds']:.2f}",
            ),
            (
                "peak RSS <= largest shard + 1 GB",
                max(layer["peak_rss_bytes"], glob["peak_rss_bytes"]) <= largest + 1e9,
                f"{max(layer['peak_rss_bytes'], glob['peak_rss_bytes']) / 1e9:.2f} vs {(largest + 1e9) / 1e9:.2f} GB",
            ),
            (
                "file <= 1.02 x numel/8",
                layer["file_bytes"] <= 1.02 * numel / 8,
                f"{layer['file_bytes'] / (numel / 8):.4f}",
            ),
        ]
        print("\ntargets:")
        for text, ok, value in checks:
            print(f"  {'MET    ' if ok else 'NOT MET'} {text}: {value}")
    if {"raw", "sha256"} <= rows.keys():
        # The file must hold a sha256 of every source weight; one stream hashes on one core, and
        # at best every core hashes a different tensor with nothing else left to do.
        per_core = raw["seconds"] / rows["sha256"]["seconds"]
        cores = os.cpu_count() or 1
        print(
            f"\nsha256 alone reads+hashes at {per_core:.2f} x the raw read on one core: with selection "
            f"free and all {cores} cores hashing, no magnitude mask here can exceed {per_core * cores:.2f} x raw read"
        )


if __name__ == "__main__":
    main()
