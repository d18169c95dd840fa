"""`sparse-lora install-hook`, `sparse-lora modelzoo status` and `sparse-lora migrate-config`."""

from __future__ import annotations

import argparse

from modelzoo_ext.errors import UserError


def register(subparsers: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    """Add this stage's subcommands to `sparse-lora`."""
    hook = subparsers.add_parser(
        "install-hook",
        help="let the unmodified `cszoo` see sparse_lora_llama/_mistral (writes one .pth file)",
        description="Write a .pth file into site-packages so that every `cszoo` run registers this "
        "package's ModelZoo models, callbacks and converters. It costs a few milliseconds at "
        "interpreter start and imports nothing heavy until ModelZoo itself is imported. Sites that "
        "forbid .pth files use `cszoo-sparse-lora` (same arguments as cszoo) instead.",
    )
    hook.add_argument("--uninstall", action="store_true", help="remove the .pth file instead")
    hook.add_argument(
        "--site-dir", default=None, help="site-packages folder (default: this interpreter's purelib)"
    )
    hook.set_defaults(func=_install_hook)

    migrate = subparsers.add_parser(
        "migrate-config",
        help="turn a ModelZoo (LoRA) run config into a sparse-LoRA one, printing what changed",
        description="Read a ModelZoo trainer YAML (llama, mistral or mixtral; with or without ModelZoo's "
        "`Lora` callback) and write the sparse-LoRA run config: model name -> its sparse_lora_<family> "
        "variant, the Lora callback's r/alpha/dropout/target_modules -> the `sparse_lora` block (ModelZoo "
        "class names such as `Linear` spelled out as the Hugging Face projections they wrap), the "
        "SparseLoRAMasks and SparseLoRALossLog callbacks added, everything else kept. Each change is printed.",
    )
    migrate.add_argument("config", help="the ModelZoo run config (trainer YAML)")
    migrate.add_argument("--out", required=True, help="where to write the sparse-LoRA run config")
    migrate.add_argument(
        "--mode", choices=("s2s", "s2d", "lora"), default="s2s",
        help="sparse_to_sparse (default), sparse_to_dense, or lora (the dense baseline, no masks)",
    )  # fmt: skip
    migrate.add_argument("--mask-path", default=None, help="the mask file (needed for s2s and s2d)")
    migrate.set_defaults(func=_migrate_config)

    modelzoo = subparsers.add_parser(
        "modelzoo", help="ModelZoo integration: status", description="ModelZoo integration commands."
    )
    sub = modelzoo.add_subparsers(dest="modelzoo_command", metavar="COMMAND", required=True)
    groups["modelzoo"] = sub
    status = sub.add_parser(
        "status",
        help="is ModelZoo installed, is the hook in place, are our models registered",
        description="Report the versions of the stack (ModelZoo release, cerebras-pytorch, "
        "cerebras-appliance, transformers, lm-eval, ...) and the ModelZoo releases this package was tested "
        "with (an untested release gets a warning, not a refusal), whether Cerebras ModelZoo and "
        "cerebras-pytorch are importable, whether the install-hook .pth is in place, and which sparse-LoRA "
        "model names ModelZoo's registry knows (imports ModelZoo; takes a few seconds). Exit status 1 when "
        "something `cszoo fit` needs is missing.",
    )
    status.set_defaults(func=_status)


def _migrate_config(args: argparse.Namespace) -> int:
    from pathlib import Path

    from modelzoo_ext.run_config import load_yaml, write_yaml
    from modelzoo_ext.run_config.migrate import migrate_run_config

    if Path(args.out).resolve() == Path(args.config).resolve():
        raise UserError("--out is the input file", where="--out", fix="write the migrated config elsewhere")
    migration = migrate_run_config(
        load_yaml(args.config), mode=args.mode, mask_path=args.mask_path, where=args.config
    )
    write_yaml(args.out, migration.params)
    print(f"{args.config} -> {args.out}:")
    for change in migration.changes:
        print(f"  {change}")
    return 0


def _install_hook(args: argparse.Namespace) -> int:
    from modelzoo_ext.cerebras.hook import hook_path, install_hook, uninstall_hook

    if args.uninstall:
        removed = uninstall_hook(args.site_dir)
        print(f"removed {removed}" if removed else f"no hook at {hook_path(args.site_dir)}")
        return 0
    site = hook_path(args.site_dir).parent
    if not site.is_dir():
        raise UserError("site-packages folder not found", where=str(site), fix="pass an existing --site-dir")
    print(f"wrote {install_hook(args.site_dir)}; `cszoo fit <params_sparse_lora_*.yaml>` now works")
    return 0


def _status(args: argparse.Namespace) -> int:
    import importlib.util

    from modelzoo_ext.cerebras.hook import hook_installed, hook_outdated, hook_path
    from modelzoo_ext.versions import TESTED_RELEASES, release_warning, stack_versions

    versions = stack_versions()
    for name, version in versions.items():
        print(f"{name:22} {version or 'not installed'}")
    print(f"tested with ModelZoo releases: {', '.join(TESTED_RELEASES)}")
    warning = release_warning(versions)
    if warning:
        print(f"WARNING  {warning}")

    def importable(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            return False

    checks = {
        "cerebras.pytorch (cerebras-pytorch)": importable("cerebras.pytorch"),
        "cerebras.modelzoo (ModelZoo, editable install)": importable("cerebras.modelzoo"),
        "bigcode_eval (ModelZoo requirement; cszoo fit imports it)": importable("bigcode_eval"),
        f"install-hook ({hook_path()})": hook_installed(),
    }
    for what, ok in checks.items():
        print(f"{'ok     ' if ok else 'MISSING'}  {what}")
    if hook_outdated():
        print(
            f"OUTDATED install-hook: {hook_path()} was written by another version; rerun `sparse-lora install-hook`"
        )
    if checks["cerebras.modelzoo (ModelZoo, editable install)"]:
        from modelzoo_ext.cerebras.registration import model_paths, registered_model_names

        names = registered_model_names()
        print(f"registered models: {', '.join(names) or 'none'} (expected {', '.join(model_paths())})")
        from modelzoo_ext.cerebras.converters import converter_registry_note

        print(f"checkpoint converters: {converter_registry_note()}")
    missing = [what for what, ok in checks.items() if not ok and not what.startswith("install-hook")]
    return 1 if missing else 0
