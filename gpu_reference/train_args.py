"""Command-line arguments of the trainer, kept free of heavy imports so `sparse-lora --help` stays fast."""

from __future__ import annotations

import argparse


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
