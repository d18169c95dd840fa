"""`sparse-lora masks compute|validate|apply|import`.

The `masks` group's subparsers are stored in `groups["masks"]`, so the converters add
`masks hf-to-cs|cs-to-hf` beside these. Heavy imports stay inside the handlers.
"""

from __future__ import annotations

import argparse
import json
import sys

from modelzoo_ext.errors import UserError

METHODS = ("magnitude", "random", "wanda", "gradient", "taylor")  # == scores.METHODS (kept light here)


def _compute(args: argparse.Namespace) -> int:
    from modelzoo_ext.masks.calibration import CalibrationConfig
    from modelzoo_ext.masks.compute import MaskRequest, compute_masks

    request = MaskRequest(
        method=args.method,
        structure=args.structure,
        scope=args.scope,
        sparsities=tuple(args.sparsity or ()),
        seed=args.seed,
        include=args.include,
        exclude=args.exclude,
        calibration=CalibrationConfig(
            text_file=args.calibration_text,
            data_dir=args.calibration_data,
            tokens=args.calibration_tokens,
            seq_len=args.calibration_seqlen,
            seed=args.seed,
            device=args.device,
        ),
    )
    for stats in compute_masks(args.model, request, args.out, plot=not args.no_plot):
        print(
            f"{stats['mask_file']}: requested {stats['requested_sparsity']:g}, "
            f"achieved {stats['achieved_sparsity']:.6f} over {stats['numel']:,} weights "
            f"({len(stats['tensors'])} tensors, {stats['file_bytes']:,} bytes)"
        )
    return 0


def _validate(args: argparse.Namespace) -> int:
    from modelzoo_ext.atomic import atomic_file
    from modelzoo_ext.masks.validate import validate_masks

    if args.tolerance is not None and args.expected_sparsity is None:
        raise UserError("--tolerance needs --expected-sparsity", where="masks validate")
    report = validate_masks(
        args.mask_file,
        model_dir=args.model,
        expected_sparsity=args.expected_sparsity,
        tolerance=args.tolerance or 0.0,
    )
    text = json.dumps(report, indent=2)
    if args.report:
        with atomic_file(args.report) as tmp:
            tmp.write_text(text)
    else:
        print(text)
    if not report["valid"]:
        first = next(c for c in report["checks"] if not c["ok"])
        raise UserError(
            f"{report['failures']} check(s) failed; first: {first['check']}: {first['detail']}",
            where=args.mask_file,
            fix="recompute the masks for this model (`sparse-lora masks compute`)",
        )
    print(f"{args.mask_file}: valid ({len(report['checks'])} checks)", file=sys.stderr)
    return 0


def _apply(args: argparse.Namespace) -> int:
    from modelzoo_ext.masks.apply import apply_masks

    record = apply_masks(args.model, args.masks, args.out)
    print(
        f"{args.out}: pruned checkpoint written and checked ({record['masked_tensors']} tensors, "
        f"{record['zeroed_positions']:,} zeroed positions, sparsity {record['achieved_sparsity']:.6f})"
    )
    return 0


def _import(args: argparse.Namespace) -> int:
    from modelzoo_ext.masks.importers import import_masks

    metadata = import_masks(
        args.old_file,
        args.model,
        args.out,
        allow_pickle=args.allow_pickle,
        include=args.include,
        exclude=args.exclude,
    )
    print(
        f"{args.out}: {len(metadata['tensors'])} masks imported from {metadata['imported_from']['format']}, "
        f"sparsity {metadata['achieved_sparsity']:.6f}"
    )
    return 0


def _add_targets(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--include",
        metavar="REGEX",
        help="tensors to mask (re.search on parameter names); replaces the default rule "
        "(attention q,k,v,o and MLP gate,up,down projections; Mixtral experts w1,w2,w3)",
    )
    parser.add_argument("--exclude", metavar="REGEX", help="tensors to leave unmasked among those included")


def register(subparsers: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    """Add `masks compute|validate|apply|import` to `sparse-lora`."""
    masks = subparsers.add_parser(
        "masks",
        help="compute, validate, apply and import pruning masks",
        description="Pruning masks: one bit-packed safetensors file per sparsity level (True = kept).",
    )
    sub = masks.add_subparsers(dest="masks_command", metavar="SUBCOMMAND", required=True)
    groups["masks"] = sub

    compute = sub.add_parser(
        "compute",
        help="compute pruning masks from a Hugging Face checkpoint (streams tensor by tensor)",
        description="Score targeted weights, select exact masks, write one mask file per sparsity "
        "level with <stem>.stats.json and <stem>.png next to it.",
        epilog="example: sparse-lora masks compute --model llama-7b --method magnitude --scope global "
        "--sparsity 0.5 0.7 --out masks/llama.safetensors  (-> masks/llama_sparsity0.5.safetensors, ...)",
    )
    compute.add_argument("--model", required=True, metavar="HF_DIR", help="Hugging Face model directory")
    compute.add_argument(
        "--method", choices=METHODS, default="magnitude", help="importance score (default: magnitude)"
    )
    compute.add_argument(
        "--structure",
        default="unstructured",
        metavar="{unstructured,N:M,rows,cols}",
        help="unstructured (default); N:M e.g. 2:4 (exactly N kept of every M inputs); rows; cols",
    )
    compute.add_argument(
        "--scope",
        choices=("layer", "global"),
        default="layer",
        help="layer: each tensor gets exactly its share (default); global: one threshold over all targets",
    )
    compute.add_argument(
        "--sparsity", type=float, nargs="+", metavar="S", help="fraction pruned, in [0, 1); several allowed"
    )
    compute.add_argument(
        "--out",
        required=True,
        metavar="PATH",
        help="mask file (.safetensors); with several levels, " "<stem>_sparsity<S>.safetensors beside it",
    )
    _add_targets(compute)
    compute.add_argument("--seed", type=int, default=0, help="seed of random scores and calibration sampling")
    compute.add_argument(
        "--calibration-text",
        metavar="FILE",
        help="UTF-8 text for wanda/gradient/taylor (default: the passages of BoolQ's training part, bundled)",
    )
    compute.add_argument(
        "--calibration-data",
        metavar="DIR",
        help="calibrate on a `data prepare` directory (e.g. the task's training data), tokenized already",
    )
    compute.add_argument(
        "--calibration-tokens", type=int, default=2048, help="calibration tokens (default 2048)"
    )
    compute.add_argument(
        "--calibration-seqlen", type=int, default=256, help="tokens per sequence (default 256)"
    )
    compute.add_argument(
        "--device", default="cpu", help="device for calibration forward/backward (default cpu)"
    )
    compute.add_argument("--no-plot", action="store_true", help="skip the PNG figure")
    compute.set_defaults(func=_compute)

    validate = sub.add_parser(
        "validate",
        help="check a mask file (checksums, counts, N:M, and against a model); exit 0 only if all hold",
        description="Prints a JSON report (or writes --report). Exit 0 only when every check holds, 2 otherwise.",
    )
    validate.add_argument("mask_file", metavar="MASK_FILE")
    validate.add_argument(
        "--model", metavar="HF_DIR", help="also check names, shapes, targets and weight checksums"
    )
    validate.add_argument("--expected-sparsity", type=float, metavar="S")
    validate.add_argument("--tolerance", type=float, metavar="T", help="allowed |achieved - S| (default 0)")
    validate.add_argument("--report", metavar="FILE", help="write the JSON report here instead of stdout")
    validate.set_defaults(func=_validate)

    apply = sub.add_parser(
        "apply",
        help="write the pruned HF checkpoint (zeros at pruned positions), shard by shard, checked",
        description="Same shard layout and index; config and tokenizer files copied; the result is read "
        "back and checked (masked positions zero, all else bit-identical) before it appears under --out.",
    )
    apply.add_argument("--model", required=True, metavar="HF_DIR")
    apply.add_argument(
        "--masks", required=True, metavar="FILE", help="mask file from `masks compute`/`import`"
    )
    apply.add_argument("--out", required=True, metavar="DIR", help="new model directory")
    apply.set_defaults(func=_apply)

    imp = sub.add_parser(
        "import",
        help="convert masks from .pt (seed project), .npz, or a pruned checkpoint's zeros",
        description="OLD_FILE: a .npz of bool/0-1 arrays, a seed-project .pt {'masks': {module: bool}, "
        "'metadata': {...}} (needs --allow-pickle; loaded with weights_only=True), or a directory "
        "holding an already-pruned HF checkpoint (mask = weight != 0).",
    )
    imp.add_argument("old_file", metavar="OLD_FILE")
    imp.add_argument("--model", required=True, metavar="HF_DIR", help="the model the masks belong to")
    imp.add_argument("--out", required=True, metavar="FILE", help="mask file to write")
    imp.add_argument("--allow-pickle", action="store_true", help="accept .pt/.pth/.bin (pickle) input")
    _add_targets(imp)
    imp.set_defaults(func=_import)
