"""How much a filesystem will still take: free space (`os.statvfs`) and, where a quota tool answers,
the user's quota on it.

    room = filesystem_room(path)     # Room(free=..., quota_left=..., notes=[...]); .limit = the smaller

Quota tools, asked in turn (each may be absent, or have nothing to say about this filesystem):
- Lustre: `lfs quota -q -u USER MOUNT`: one line per filesystem, `MOUNT KBYTES QUOTA LIMIT GRACE
  FILES ...` in KiB (a value may end in `*` when over quota); the hard limit, else the soft one.
- Linux disk quota: `quota -w -u USER` (`-w`: one line per filesystem): `DEVICE BLOCKS QUOTA
  LIMIT GRACE FILES ...` in 1 KiB blocks, matched to the device `path` is mounted from.
A limit of 0 means no limit. The parsing follows the tools' documented layouts; it was tested on
such output, not on a live Lustre or quota server.
"""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

KIB = 1024


@dataclass
class Room:
    """What a filesystem will still take, and where each number comes from."""

    path: str
    free: int  # bytes the user may still write by statvfs (f_bavail)
    quota_left: int | None = None  # bytes left under the tightest quota found (None: none found)
    notes: list[str] = field(default_factory=list)

    @property
    def limit(self) -> int:
        """The bytes that can still be written: the free space, or the quota left when smaller."""
        return self.free if self.quota_left is None else min(self.free, self.quota_left)


def existing_ancestor(path: str | Path) -> Path:
    """`path`, or its nearest existing parent (a sweep's run directories may not exist yet)."""
    path = Path(path).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def mount_of(path: Path) -> tuple[str, str]:
    """(mount point, device) of the filesystem holding `path`, from /proc/mounts (longest match)."""
    best = ("/", "")
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return best
    for line in lines:
        parts = line.split()
        if len(parts) >= 2:
            mount = parts[1].replace("\\040", " ")
            if (str(path) == mount or str(path).startswith(mount.rstrip("/") + "/")) and len(mount) >= len(
                best[0]
            ):
                best = (mount, parts[0])
    return best


def _run(argv: list[str]) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode in (0, 1) else None  # quota exits 1 when over a limit


def _kib(value: str) -> int:
    return int(value.rstrip("*")) * KIB


def _left(used: str, soft: str, hard: str) -> int | None:
    """Bytes left under the hard limit (else the soft one); None when neither is set."""
    limit = _kib(hard) or _kib(soft)
    return None if not limit else max(0, limit - _kib(used))


def parse_lfs_quota(text: str, mount: str) -> int | None:
    """Bytes left for the user on `mount` from `lfs quota -q -u USER MOUNT` output."""
    tokens = text.split()
    for i, token in enumerate(tokens):
        if token == mount and len(tokens) >= i + 4:
            try:
                return _left(tokens[i + 1], tokens[i + 2], tokens[i + 3])
            except ValueError:
                return None
    return None


def parse_quota_w(text: str, device: str, mount: str) -> int | None:
    """Bytes left for the user on the filesystem of `device` (or mounted at `mount`) from `quota -w`."""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[0] in (device, mount):
            try:
                return _left(parts[1], parts[2], parts[3])
            except ValueError:
                return None
    return None


def filesystem_room(path: str | Path) -> Room:
    """Free space and the tightest quota answered for the filesystem that will hold `path`."""
    where = existing_ancestor(path)
    stat = os.statvfs(where)
    room = Room(str(where), stat.f_bavail * stat.f_frsize, notes=[f"free space of {where}: statvfs"])
    mount, device = mount_of(where)
    user = getpass.getuser()
    answers = []
    lfs = _run(["lfs", "quota", "-q", "-u", user, mount])
    if lfs is not None and (left := parse_lfs_quota(lfs, mount)) is not None:
        answers.append((left, f"Lustre quota of {user} on {mount}: `lfs quota`"))
    quota = _run(["quota", "-w", "-u", user])
    if quota is not None and (left := parse_quota_w(quota, device, mount)) is not None:
        answers.append((left, f"disk quota of {user} on {device or mount}: `quota -w`"))
    if answers:
        left, note = min(answers)
        room.quota_left = left
        room.notes.append(note)
    else:
        room.notes.append("no quota tool answered for this filesystem (lfs, quota)")
    return room
