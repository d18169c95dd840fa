"""The memory plan against measured memory (CPU), and the flagships' plans on 80 GB GPUs.

    python benchmarks/memory_plan.py                 # scaled-down Llamas: plan terms vs measured, CPU
    python benchmarks/memory_plan.py --flagships     # the table in docs/gpu_reference.md ("Memory plan")
    python benchmarks/memory_plan.py --flagships --data DIR   # ... with a prepared data directory's lengths

Measured (default): random Llamas of widths 512-2048 and 2-8 layers (MLP 3.5 x width, 64-wide
heads, 2 query heads per key/value head, vocabulary 8192), pruned by 50% random masks, sparse LoRA
r 16 on all 7 projections with the masks held as bits (as the trainer holds them), float32 on the CPU, one `gpu_reference.step.train_step` (AdamW) of 2
samples x 256 tokens. The models of one mode run one after another in one process with
`MALLOC_MMAP_THRESHOLD_=65536`, so freed tensors leave the RSS and the RSS follows what torch
holds (each model is freed before the next is built). Columns:

    weights   plan: base weights + masks + LoRA factors   measured: RSS after building the model
                                                          minus RSS before (imports done)
    saved     the activations autograd keeps, counted (distinct storages, saved-tensor hooks)
    step      plan: activations + largest transient       measured: peak RSS during the step
              + LoRA grads and AdamW state (the           (high-water mark reset before it,
              reserve is left out: on a GPU it adds       /proc/self/clear_refs) minus RSS before it
              2 GiB and 10% for the CUDA context and
              the caching allocator)

Flagships (`--flagships`): `plan_memory` of every `model_configs/params_sparse_lora_*.yaml` 7B+
file against its model's real config.json (tests/fixtures/hf_configs, no weights), on 1 GPU and
on 8 GPUs with FSDP, 80 GB each (80e9 bytes: 74.5 GiB), with `auto` micro-batches (the largest
that fits), without and with activation checkpointing. Masks at 50% sparsity (what the files'
mask_path names): density 0.5, above the CUDA sampled-product limit, so no index. Sequences: the
configured maximum (worst case), or `--data` a prepared directory's longest sample after trimming.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = [(512, 2), (512, 8), (1024, 2), (1024, 4), (1024, 8), (2048, 2), (2048, 4)]
BATCH, TOKENS, VOCAB = 2, 256, 8192
FLAGSHIPS = {
    "Llama-3.1-8B": ("params_sparse_lora_llama3p1_8b.yaml", "Llama-3.1-8B"),
    "Mistral-7B": ("params_sparse_lora_mistral_7b.yaml", "Mistral-7B-v0.1"),
    "Llama-2-7B": ("params_sparse_lora_llama2_7b.yaml", "Llama-2-7B"),
    "Mixtral-8x7B": ("params_sparse_lora_mixtral_8x7b.yaml", "Mixtral-8x7B-v0.1"),
}
MIB = 2**20


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def hf_config(width: int, layers: int) -> dict:
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=width, num_hidden_layers=layers, num_attention_heads=width // 64,
        num_key_value_heads=width // 128, intermediate_size=int(3.5 * width), vocab_size=VOCAB,
        max_position_embeddings=TOKENS, tie_word_embeddings=False,
    )  # fmt: skip
    return config.to_dict()


def run_config(mode: str, layers_config: dict, tmp: Path):
    """A run config for the model (the plan reads its LoRA block, optimizer, batch and precision)."""
    import yaml

    from modelzoo_ext.run_config import hf_to_cs_model_config, load_run_config

    model = hf_to_cs_model_config(layers_config, "llama")
    model.update(name="sparse_lora_llama", sparse_lora={"mode": mode, "r": 16, "alpha": 32.0,
                 "target_modules": TARGETS, "mask_path": "masks.safetensors"})  # fmt: skip
    init = {"model": model, "optimizer": {"AdamW": {"lr": 1e-4}}, "loop": {"max_steps": 1},
            "precision": {"enabled": False}}  # fmt: skip
    loader = {"data_processor": "GptHDF5MapDataProcessor", "data_dir": str(tmp), "batch_size": BATCH}
    path = tmp / f"params_{mode}.yaml"
    path.write_text(yaml.safe_dump({"trainer": {"init": init, "fit": {"train_dataloader": loader}}}))
    return load_run_config(path)


def measure(width: int, layers: int, mode: str) -> dict:
    """One model in this process: RSS deltas of building it and of one training step."""
    import tempfile

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from gpu_reference.data import SequenceStats
    from gpu_reference.memory_plan import plan_memory
    from gpu_reference.model_shape import model_shape
    from gpu_reference.optim import AdamW
    from gpu_reference.step import StepConfig, train_step
    from modelzoo_ext.sparse_lora import SparseLoRAConfig, apply_sparse_lora_

    torch.manual_seed(0)
    config = hf_config(width, layers)
    before_model = _status_bytes("VmRSS")
    model = LlamaForCausalLM(LlamaConfig(**config))
    g = torch.Generator().manual_seed(1)
    masks = {}
    for name, p in model.named_parameters():
        if name.rsplit(".", 2)[-2] in TARGETS:
            masks[name] = torch.rand(p.shape, generator=g) >= 0.5
            with torch.no_grad():
                p.mul_(masks[name])
    apply_sparse_lora_(model, SparseLoRAConfig(mode=mode, r=16, alpha=32.0, target_modules=TARGETS,
                                               mask_path="m"), masks, mask_base_in_forward="auto", pack_mask=True)  # fmt: skip
    del masks
    model.train()
    weights = _status_bytes("VmRSS") - before_model
    ids = torch.randint(0, VOCAB, (BATCH, TOKENS + 1), generator=g, dtype=torch.int32)
    loss_mask = torch.zeros(BATCH, TOKENS, dtype=torch.int32)
    loss_mask[:, -2:] = 1
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "attention_mask": loss_mask}
    saved = count_saved(model, batch)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = AdamW(trainable, lr=1e-4)
    before_step = _status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    train_step(model, optimizer, trainable, [batch], StepConfig(batch_size=BATCH))
    step = _status_bytes("VmHWM") - before_step
    with tempfile.TemporaryDirectory() as tmp:
        cfg = run_config(mode, config, Path(tmp))
        densities = {f"{name}.weight": 0.5 for name in model_shape(config, TARGETS, 16).target_numel}
        plan = plan_memory(cfg, config, sequences=SequenceStats(TOKENS, 2, "bench"), device_type="cpu",
                           mask_densities=densities)  # fmt: skip
    terms = {t.name: t.bytes for t in plan.terms}
    plan_weights = terms["base weights"] + terms["masks"] + terms["LoRA factors + grads + optimizer"] // 4
    lora_grads_and_state = terms["LoRA factors + grads + optimizer"] * 3 // 4
    dynamic = terms["activations"] + terms["largest transient"] + terms["bf16 casts of frozen weights (s2d)"]
    plan_step = dynamic + lora_grads_and_state
    return {"width": width, "layers": layers, "mode": mode, "weights": weights, "plan_weights": plan_weights,
            "saved": saved, "plan_activations": terms["activations"], "step": step, "plan_step": plan_step}  # fmt: skip


def count_saved(model, batch) -> int:
    """Bytes of the distinct storages autograd saves in the model's forward (parameters and buffers excluded)."""
    import torch

    from gpu_reference.loss import loss_sums

    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in own:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sums = loss_sums(model, batch, False, torch.device("cpu"))
    del sums
    return sum(seen.values())


def measure_all(mode: str) -> None:
    """Every shape in this process, one JSON line each (the model freed before the next)."""
    import gc

    for width, layers in SHAPES:
        print(json.dumps(measure(width, layers, mode)), flush=True)
        gc.collect()


def measured_table() -> None:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "2"}
    first = True
    for mode in ("sparse_to_sparse", "sparse_to_dense"):
        proc = subprocess.Popen(
            [sys.executable, __file__, "--child", mode], stdout=subprocess.PIPE, text=True, env=env
        )
        for line in proc.stdout:
            if line.startswith("{"):
                print_row(json.loads(line), header=first)
                first = False
        if proc.wait() != 0:
            raise SystemExit(f"the {mode} measurements failed")


def print_row(r: dict, header: bool) -> None:
    if header:
        print(f"random Llama, MLP 3.5x, vocab {VOCAB}, r 16 on 7 projections, 50% masks, fp32 CPU, "
              f"batch {BATCH} x {TOKENS} tokens; MiB")  # fmt: skip
        print(f"{'width':>5} {'layers':>6} {'mode':<4} | {'weights plan':>12} {'measured':>9} {'ratio':>6} | "
              f"{'activations plan':>16} {'saved':>8} {'ratio':>6} | {'step plan':>9} {'measured':>9} {'ratio':>6}")  # fmt: skip
    mode = "s2s" if r["mode"] == "sparse_to_sparse" else "s2d"
    print(f"{r['width']:>5} {r['layers']:>6} {mode:<4} | {r['plan_weights'] / MIB:>12.1f} {r['weights'] / MIB:>9.1f} "
          f"{r['weights'] / r['plan_weights']:>6.3f} | {r['plan_activations'] / MIB:>16.1f} {r['saved'] / MIB:>8.1f} "
          f"{r['saved'] / r['plan_activations']:>6.3f} | {r['plan_step'] / MIB:>9.1f} {r['step'] / MIB:>9.1f} "
          f"{r['step'] / r['plan_step']:>6.3f}", flush=True)  # fmt: skip


def flagship_table(data: str | None) -> None:
    """`plan_memory` of each flagship on 1 and 8 GPUs of 80 GB, `auto` micro-batch."""
    from gpu_reference.data import sequence_stats
    from gpu_reference.memory_plan import GIB, largest_micro_batch, plan_memory
    from gpu_reference.model_shape import model_shape
    from modelzoo_ext.run_config import load_run_config

    sequences = sequence_stats(data) if data else None
    print(f"sequences: {sequences.source if sequences else 'each file worst case: max_position_embeddings tokens, every position a loss token'}")  # fmt: skip
    print("device: 80 GB (80e9 bytes = 74.5 GiB) per GPU; float32 base; masks at 50% sparsity; micro-batch: auto (the largest that fits)")  # fmt: skip
    print("| model | GPUs | checkpointing | micro-batch | base | masks | LoRA+AdamW | activations | transient | reserve | total GiB | fits |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for model, (params, fixture) in FLAGSHIPS.items():
        cfg = load_run_config(REPO / "model_configs" / params)
        config = json.loads(
            (REPO / "tests" / "fixtures" / "hf_configs" / f"{fixture}.config.json").read_text()
        )
        shape = model_shape(config, cfg.sparse_lora.target_modules, cfg.sparse_lora.r)
        densities = {f"{name}.weight": 0.5 for name in shape.target_numel}
        for gpus in (1, 8):
            for checkpointing in (False, True):
                args = dict(world_size=gpus, fsdp=gpus > 1, device_memory=80 * 10**9,
                            activation_checkpointing=checkpointing, sequences=sequences, mask_densities=densities)  # fmt: skip
                micro = largest_micro_batch(cfg, config, **args)
                plan = plan_memory(cfg, config, micro_batch_size=micro or 1, **args)
                t = {term.name: term.bytes / GIB for term in plan.terms}
                base = t["base weights"] + t.get("FSDP unsharded units", 0.0)
                print(f"| {model} | {gpus}{' FSDP' if gpus > 1 else ''} | {'yes' if checkpointing else 'no'} | "
                      f"{micro or '1 (none fits)'} | {base:.1f} | {t['masks']:.1f} | {t['LoRA factors + grads + optimizer']:.1f} | "
                      f"{t['activations']:.1f} | {t['largest transient'] + t['bf16 casts of frozen weights (s2d)']:.1f} | "
                      f"{t['reserve']:.1f} | {plan.total / GIB:.1f} | {'yes' if plan.fits else 'no'} |")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flagships", action="store_true", help="the flagships' plans on 80 GB GPUs")
    parser.add_argument("--data", metavar="DIR", help="with --flagships: a prepared data directory's lengths")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # mode: measure every shape, JSON lines
    args = parser.parse_args(argv)
    if args.child:
        measure_all(args.child)
    elif args.flagships:
        flagship_table(args.data)
    else:
        measured_table()
    return 0


if __name__ == "__main__":
    sys.exit(main())
