"""Add modelzoo-sparse-lora to an existing environment (a ModelZoo release's) without changing it.

    python scripts/install_into_env.py --venv /path/to/modelzoo/venv [--extras dev] [--no-deps PKG==V ...]

On a Cerebras cluster the client stack (cerebras-pytorch, cerebras-appliance, ModelZoo and what it
pins: transformers, lm-eval, datasets, ...) must stay the one the cluster's release ships. This
script installs this package editable into VENV so that only missing packages are added:

1. it writes a constraints file pinning every installed distribution to its installed version;
2. `pip install --dry-run --report` with those constraints shows what pip would do; any package
   that is already installed at another version is refused (nothing is installed), and so is a
   resolution pip cannot make without a change (pip's own message says which requirement clashes);
3. the same install runs for real, then `--no-deps` packages (the offline assets) are added, each
   only if it is missing or already at that version;
4. the environment is listed again and compared with step 1: any changed version is reported and
   the exit status is 1 (pip cannot undo it; the report names what to reinstall).

Standard library only: it runs before this package is installed, with any Python 3.
Exit status: 0 installed with no change, 1 something changed anyway, 2 refused (nothing installed).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
THIS_PACKAGE = "modelzoo-sparse-lora"


def canonical(name: str) -> str:
    """PEP 503 normalised distribution name (`Foo_Bar.baz` -> `foo-bar-baz`)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed(python: str) -> dict[str, str]:
    """{canonical name: version} of every distribution installed in the environment of `python`."""
    out = subprocess.run(
        [python, "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return {canonical(row["name"]): row["version"] for row in json.loads(out)}


def write_constraints(versions: dict[str, str], path: Path) -> None:
    """One `name==version` line per installed distribution, this package excepted."""
    lines = [f"{name}=={version}" for name, version in sorted(versions.items()) if name != THIS_PACKAGE]
    path.write_text("\n".join(lines) + "\n")


def planned_changes(report: dict, before: dict[str, str]) -> list[str]:
    """Installed packages (other than this one) that pip's dry-run report would replace."""
    changes = []
    for item in report.get("install", []):
        meta = item["metadata"]
        name = canonical(meta["name"])
        if name != THIS_PACKAGE and name in before and before[name] != meta["version"]:
            changes.append(f"{meta['name']} {before[name]} -> {meta['version']}")
    return changes


def pip_install(python: str, args: list[str]) -> subprocess.CompletedProcess:
    """`python -m pip install ARGS`, output captured."""
    cmd = [python, "-m", "pip", "install", "--disable-pip-version-check", *args]
    return subprocess.run(cmd, capture_output=True, text=True)


def diff(before: dict[str, str], after: dict[str, str]) -> tuple[list[str], list[str]]:
    """(added `name==version`, changed `name old -> new` or removed), this package excepted."""
    added = [f"{n}=={v}" for n, v in sorted(after.items()) if n not in before and n != THIS_PACKAGE]
    changed = [
        f"{n} {v} -> {after.get(n, 'removed')}"
        for n, v in sorted(before.items())
        if n != THIS_PACKAGE and after.get(n) != v
    ]
    return added, changed


def main(argv: list[str] | None = None) -> int:
    """Run the four steps of the module docstring; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", required=True, type=Path, help="the existing environment")
    parser.add_argument("--extras", default="", help="extras of this package, e.g. `dev`")
    parser.add_argument(
        "--no-deps", nargs="*", default=[], metavar="PKG==V", help="also add these, without dependencies"
    )
    args = parser.parse_args(argv)
    python = str(args.venv / "bin" / "python")
    if not Path(python).exists():
        print(
            f"install_into_env: {python} not found: --venv must be an existing environment", file=sys.stderr
        )
        return 2
    target = f"{REPO}[{args.extras}]" if args.extras else str(REPO)
    before = installed(python)
    with tempfile.TemporaryDirectory() as tmp:
        constraints, report_path = Path(tmp) / "constraints.txt", Path(tmp) / "report.json"
        write_constraints(before, constraints)
        common = ["-c", str(constraints), "-e", target]
        dry = pip_install(python, ["--dry-run", "--quiet", "--report", str(report_path), *common])
        if dry.returncode != 0:
            print(dry.stdout + dry.stderr, file=sys.stderr)
            print(
                f"install_into_env: refused, nothing installed: pip cannot add {THIS_PACKAGE} to {args.venv} "
                "without changing an installed package (the clash is named above; the installed versions "
                "are held by a constraints file made from this environment).",
                file=sys.stderr,
            )
            return 2
        changes = planned_changes(json.loads(report_path.read_text()), before)
        if changes:
            print(
                f"install_into_env: refused, nothing installed: pip would change {', '.join(changes)}",
                file=sys.stderr,
            )
            return 2
        real = pip_install(python, ["--quiet", *common])
    if real.returncode != 0:
        print(real.stdout + real.stderr, file=sys.stderr)
        return 1
    for spec in args.no_deps:
        name, _, version = spec.partition("==")
        have = before.get(canonical(name))
        if have is not None and have != version:
            print(
                f"install_into_env: {name} {have} is installed; not replacing it with {version}",
                file=sys.stderr,
            )
            continue
        if have is None and pip_install(python, ["--quiet", "--no-deps", spec]).returncode != 0:
            print(f"install_into_env: could not add {spec}", file=sys.stderr)
            return 1
    added, changed = diff(before, installed(python))
    print(f"install_into_env: {THIS_PACKAGE} installed editable from {REPO} into {args.venv}")
    print(f"  added ({len(added)}): {' '.join(added) or 'nothing'}")
    print(f"  changed ({len(changed)}): {'; '.join(changed) or 'nothing'}")
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
