"""`sparse-lora install-hook`: make the unmodified `cszoo` see this package's registrations.

ModelZoo only knows models, callbacks and converters registered in the same process before it
validates a YAML. The hook is one `.pth` file in site-packages whose single line imports
`modelzoo_ext.cerebras` at interpreter start when it is installed (a few milliseconds: it only
puts a small finder on `sys.meta_path`; ModelZoo and torch are not imported, see `autoregister`).
Processes spawned by ModelZoo's autorestart start the same way, so they register too.

Sites that forbid `.pth` files use the wrapper command `cszoo-sparse-lora` instead (same
arguments as `cszoo`).
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

from modelzoo_ext.atomic import atomic_file

# Sorts after `__editable__.*.pth`, so the editable install of this package is importable by then.
PTH_NAME = "zzz_modelzoo_sparse_lora.pth"
# One line (site.py executes lines that start with `import`); does nothing if the package is gone.
PTH_LINE = (
    "import importlib.util as _u; "
    "_u.find_spec('modelzoo_ext') is not None and __import__('modelzoo_ext.cerebras')\n"
)


def default_site_dir() -> Path:
    """site-packages of the running interpreter (the environment `cszoo` runs in)."""
    return Path(sysconfig.get_paths()["purelib"])


def hook_path(site_dir: str | Path | None = None) -> Path:
    """Where the `.pth` file goes."""
    return Path(site_dir or default_site_dir()) / PTH_NAME


def install_hook(site_dir: str | Path | None = None) -> Path:
    """Write the `.pth` file (atomically; rewriting it is harmless); returns its path."""
    path = hook_path(site_dir)
    with atomic_file(path) as tmp:
        tmp.write_text(PTH_LINE)
        tmp.chmod(0o644)
    return path


def uninstall_hook(site_dir: str | Path | None = None) -> Path | None:
    """Remove the `.pth` file; returns its path, or None if there was none."""
    path = hook_path(site_dir)
    if not path.exists():
        return None
    path.unlink()
    return path


def hook_installed(site_dir: str | Path | None = None) -> bool:
    """True when our `.pth` file is in place with the expected content."""
    path = hook_path(site_dir)
    return path.is_file() and path.read_text() == PTH_LINE


def hook_outdated(site_dir: str | Path | None = None) -> bool:
    """True when a `.pth` file of ours is in place but written by another version (rerun install-hook)."""
    path = hook_path(site_dir)
    return path.is_file() and path.read_text() != PTH_LINE
