"""Outputs appear under their final name only when complete.

Write into a temporary sibling, then rename: a crash, a Ctrl-C or a failed check leaves no
half-written file or directory under the name the user asked for. `atomic_files` does it for
several files that belong together: none is renamed unless all were written.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `final`; rename it onto `final` if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600; give the result the permissions a plain open() would.
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, final)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_files(finals: Iterable[str | os.PathLike]) -> Iterator[dict[Path, Path]]:
    """Yield {final: temporary sibling} for several outputs; all are renamed onto their final
    names if the block succeeds, and all temporaries are removed (none renamed) if it fails."""
    with contextlib.ExitStack() as stack:
        yield {Path(final): stack.enter_context(atomic_file(final)) for final in finals}


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory next to `final`; it replaces `final` on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o777 & ~_umask())  # mkdtemp creates 0700
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp_path, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp_path, final)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)
