"""Running one external step of a sweep: logged, its failure classified, retried when transient.

A step is a command (`masks compute`, `gpu_reference.train`, `cszoo fit`, `sparse-lora eval`, ...)
whose stdout and stderr are appended to a log. When it fails, the output of that attempt (never
the echoed command line) decides what happens next:
    transient  appliance gRPC UNAVAILABLE, DEADLINE_EXCEEDED, connection resets/refusals, NCCL
               timeouts -> retried with exponential backoff
    stop       disk full, quota exceeded -> `SweepStopped`: every further run would fail too
    permanent  anything else -> `StepFailed` at once

`run_step` is what the sweep calls: one step under a `StepPolicy` (attempts, first backoff),
with a progress line saying what runs where (each step's own progress bar stays in its log).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

TRANSIENT_PATTERNS = (
    r"StatusCode\.UNAVAILABLE",
    r"\bUNAVAILABLE\b.*(grpc|appliance|cluster)",
    r"(grpc|rpc).*\bUNAVAILABLE\b",
    r"DEADLINE_EXCEEDED",
    r"Connection reset by peer",
    r"Connection refused",
    r"Socket closed",
    r"Temporary failure in name resolution",
    r"ResourceExhausted.*(queue|slot|system)",
    r"NCCL.*(timeout|Timeout|unhandled system error)",
)
STOP_PATTERNS = (
    r"No space left on device",
    r"Disk quota exceeded",
    r"\bENOSPC\b",
    r"\bEDQUOT\b",
    r"quota exceeded",
)


def classify_failure(log_text: str) -> Literal["transient", "stop", "permanent"]:
    """`stop` (disk full / quota: the sweep must stop), `transient` (retry later) or `permanent`."""
    if any(re.search(p, log_text, re.IGNORECASE) for p in STOP_PATTERNS):
        return "stop"
    if any(re.search(p, log_text) for p in TRANSIENT_PATTERNS):
        return "transient"
    return "permanent"


class SweepStopped(Exception):
    """A failure that makes every further run pointless (disk full, quota)."""


class StepFailed(Exception):
    """A step failed for good (permanent, or transient past the allowed attempts)."""


def run_logged(command: list[str], log_path: Path, *, env: dict[str, str] | None = None) -> tuple[int, int]:
    """Run `command`, appending its stdout+stderr to `log_path`.

    Returns the exit status and the log offset where this attempt's output starts (after the
    echoed command line, which must not be classified as output).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n$ {shlex.join(command)}\n")
        log.flush()
        start = log.tell()
        try:
            status = subprocess.run(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, check=False
            ).returncode
        except FileNotFoundError:  # the program itself is missing: a permanent failure, said in the log
            log.write(f"command not found: {command[0]} (is it installed in this environment?)\n")
            status = 127
    return status, start


def run_with_retries(
    command: list[str],
    log_path: Path,
    *,
    max_attempts: int,
    backoff_s: float,
    sleep: Callable[[float], None] = time.sleep,
    env: dict[str, str] | None = None,
) -> int:
    """Run a step until it succeeds; retry only transient failures. Returns the attempts used.

    Raises `SweepStopped` for disk-full/quota failures and `StepFailed` otherwise.
    """
    for attempt in range(1, max_attempts + 1):
        status, start = run_logged(command, log_path, env=env)
        if status == 0:
            return attempt
        with open(log_path, encoding="utf-8", errors="replace") as f:
            f.seek(start)
            kind = classify_failure(f.read())
        if kind == "stop":
            raise SweepStopped(f"{command[0]}: disk full or quota exceeded (see {log_path})")
        if kind == "permanent" or attempt == max_attempts:
            raise StepFailed(f"{kind} failure after {attempt} attempt(s) (see {log_path})")
        sleep(backoff_s * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class StepPolicy:
    """How a sweep step is retried: at most `max_attempts` tries, waiting `backoff_s`, doubled each time."""

    max_attempts: int = 4
    backoff_s: float = 30.0


def step_name(command: list[str]) -> str:
    """`masks compute`, `gpu_reference.train`, `cszoo`, ... for progress lines."""
    if "modelzoo_ext.cli" in command:
        words = command[command.index("modelzoo_ext.cli") + 1 :][:2]
        return " ".join(w for w in words if not w.startswith("-"))
    if "-m" in command:
        return command[command.index("-m") + 1]
    return Path(command[0]).name


def run_step(command: list[str], log: Path, policy: StepPolicy) -> int:
    """One logged, retried step with a progress line before and after; returns the attempts used."""
    from tqdm import tqdm

    started = time.time()
    tqdm.write(f"[{time.strftime('%H:%M:%S')}] {step_name(command)} -> {log}")
    attempts = run_with_retries(command, log, max_attempts=policy.max_attempts, backoff_s=policy.backoff_s)
    tqdm.write(f"[{time.strftime('%H:%M:%S')}]   done in {time.time() - started:.0f} s")
    return attempts
