"""What a scheduler says about one array task, in words that mean the same on SLURM and PBS.

    PENDING        queued, held, or waiting for its dependency
    RUNNING        started and not yet ended (including SLURM's COMPLETING, PBS's E)
    COMPLETED      ended with exit status 0
    FAILED         ended with a non-zero exit status (`exit_code`), or killed by a signal
    CANCELLED      deleted by a user or an administrator, or never run because its dependency
                   can never be met (SLURM `DependencyNeverSatisfied` with --kill-on-invalid-dep)
    TIMEOUT        killed at its time limit
    OUT_OF_MEMORY  killed at its memory limit
    NODE_FAIL      lost with its node (SLURM NODE_FAIL / BOOT_FAIL, PBS MoM failures)
    UNKNOWN        the scheduler no longer knows the task (SLURM forgets jobs MinJobAge seconds
                   after they end when accounting is disabled), or could not be asked

A task that is PENDING or RUNNING is active: `submit` never submits its run again while it is.
Whether a run is done is never read from these states: the run's own record says so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

STATES = (
    "PENDING",
    "RUNNING",
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "UNKNOWN",
)
ACTIVE = frozenset({"PENDING", "RUNNING"})


@dataclass(frozen=True)
class TaskState:
    """One array task as the scheduler reports it.

    `raw` is the scheduler's own word (SLURM `DEADLINE`, PBS `X`/substate 93, ...); `exit_code` the
    task's exit status where it ended by exiting; `reason` what the scheduler says about why.
    """

    state: str
    raw: str = ""
    exit_code: int | None = None
    signal: int | None = None
    reason: str = ""

    def __post_init__(self) -> None:
        if self.state not in STATES:
            raise ValueError(f"unknown task state {self.state!r}")

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    def describe(self) -> str:
        """`FAILED (exit 3)`, `CANCELLED (DependencyNeverSatisfied)`, `RUNNING`, ..."""
        details = []
        if self.exit_code not in (None, 0):
            details.append(f"exit {self.exit_code}")
        if self.signal:
            details.append(f"signal {self.signal}")
        if self.reason and self.reason not in ("None", self.raw):
            details.append(self.reason)
        return f"{self.state} ({', '.join(details)})" if details else self.state

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
