"""A Mixtral-shaped synthetic checkpoint for the `masks compute` benchmark; prints a table.

    python benchmarks/masks_mixtral.py                    # "small": 4 layers, 8 experts, ~0.9 GB bf16
    python benchmarks/masks_mixtral.py --shape scaled     # Mixtral-8x7B / 4 in width: 32 layers, ~5.8 GB

`model_tensors(shape)` / `hf_config(shape)` are the plug-in for `benchmarks/masks.py` (same
contract as its own `model_tensors`: (name, shape) in Hugging Face naming and order): per-expert
`block_sparse_moe.experts.{e}.w1/w2/w3` (transformers 4.57, as the hub checkpoint stores them)
plus the router `block_sparse_moe.gate` (never a mask target). Mixtral-8x7B itself (hidden 4096,
intermediate 14336, 32 layers, 8 experts; 46.7 B parameters, 19 shards of ~4.9 GB) does not fit
this machine's disk and time; "scaled" keeps its depth, expert count and shard count and divides
hidden and intermediate sizes by 4 (every expert tensor 1/16 of the real one).

Run on its own, it writes the checkpoint (shards of ~1/19 of the model) into a temporary folder
and measures `compute_masks` (magnitude, layer and global scope) in fresh processes: seconds,
GB/s of targeted weights, peak RSS (VmHWM) against the bound of issue 14, largest shard + 1 GB.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SHAPES = {  # hidden, intermediate, layers, attention heads, kv heads, experts, vocab, shards
    "small": (1024, 3584, 4, 16, 4, 8, 32000, 4),
    "scaled": (1024, 3584, 32, 8, 2, 8, 32000, 19),
    "8x7b": (4096, 14336, 32, 32, 8, 8, 32000, 19),  # the real sizes, for model_tensors only
}


def model_tensors(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of a Mixtral-like model in Hugging Face (transformers 4.57) naming and order."""
    hidden, inter, layers, heads, kv_heads, experts, vocab, _ = SHAPES[shape]
    kv = hidden // heads * kv_heads
    names = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}"
        names += [
            (f"{p}.self_attn.q_proj.weight", (hidden, hidden)),
            (f"{p}.self_attn.k_proj.weight", (kv, hidden)),
            (f"{p}.self_attn.v_proj.weight", (kv, hidden)),
            (f"{p}.self_attn.o_proj.weight", (hidden, hidden)),
            (f"{p}.block_sparse_moe.gate.weight", (experts, hidden)),
        ]
        for e in range(experts):
            q = f"{p}.block_sparse_moe.experts.{e}"
            names += [(f"{q}.w1.weight", (inter, hidden)), (f"{q}.w2.weight", (hidden, inter))]
            names += [(f"{q}.w3.weight", (inter, hidden))]
        names += [
            (f"{p}.input_layernorm.weight", (hidden,)),
            (f"{p}.post_attention_layernorm.weight", (hidden,)),
        ]
    return names + [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def hf_config(shape: str) -> dict:
    """The `config.json` of the synthetic checkpoint (model_type mixtral)."""
    hidden, inter, layers, heads, kv_heads, experts, vocab, _ = SHAPES[shape]
    return {
        "model_type": "mixtral",
        "_name_or_path": f"synthetic-mixtral-{shape}",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "num_local_experts": experts,
        "num_experts_per_tok": 2,
        "vocab_size": vocab,
    }


def write_checkpoint(directory: Path, shape: str) -> int:
    """Random bf16 weights in SHAPES' shard count, one shard in memory at a time; returns the
    largest shard's size in bytes."""
    from safetensors.torch import save_file

    tensors = model_tensors(shape)
    total = sum(2 * int(torch.tensor(d).prod()) for _, d in tensors)
    target = total / SHAPES[shape][-1]
    plan, size = [[]], 0
    for name, dims in tensors:
        nbytes = 2 * int(torch.tensor(dims).prod())
        if size and size + nbytes > target:
            plan, size = [*plan, []], 0
        plan[-1].append((name, dims))
        size += nbytes
    generator = torch.Generator().manual_seed(0)
    weight_map, largest = {}, 0
    for i, entries in enumerate(plan):
        file = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
        shard = {n: (torch.randn(d, generator=generator) * 0.02).to(torch.bfloat16) for n, d in entries}
        save_file(shard, str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
        largest = max(largest, (directory / file).stat().st_size)
        del shard
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    (directory / "config.json").write_text(json.dumps(hf_config(shape)))
    return largest


MEASURE = """
import json, sys, time
from pathlib import Path
from modelzoo_ext.masks.compute import MaskRequest, compute_masks
t0 = time.perf_counter()
compute_masks(sys.argv[1], MaskRequest(method="magnitude", scope=sys.argv[2], sparsities=(0.5,)), sys.argv[3], plot=False)
seconds = time.perf_counter() - t0
hwm = next(int(l.split()[1]) * 1024 for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "peak_rss": hwm}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=("small", "scaled"), default="small")
    args = parser.parse_args()
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        model.mkdir()
        largest = write_checkpoint(model, args.shape)
        from modelzoo_ext.hf_checkpoint import HFCheckpoint
        from modelzoo_ext.masks.targets import TargetRule

        checkpoint = HFCheckpoint(model)
        shapes = checkpoint.shapes()
        target_bytes = 2 * sum(shapes[n][0] * shapes[n][1] for n in TargetRule().select(shapes, where=tmp))
        bound = largest + 2**30
        print(f"Mixtral-shaped '{args.shape}': {target_bytes / 2**30:.2f} GiB targeted bf16 weights, "
              f"largest shard {largest / 2**30:.3f} GiB, bound {bound / 2**30:.3f} GiB")  # fmt: skip
        print(f"{'scope':<8} {'seconds':>8} {'GB/s':>7} {'peak RSS GiB':>13} {'within bound':>13}")
        for scope in ("layer", "global"):
            out = Path(tmp) / f"masks_{scope}.safetensors"
            env = {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}
            run = subprocess.run([sys.executable, "-c", MEASURE, str(model), scope, str(out)],
                                 capture_output=True, text=True, env=env, check=True)  # fmt: skip
            row = json.loads(run.stdout.strip().splitlines()[-1])
            print(f"{scope:<8} {row['seconds']:>8.1f} {target_bytes / row['seconds'] / 1e9:>7.2f} "
                  f"{row['peak_rss'] / 2**30:>13.3f} {str(row['peak_rss'] <= bound):>13}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
