"""Command-line arguments of the trainer, kept free of heavy imports so `sparse-lora --help` stays fast."""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class MemoryOptions:
    """How a run uses device memory (command-line options). None changes what is computed beyond
    float32 rounding, except `bf16_base` (a bfloat16 frozen base, not what a CS-3 computes).

    micro_batch_size: "N", "auto", "none", or None (the run config's own setting);
    device_memory: e.g. "80GB" (None: read from the GPU; unknown on the CPU);
    sampled_product: the s2s weight-gradient path ("auto", "never", "always").
    """

    micro_batch_size: str | None = None
    activation_checkpointing: bool = False
    bf16_base: bool = False
    device_memory: str | None = None
    sampled_product: str = "auto"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> MemoryOptions:
        return cls(args.micro_batch_size, args.activation_checkpointing, args.bf16_base, args.device_memory,
                   args.sampled_product)  # fmt: skip


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `python -m gpu_reference.train` and `sparse-lora train`."""
    parser.add_argument("params", metavar="PARAMS_YAML", help="the run config (ModelZoo trainer layout)")
    parser.add_argument(
        "--hf-model", required=True, metavar="HF_DIR", help="the Hugging Face Llama/Mistral model"
    )
    parser.add_argument("--out", metavar="RUN_DIR", help="run directory [default: <model_dir>/gpu_reference]")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="[default: cuda when available]")
    parser.add_argument(
        "--masks", metavar="MASK_FILE", help="an HF-named mask file overriding sparse_lora.mask_path"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--skip-provenance-check",
        action="store_true",
        help="use the masks even when --hf-model is neither their source checkpoint nor its pruned output "
        "(logged; same as sparse_lora.skip_provenance_check: true)",
    )
    parser.add_argument(
        "--fsdp",
        action="store_true",
        help="under torchrun (2+ processes): shard the frozen base weights across the ranks with "
        "FSDP, one unit per decoder layer, for bases that do not fit one device; LoRA factors "
        "stay whole on every rank (see docs/gpu_reference.md)",
    )
    memory = parser.add_argument_group("memory (docs/gpu_reference.md, 'Memory plan')")
    memory.add_argument(
        "--plan",
        action="store_true",
        help="print the memory plan per device and stop before any weight is read (exit 2 when it "
        "does not fit); --hf-model needs only its config.json",
    )
    memory.add_argument(
        "--device-memory",
        metavar="SIZE",
        help="memory of one device, e.g. 80GB (10^9 bytes) or 80GiB [default: read from the GPU]",
    )
    memory.add_argument(
        "--world-size",
        type=int,
        metavar="N",
        help="with --plan: plan for N torchrun processes [default: WORLD_SIZE or 1]",
    )
    memory.add_argument(
        "--micro-batch-size",
        metavar="N|auto|none",
        help="samples per forward/backward on a rank; the gradients of the batch are the same "
        "[default: the run config's csx.performance.micro_batch_size, else the whole slice]",
    )
    memory.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="recompute each decoder layer in backward (transformers' gradient checkpointing, "
        "non-reentrant): same losses and gradients, far less activation memory, ~1/3 more compute",
    )
    memory.add_argument(
        "--bf16-base",
        action="store_true",
        help="hold the frozen base in bfloat16 (half the memory; changes numerics against the CS-3, "
        "which keeps float32 weights; recorded in run.json)",
    )
    memory.add_argument(
        "--sampled-product",
        choices=("auto", "never", "always"),
        default="auto",
        help="s2s weight gradients as a sampled product where it pays (auto; its index costs 12 bytes "
        "per kept weight) or always dense (never)",
    )
