"""The software a run was executed with, as its record names it: versions and this project's revision.

`software_versions()` is the one function run records take their versions from. It reads the
versions of installed distributions (`importlib.metadata`: nothing imported) and says None where
one is absent; torch alone is asked itself, because only `torch.__version__` carries the build
(`2.4.0+cu121`; the distribution says `2.4.0`), with the CUDA version it was built for. To record
another piece of software (ModelZoo, cerebras-pytorch, the appliance client), add its
distribution to `RECORDED_DISTRIBUTIONS`, or a value computed otherwise to `software_versions`.
"""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# Record key -> the distribution whose version it is.
RECORDED_DISTRIBUTIONS = {
    "transformers": "transformers",
    "lm_eval": "lm_eval",
    "peft": "peft",
}


def distribution_version(name: str) -> str | None:
    """The installed version of distribution `name` (None where it is not installed)."""
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def git_revision() -> str:
    """This project's git revision (with `-dirty` when the tree has changes), or `unknown`."""
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, check=True)  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True)  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _torch_build() -> dict[str, str | None]:
    """torch's version with its build tag, and the CUDA version it was built for (None: CPU build)."""
    try:
        import torch
    except ImportError:
        return {"torch": None, "torch_cuda": None}
    return {"torch": torch.__version__, "torch_cuda": torch.version.cuda}


def software_versions() -> dict[str, str | None]:
    """Python, this project's revision, torch (with its build), and each recorded distribution's version."""
    versions: dict[str, str | None] = {
        "python": sys.version.split()[0],
        "modelzoo_sparse_lora": git_revision(),
    }
    versions.update(_torch_build())
    versions.update({key: distribution_version(dist) for key, dist in RECORDED_DISTRIBUTIONS.items()})
    return versions
