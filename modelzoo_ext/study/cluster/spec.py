"""What a submission asks of the scheduler, checked before any script is written.

    Submission(scheduler="slurm", job_name="phoenix", account="proj42", partition="gpu",
               max_concurrent=16, extra_directives=("#SBATCH --qos=high",),
               train=StageResources(time="12:00:00", gpus_per_run=4, nodes_per_run=1,
                                    cpus_per_node=32, mem_per_node="256G"),
               eval=StageResources(time="2:00:00", gpus_per_run=1))

Names that become directive values (job name, account, partition or queue, PBS resource names)
must be plain: letters, digits and `._-` (`,` between partitions, `@server` after a PBS queue).
Extra directives pass through verbatim but must each be one line that starts with the scheduler's
prefix (`#SBATCH -...`, `#PBS -...`) and must not set what `submit` sets itself (array, job name,
output files, dependencies). A directive is a comment to bash, so nothing in it runs; a newline in
one would end the comment, which is why control characters are refused everywhere.
"""

from __future__ import annotations

import re
import shlex
import sys
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from modelzoo_ext.errors import UserError

Scheduler = Literal["slurm", "pbs"]
DIRECTIVE_PREFIX = {"slurm": "#SBATCH", "pbs": "#PBS"}
# Options `submit` sets itself; a second value in an extra directive would contradict it.
RESERVED_OPTIONS = {
    "slurm": {"-a", "--array", "-J", "--job-name", "-o", "--output", "-e", "--error", "-d",
              "--dependency", "--parsable", "--wrap", "-D", "--chdir", "--kill-on-invalid-dep"},
    "pbs": {"-J", "-N", "-o", "-e", "-j", "-W depend", "-W max_run_subjobs"},
}  # fmt: skip
PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
JOB_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,63}$")  # PBS wants a letter first
PARTITION = re.compile(
    r"^[A-Za-z0-9][A-Za-z0-9._-]*(,[A-Za-z0-9][A-Za-z0-9._-]*)*(@[A-Za-z0-9][A-Za-z0-9._-]*)?$"
)
RESOURCE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SELECT_ITEM = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=[A-Za-z0-9_.:+-]+$")
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
_MEMORY = re.compile(r"^(\d+)\s*([KMGT]?)(?:I?B)?$", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def time_seconds(text: str) -> int:
    """A SLURM-style time limit in seconds: `M`, `M:S`, `H:M:S`, `D-H`, `D-H:M`, `D-H:M:S`."""
    match = _TIME.match(text.strip())
    if not match:
        raise ValueError(f"time {text!r} is not M, M:S, H:M:S, D-H, D-H:M or D-H:M:S")
    days, first, second, third = match.groups()
    numbers = [int(x) for x in (first, second, third) if x is not None]
    if days is not None:  # D-H, D-H:M, D-H:M:S
        hours, minutes, seconds = (numbers + [0, 0])[:3]
        return ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds
    if len(numbers) == 3:
        return (numbers[0] * 60 + numbers[1]) * 60 + numbers[2]
    if len(numbers) == 2:
        return numbers[0] * 60 + numbers[1]
    return numbers[0] * 60


def memory_mib(text: str) -> int:
    """`64G`, `64GB`, `64GiB`, `500M`, `1T` or a number of MiB -> MiB (K rounds up)."""
    match = _MEMORY.match(text.strip())
    if not match:
        raise ValueError(f"memory {text!r} is not a number with an optional K/M/G/T unit")
    value, unit = int(match.group(1)), match.group(2).upper()
    scale = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024 * 1024}[unit]
    return max(1, -(-int(value * scale * 1024) // 1024))


class StageResources(_Strict):
    """What one task (one run's train or eval stage) gets from the scheduler."""

    time: str | None = Field(None, description="time limit, SLURM style (H:M:S, D-H:M:S, minutes)")
    gpus_per_run: int = Field(0, ge=0, description="GPUs of the whole run, spread evenly over its nodes")
    nodes_per_run: int = Field(1, ge=1)
    cpus_per_node: int | None = Field(None, ge=1)
    mem_per_node: str | None = Field(None, description="e.g. 64G")

    @field_validator("time")
    @classmethod
    def _time(cls, value: str | None) -> str | None:
        if value is not None:
            time_seconds(value)
        return value

    @field_validator("mem_per_node")
    @classmethod
    def _memory(cls, value: str | None) -> str | None:
        if value is not None:
            memory_mib(value)
        return value

    @model_validator(mode="after")
    def _gpus_spread_evenly(self) -> StageResources:
        if self.gpus_per_run % self.nodes_per_run:
            raise ValueError(f"{self.gpus_per_run} GPUs do not spread evenly over {self.nodes_per_run} nodes")
        return self

    @property
    def gpus_per_node(self) -> int:
        return self.gpus_per_run // self.nodes_per_run

    @property
    def time_s(self) -> int | None:
        return None if self.time is None else time_seconds(self.time)

    @property
    def mem_mib(self) -> int | None:
        return None if self.mem_per_node is None else memory_mib(self.mem_per_node)


class Submission(_Strict):
    """Everything `submit` asks of the scheduler, for both stages of every run."""

    scheduler: Scheduler
    job_name: str = "sparse-lora"
    account: str | None = None
    partition: str | None = Field(None, description="SLURM partition(s) / PBS queue")
    max_concurrent: int | None = Field(None, ge=1, description="array tasks running at once (%N)")
    extra_directives: tuple[str, ...] = ()
    train: StageResources = StageResources()
    eval: StageResources = StageResources()
    assets: StageResources = Field(StageResources(), description="the assets job (CPU only, one node)")
    assets_partition: str | None = Field(None, description="the assets job's partition / queue [partition]")
    python: str = Field(sys.executable, description="interpreter the tasks run (a shared filesystem path)")
    rdzv_port: int = Field(29500, ge=1024, le=64535, description="multi-node c10d rendezvous: base port")
    pbs_gpu_resource: str | None = Field(
        "ngpus", description="PBS chunk resource that counts GPUs; None where nodes come whole (Polaris)"
    )
    pbs_select: tuple[str, ...] = Field((), description="more KEY=VALUE items of the PBS select chunk")
    max_array_size: int | None = Field(None, ge=1, description="default: SLURM's 1001, PBS's 10000")

    @field_validator("python")
    @classmethod
    def _no_control_in_python(cls, value: str) -> str:
        if _CONTROL.search(value):
            raise ValueError("the interpreter path contains a control character")
        return value

    @field_validator("job_name")
    @classmethod
    def _job_name(cls, value: str) -> str:
        if not JOB_NAME.match(value):
            raise ValueError(
                f"{value!r} is not a job name (a letter, then letters, digits, `._-`, at most 64)"
            )
        return value

    @field_validator("account")
    @classmethod
    def _plain(cls, value: str | None) -> str | None:
        if value is not None and not PLAIN_NAME.match(value):
            raise ValueError(f"{value!r} is not a plain name (letters, digits, `._-`, at most 64)")
        return value

    @field_validator("partition", "assets_partition")
    @classmethod
    def _partition(cls, value: str | None) -> str | None:
        if value is not None and not PARTITION.match(value):
            raise ValueError(f"{value!r} is not a partition list (a,b) or a PBS queue (q or q@server)")
        return value

    @field_validator("pbs_gpu_resource")
    @classmethod
    def _resource(cls, value: str | None) -> str | None:
        if value is not None and not RESOURCE_NAME.match(value):
            raise ValueError(f"{value!r} is not a PBS resource name")
        return value

    @field_validator("pbs_select")
    @classmethod
    def _select(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            if not SELECT_ITEM.match(item):
                raise ValueError(f"{item!r} is not a plain KEY=VALUE select item")
        return value

    @field_validator("extra_directives")
    @classmethod
    def _directives(cls, value: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        for directive in value:
            check_directive(info.data.get("scheduler", "slurm"), directive)
        return value

    @model_validator(mode="after")
    def _pbs_only(self) -> Submission:
        if self.scheduler == "slurm" and self.pbs_select:
            raise ValueError("pbs_select is for PBS submissions")
        return self

    @model_validator(mode="after")
    def _assets_on_one_cpu_node(self) -> Submission:
        if self.assets.gpus_per_run or self.assets.nodes_per_run != 1:
            raise ValueError("the assets job runs on CPUs of one node (no GPUs, one node)")
        return self

    def resources(self, stage: str) -> StageResources:
        """What each task of a `train`, `eval` or `assets` array gets."""
        return {"train": self.train, "eval": self.eval, "assets": self.assets}[stage]

    def partition_for(self, stage: str) -> str | None:
        """The partition / queue of a stage's arrays (the assets job may have its own)."""
        return (self.assets_partition or self.partition) if stage == "assets" else self.partition

    @property
    def array_limit(self) -> int:
        """Most tasks per array: the scheduler's default MaxArraySize / max_array_size."""
        if self.max_array_size is not None:
            return self.max_array_size
        return 1001 if self.scheduler == "slurm" else 10000


def check_directive(scheduler: str, directive: str) -> None:
    """ValueError unless `directive` is one `#SBATCH -...` / `#PBS -...` line setting nothing reserved."""
    prefix = DIRECTIVE_PREFIX[scheduler]
    if _CONTROL.search(directive):
        raise ValueError(f"extra directive {directive!r} contains a newline or control character")
    if not directive.startswith(prefix + " "):
        raise ValueError(f"extra directive {directive!r} must start with `{prefix} -`")
    try:
        words = shlex.split(directive[len(prefix) :])
    except ValueError as exc:
        raise ValueError(f"extra directive {directive!r}: {exc}") from None
    if not words or not words[0].startswith("-"):
        raise ValueError(f"extra directive {directive!r} must start with `{prefix} -`")
    for position, word in enumerate(words):
        if (
            word.startswith("-")
            and _option_name(scheduler, word, words[position + 1 :]) in RESERVED_OPTIONS[scheduler]
        ):
            raise ValueError(
                f"extra directive {directive!r} sets {word.split('=')[0]}, which submit sets itself"
            )


def _option_name(scheduler: str, word: str, rest: list[str]) -> str:
    """`--output=x` -> `--output`, `-ox` -> `-o`; PBS `-W depend=...` / `-Wdepend=` -> `-W depend`."""
    if word.startswith("--"):
        return word.split("=", 1)[0]
    if scheduler == "pbs" and word.startswith("-W"):
        value = word[2:] or (rest[0] if rest else "")
        return "-W " + value.split("=", 1)[0]
    return word[:2]


def build_submission(**fields) -> Submission:
    """`Submission(**fields)`, with a bad value reported as a `UserError` naming the field."""
    try:
        return Submission(**fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "submission"
        message = str(first["msg"]).removeprefix("Value error, ")
        raise UserError(f"submission: {message}", where=where, fix="see docs/cluster.md") from exc
