"""The layers of docs/layers.md: every module belongs to one, and import-linter keeps them.

`make test` runs `lint-imports` itself; these tests make sure its contracts cannot go stale: a
new module that no layer lists would escape every check, and a contract that is never broken
may be checking nothing.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONFIG = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
PACKAGES = CONFIG["root_packages"]


def _layers() -> list[list[str]]:
    contract = next(c for c in CONFIG["contracts"] if c["id"] == "layers")
    layers = []
    for layer in contract["layers"]:
        separator = "|" if "|" in layer else ":"
        layers.append([name.strip() for name in layer.split(separator)])
    return layers


def _modules() -> list[str]:
    found = []
    for package in PACKAGES:
        found.append(package)
        path = REPO / package
        found += [m.name for m in pkgutil.walk_packages([str(path)], prefix=f"{package}.")]
    return found


def _layer_of(module: str) -> int | None:
    for index, layer in enumerate(_layers()):
        if any(module == name or module.startswith(name + ".") for name in layer):
            return index
    return None


def test_every_module_is_in_a_layer():
    roots = set(PACKAGES)  # a package's own __init__ sits above everything it contains
    unassigned = [m for m in _modules() if m not in roots and _layer_of(m) is None]
    assert not unassigned, f"add these modules to a layer in pyproject.toml: {unassigned}"


def test_package_roots_import_nothing_of_the_package():
    """`import modelzoo_ext` (which every core module implies) must not pull a face in."""
    for package in PACKAGES:
        source = (REPO / package / "__init__.py").read_text()
        imports = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
        assert not [line for line in imports if any(p in line for p in PACKAGES)], (package, imports)


LINT = "import sys; from importlinter.cli import lint_imports_command; sys.argv[1:] = ['--no-cache']; lint_imports_command()"


def _lint_imports() -> subprocess.CompletedProcess:
    """`lint-imports` with this interpreter (the console script may not be on PATH)."""
    return subprocess.run([sys.executable, "-c", LINT], cwd=REPO, capture_output=True, text=True, check=False)


@pytest.fixture
def upward_import():
    """A core module that imports the reference trainer (removed afterwards)."""
    path = REPO / "modelzoo_ext" / "masks" / "_layer_probe.py"
    path.write_text("import gpu_reference.train  # noqa: F401\n")
    yield path
    path.unlink()


def test_contracts_are_kept_and_catch_an_upward_import(upward_import):
    result = _lint_imports()
    assert result.returncode != 0
    assert "modelzoo_ext.masks._layer_probe -> gpu_reference.train" in result.stdout, result.stdout[-3000:]
    upward_import.write_text("")
    kept = _lint_imports()
    assert kept.returncode == 0, kept.stdout[-3000:]
