"""`sparse-lora convert hf-to-cs|cs-to-hf`, `sparse-lora masks hf-to-cs|cs-to-hf`, `sparse-lora validate`.

Heavy imports (torch, cerebras-pytorch) happen inside the handlers so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from modelzoo_ext.families import FAMILY_NAMES as FAMILY_CHOICES


def _print_json(data: dict) -> None:
    print(json.dumps(data, indent=2, default=str))


def _hf_to_cs(args: argparse.Namespace) -> int:
    from mask_converters.hf_to_cs import convert_hf_to_cs

    summary = convert_hf_to_cs(
        args.model, args.out, args.family, args.masks, skip_provenance_check=args.skip_provenance_check
    )
    summary.pop("model")
    _print_json(summary)
    return 0


def _cs_to_hf(args: argparse.Namespace) -> int:
    import torch

    from mask_converters.cs_to_hf import export_cs_to_hf
    from mask_converters.hf_writer import parse_size

    dtype = getattr(torch, args.dtype) if args.dtype else None
    summary = export_cs_to_hf(
        args.checkpoint,
        args.config,
        args.out,
        kind=args.kind,
        family=args.family,
        masks_path=args.masks,
        base_model=args.base_model,
        dtype=dtype,
        max_shard_bytes=parse_size(args.max_shard_size),
    )
    check = summary.pop("sparsity_check", None)
    if check is not None and summary.get("merged_is_sparse"):
        summary["sparsity"] = {k: check[k] for k in ("ok", "matched", "total_violations")}
    _print_json(summary)
    return 0


def _layout_from(config: str, family: str):
    """RopeLayout from a HF directory / config.json, or from a trainer YAML."""
    from modelzoo_ext.errors import UserError
    from modelzoo_ext.name_map import RopeLayout
    from modelzoo_ext.run_config import find_model_section, load_yaml

    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".json":
        if not path.is_file():
            raise UserError("config.json not found", where=str(path))
        return RopeLayout.from_hf_config(json.loads(path.read_text()))
    return RopeLayout.from_cs_config(find_model_section(load_yaml(path), str(path)))


def _masks_convert(to_naming: str):
    def handler(args: argparse.Namespace) -> int:
        from mask_converters.mask_files import convert_mask_file

        layout = _layout_from(args.config, args.family)
        metadata = convert_mask_file(args.masks, args.out, args.family, layout, to_naming=to_naming)
        _print_json({"out": args.out, "naming": to_naming, "tensors": len(metadata["tensors"])})
        return 0

    return handler


def _validate(args: argparse.Namespace) -> int:
    from mask_converters.validate import validate_checkpoint

    report = validate_checkpoint(args.checkpoint, args.masks, family=args.family, config_path=args.config)
    summary = {k: report[k] for k in ("ok", "matched", "total_violations", "missing", "shape_mismatches")}
    summary["embedded_mask_mismatches"] = report["embedded_mask_mismatches"]
    if args.out:
        from modelzoo_ext.atomic import atomic_file

        with atomic_file(args.out) as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")
        summary["report"] = args.out
    _print_json(summary)
    return 0 if report["ok"] else 1


def _register_convert(subparsers: argparse._SubParsersAction) -> None:
    convert = subparsers.add_parser(
        "convert",
        help="convert checkpoints between Hugging Face and Cerebras ModelZoo (weights, masks, LoRA)",
        description="HF <-> Cerebras conversion through one rule table per family (names and the RoPE "
        "q/k row permutation), applied identically to weights, masks and LoRA tensors.",
    )
    sub = convert.add_subparsers(dest="convert_command", metavar="SUBCOMMAND", required=True)

    to_cs = sub.add_parser(
        "hf-to-cs",
        help="HF model directory (+ masks) -> ModelZoo .mdl + trainer-YAML model section",
        description="Writes OUT/model.mdl (with <param>_mask entries), OUT/model_config.yaml and, with "
        "--masks, OUT/masks_cs.safetensors. Streams tensor by tensor.",
        epilog="example: sparse-lora convert hf-to-cs --model pruned-llama --masks masks.safetensors "
        "--family llama --out cs/llama",
    )
    to_cs.add_argument("--model", required=True, metavar="HF_DIR", help="HF model directory (safetensors)")
    to_cs.add_argument("--masks", metavar="MASK_FILE", help="mask file in HF naming")
    to_cs.add_argument("--family", choices=FAMILY_CHOICES, required=True)
    to_cs.add_argument("--out", required=True, metavar="DIR", help="output directory (replaced atomically)")
    to_cs.add_argument(
        "--skip-provenance-check",
        action="store_true",
        help="accept masks that were computed neither on --model nor for it (logged); by default such "
        "masks are refused (see docs/masks.md, 'Provenance')",
    )
    to_cs.set_defaults(func=_hf_to_cs)

    to_hf = sub.add_parser(
        "cs-to-hf",
        help="fine-tuned ModelZoo checkpoint -> merged HF model or PEFT adapter (+ masks in HF naming)",
        description="--as merged: LoRA folded in (s2s: (W+sBA)*M with zero violations checked, else "
        "nothing is written). --as adapter (sparse_to_dense only): a PEFT adapter for the pruned HF base. "
        "Both hold sparse_lora_masks.safetensors (HF naming).",
        epilog="example: sparse-lora convert cs-to-hf --checkpoint model_dir/checkpoint_100.mdl --config "
        "params_sparse_lora.yaml --base-model pruned-llama --as merged --out hf/merged",
    )
    to_hf.add_argument("--checkpoint", required=True, metavar="CKPT", help="CS checkpoint (.mdl)")
    to_hf.add_argument("--config", required=True, metavar="PARAMS_YAML", help="the run's trainer YAML")
    to_hf.add_argument("--out", required=True, metavar="DIR", help="output directory (replaced atomically)")
    to_hf.add_argument("--as", dest="kind", choices=("merged", "adapter"), default="merged")
    to_hf.add_argument("--family", choices=FAMILY_CHOICES, help="default: from the model name in the config")
    to_hf.add_argument(
        "--masks", metavar="MASK_FILE", help="mask file (either naming); default: the checkpoint's"
    )
    to_hf.add_argument(
        "--base-model",
        metavar="HF_DIR",
        help="the (pruned) HF base: its config.json and tokenizer are used, and adapters point at it",
    )
    to_hf.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), help="default: the checkpoint's"
    )
    to_hf.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default 5GB)")
    to_hf.set_defaults(func=_cs_to_hf)


def _register_masks(
    subparsers: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]
) -> None:
    if "masks" not in groups:  # the masks stage registers the group first; stay usable without it
        masks = subparsers.add_parser("masks", help="pruning masks")
        groups["masks"] = masks.add_subparsers(dest="masks_command", metavar="SUBCOMMAND", required=True)
    sub = groups["masks"]
    for name, to_naming, config_help in (
        ("hf-to-cs", "cs", "HF model directory or its config.json"),
        ("cs-to-hf", "hf", "trainer YAML (or model_config.yaml from `convert hf-to-cs`)"),
    ):
        parser = sub.add_parser(
            name,
            help=f"rename a mask file to {to_naming.upper()} naming (q/k rows permuted like the weights)",
            description="Names through the family's rule table; q/k mask rows permuted between rotate-half "
            "(HF) and interleaved (CS) RoPE order; provenance carried over.",
        )
        parser.add_argument("--masks", required=True, metavar="MASK_FILE", help="input mask file")
        parser.add_argument(
            "--config", required=True, metavar="CONFIG", help=config_help + " (attention layout)"
        )
        parser.add_argument("--family", choices=FAMILY_CHOICES, required=True)
        parser.add_argument("--out", required=True, metavar="MASK_FILE", help="output mask file")
        parser.set_defaults(func=_masks_convert(to_naming))


def _register_validate(subparsers: argparse._SubParsersAction) -> None:
    validate = subparsers.add_parser(
        "validate",
        help="check a checkpoint on disk (HF dir or .mdl) against its masks; exit 1 on any violation",
        description="Per-tensor violations (nonzeros off the mask), densities and mask checksums. Never "
        "valid when no tensor matched. Exit 0 valid, 1 invalid, 2 bad input.",
    )
    validate.add_argument("--checkpoint", required=True, metavar="PATH", help="HF model directory or CS .mdl")
    validate.add_argument("--masks", required=True, metavar="MASK_FILE", help="mask file (either naming)")
    validate.add_argument("--family", choices=FAMILY_CHOICES, help="default: from the checkpoint's config")
    validate.add_argument("--config", metavar="PARAMS_YAML", help="for a .mdl without recorded config")
    validate.add_argument("--out", metavar="REPORT_JSON", help="write the full per-tensor report here")
    validate.set_defaults(func=_validate)


def register(subparsers: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    """Add `convert ...`, `masks hf-to-cs|cs-to-hf` and `validate` to `sparse-lora`."""
    _register_convert(subparsers)
    _register_masks(subparsers, groups)
    _register_validate(subparsers)
