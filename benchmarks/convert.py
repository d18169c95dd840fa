"""Benchmark `convert hf-to-cs` (and `cs-to-hf --as merged`) peak memory on a synthetic sharded checkpoint.

    python benchmarks/convert.py                  # ~0.6 GB fp32 Llama-shaped model, 100 MB shards
    python benchmarks/convert.py --shape 1b       # ~4.4 GB fp32 (hidden 2048, 22 layers), 1 GB shards
    python benchmarks/convert.py --shape small    # quick check

Each row runs in a fresh subprocess, all in the same run; its peak RSS is VmHWM, reset after the
imports (`ru_maxrss` is not used: Linux carries it over from the parent across fork + exec).
- baseline: the subprocess imports torch and cerebras-pytorch and does nothing else;
- hf-to-cs: `convert_hf_to_cs(model, out, "llama", masks)` (weights + masks -> .mdl);
- cs-to-hf: `export_cs_to_hf(out/model.mdl, out/model_config.yaml, ..., kind="merged")`.
Target (issue 5): hf-to-cs peak RSS <= 2 x largest shard + 1 GB (it includes the
~0.5 GB torch + cerebras-pytorch hold after import). A non-streaming conversion would need at
least the checkpoint's total size (printed above the table) twice.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab, shard size
    "small": (512, 1408, 4, 8, 2, 32000, "40MB"),
    "default": (1024, 2816, 8, 8, 2, 32000, "100MB"),
    "1b": (2048, 5632, 22, 16, 4, 32000, "1GB"),
}

CHILD = """
import json, sys, time
import torch, cerebras.pytorch  # the baseline imports exactly these
job = json.loads(sys.argv[1])
# Reset the peak-RSS mark (VmHWM) so the imports' transient does not hide the work's own peak.
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
start = time.perf_counter()
if job["kind"] == "hf-to-cs":
    from mask_converters.hf_to_cs import convert_hf_to_cs
    convert_hf_to_cs(job["model"], job["out"], "llama", job["masks"])
elif job["kind"] == "cs-to-hf":
    from mask_converters.cs_to_hf import export_cs_to_hf
    export_cs_to_hf(job["ckpt"], job["config"], job["out"], kind="merged", progress=False, max_shard_bytes=job["shard"])
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({"seconds": time.perf_counter() - start,
                  "work_peak_rss": int(status["VmHWM"].split()[0]) * 1024}))
"""


def write_synthetic(root: Path, shape: str) -> tuple[Path, Path, int, int]:
    """A Llama-shaped fp32 checkpoint (random weights) in shards, and random 50% masks (HF naming)."""
    from mask_converters.hf_writer import ShardedSafetensorsWriter, parse_size
    from modelzoo_ext.masks.format import MaskWriter
    from modelzoo_ext.tiny_models import tiny_config

    hidden, inter, layers, heads, kv, vocab, shard = SHAPES[shape]
    head_dim = hidden // heads
    shapes = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv * head_dim, hidden),
            p + "self_attn.v_proj.weight": (kv * head_dim, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        })  # fmt: skip
    model_dir = root / "hf"
    model_dir.mkdir()
    writer = ShardedSafetensorsWriter(model_dir, parse_size(shard))
    masks = MaskWriter(root / "masks.safetensors", naming="hf", metadata={"method": "random"})
    gen = torch.Generator().manual_seed(0)
    for name, size in shapes.items():
        tensor = torch.randn(size, generator=gen) * 0.02
        if "_proj" in name:
            mask = torch.rand(size, generator=gen) < 0.5
            tensor = torch.where(mask, tensor, torch.zeros(()))
            masks.add(name, mask)
        writer.add(name, tensor)
    files = writer.close()
    masks.write()
    config = tiny_config("llama").to_dict()
    config.update(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv, vocab_size=vocab, head_dim=head_dim)  # fmt: skip
    (model_dir / "config.json").write_text(json.dumps(config))
    sizes = [f.stat().st_size for f in files]
    return model_dir, root / "masks.safetensors", max(sizes), sum(sizes)


def run(job: dict) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="2")
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(job)], capture_output=True, text=True, env=env
    )
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="default")
    args = parser.parse_args()
    gib = 1024**3
    with tempfile.TemporaryDirectory(prefix="bench_convert_") as tmp:
        root = Path(tmp)
        model_dir, masks, largest, total = write_synthetic(root, args.shape)
        base = run({"kind": "baseline"})
        to_cs = run(
            {"kind": "hf-to-cs", "model": str(model_dir), "out": str(root / "cs"), "masks": str(masks)}
        )
        to_hf = run({"kind": "cs-to-hf", "ckpt": str(root / "cs" / "model.mdl"), "config": str(root / "cs" / "model_config.yaml"),
                     "out": str(root / "back"), "shard": largest})  # fmt: skip
    bound = 2 * largest + gib
    print(
        f"synthetic checkpoint ({args.shape}): {total / gib:.2f} GiB fp32 in shards, largest shard {largest / gib:.3f} GiB"
    )
    print(f"{'run':<10} {'seconds':>8} {'peak RSS GiB':>13} {'bound 2xshard+1GB':>18} {'within':>7}")
    for name, row in (("baseline", base), ("hf-to-cs", to_cs), ("cs-to-hf", to_hf)):
        within = "" if name == "baseline" else ("yes" if row["work_peak_rss"] <= bound else "NO")
        print(
            f"{name:<10} {row.get('seconds', 0):>8.1f} "
            f"{row['work_peak_rss'] / gib:>13.3f} {bound / gib:>18.3f} {within:>7}"
        )


if __name__ == "__main__":
    main()
