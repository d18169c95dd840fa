"""The versions of the software stack a run uses, and whether its ModelZoo release was tested.

On a Cerebras cluster the release is the cluster's, not the user's: the client's cerebras-pytorch
and cerebras-appliance must match the appliance, and ModelZoo pins the libraries around them
(transformers, lm-eval, datasets). `stack_versions()` is the one place that reads them (installed
package metadata only, `importlib.metadata`: nothing is imported, and no `cerebras` module is
touched); `sparse-lora modelzoo status` prints it. `run_versions()` adds what a run record needs
beside it (Python, torch's build tag and CUDA, this project's git revision): the reference trainer's
`run.json` and every sweep run's record take their versions from it, so a number can always be
traced to the release that produced it.

`release_warning()` says when the installed ModelZoo release is not one this package was tested
with (a warning, never a refusal: the APIs it uses were unchanged from 2.6 to 2.10), or when
cerebras-pytorch is not the release ModelZoo pins.
"""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

# Reported name -> distribution name, in the order printed.
STACK_DISTRIBUTIONS: dict[str, str] = {
    "modelzoo-sparse-lora": "modelzoo-sparse-lora",
    "cerebras-modelzoo": "cerebras_modelzoo",
    "cerebras-pytorch": "cerebras_pytorch",
    "cerebras-appliance": "cerebras_appliance",
    "torch": "torch",
    "transformers": "transformers",
    "lm-eval": "lm_eval",
    "datasets": "datasets",
    "peft": "peft",
}

# ModelZoo releases whose environment (built by scripts/build_modelzoo_env.sh) passed `make test`
# with this package, the `modelzoo` tests included (docs/modelzoo.md, "Releases").
TESTED_RELEASES = ("2.6.0", "2.8.0", "2.9.0", "2.10.0")


def stack_versions() -> dict[str, str | None]:
    """{name: installed version, or None where not installed} for every entry of STACK_DISTRIBUTIONS."""
    versions: dict[str, str | None] = {}
    for name, distribution in STACK_DISTRIBUTIONS.items():
        try:
            versions[name] = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(version.split(".")[:2])


def release_warning(versions: dict[str, str | None]) -> str | None:
    """A warning about the ModelZoo release in `versions` (from `stack_versions()`), or None.

    None where ModelZoo is not installed (nothing to run on a cluster) or is a tested release whose
    cerebras-pytorch has the same major.minor.
    """
    release, client = versions.get("cerebras-modelzoo"), versions.get("cerebras-pytorch")
    if release is None:
        return None
    if release not in TESTED_RELEASES:
        return (
            f"ModelZoo {release} is not a release this package was tested with "
            f"({', '.join(TESTED_RELEASES)}); it may work (the APIs it uses were unchanged from 2.6 to 2.10), "
            "but run the tiny CPU run first (docs/modelzoo.md, 'The tiny run')"
        )
    if client is not None and _major_minor(client) != _major_minor(release):
        return (
            f"cerebras-pytorch {client} does not match ModelZoo {release}: install the cerebras-pytorch "
            "of your cluster's release, as ModelZoo's requirements.txt pins it"
        )
    return None


def git_revision() -> str:
    """This project's git revision (with `-dirty` when the tree has changes), or `unknown` (not a checkout)."""
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, check=True)  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True)  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def run_versions() -> dict[str, str | None]:
    """`stack_versions()` plus Python, torch's version with its build tag (`2.4.0+cu121`: the package
    metadata says `2.4.0`) and the CUDA it was built for (None: a CPU build), and the git revision."""
    versions = {**stack_versions(), "python": sys.version.split()[0], "git_revision": git_revision()}
    if versions["torch"] is not None:
        import torch

        versions.update(torch=torch.__version__, torch_cuda=torch.version.cuda)
    return versions
