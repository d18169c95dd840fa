"""Which runs go into which job array: one task per run and stage, evaluation after training.

For the runs that are not done (the run's own record decides, through `is_done`) and have no
task still queued or running:

    assets         (`with_assets_job`, when a shared asset of these runs is missing) one task that
                   builds every missing asset in one process; the arrays below that have no other
                   dependency wait for it to succeed (afterok)
    train-K        runs that train on this cluster and are not trained yet
    eval-after-K   the same runs in the same order, so task i evaluates what train task i trained:
                   SLURM `--dependency=aftercorr:TRAIN` starts it when that one task succeeded
    eval-K         runs that need only their evaluation (trained already, trained elsewhere such as
                   on the CS-3, or evaluation-only baselines)

Arrays are cut into chunks of at most `limit` tasks (the scheduler's MaxArraySize), numbered K.
The assets job is an array of one task, so that the scheduler reports it as it reports the others.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from modelzoo_ext.errors import UserError

STAGES = ("train", "eval")
ASSETS = "assets"  # the assets job's name and stage
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class RunWork:
    """What a run needs from the cluster.

    `trains_here`: its training is submitted as a train task (GPU/CPU backend, not eval-only);
    `needs_training`: it has a training stage at all (False for no-fine-tune baselines). A run that
    needs training but does not train here (CS-3) is evaluated once `is_done(run, "train")`.
    """

    run_id: str
    trains_here: bool
    needs_training: bool = True


@dataclass(frozen=True)
class ArrayPlan:
    """One job array: its name (`train-0`), stage (`train`, `eval`, `assets`), run per array index
    (the assets job: the runs it builds for, in one task), and the array it follows."""

    name: str
    stage: str
    run_ids: tuple[str, ...]
    after: str | None = None

    @property
    def tasks(self) -> int:
        """How many array tasks it has."""
        return 1 if self.stage == ASSETS else len(self.run_ids)


@dataclass(frozen=True)
class Selection:
    """The arrays to submit, and the runs left out with why."""

    arrays: tuple[ArrayPlan, ...]
    done: tuple[str, ...]
    active: tuple[str, ...]
    waiting: tuple[str, ...]  # trained elsewhere, training not done yet

    @property
    def run_count(self) -> int:
        return len({r for a in self.arrays for r in a.run_ids})


def check_run_ids(run_ids: Iterable[str]) -> None:
    """Run ids become lines of a run list and command arguments: plain names only."""
    for run_id in run_ids:
        if not RUN_ID.match(run_id):
            raise UserError(
                f"run id {run_id!r} is not a plain name (letters, digits, `._-`)",
                fix="plan the sweep with plain model and task names",
            )


def _chunks(run_ids: list[str], limit: int) -> list[tuple[str, ...]]:
    return [tuple(run_ids[i : i + limit]) for i in range(0, len(run_ids), limit)]


def plan_arrays(
    runs: list[RunWork],
    is_done: Callable[[str, str], bool],
    active: Callable[[str], bool],
    limit: int,
) -> Selection:
    """The arrays for `runs`: what is not done and not already queued or running."""
    check_run_ids(r.run_id for r in runs)
    train, eval_only, done, busy, waiting = [], [], [], [], []
    for run in runs:
        if is_done(run.run_id, "eval"):
            done.append(run.run_id)
        elif active(run.run_id):
            busy.append(run.run_id)
        elif run.needs_training and not is_done(run.run_id, "train"):
            (train if run.trains_here else waiting).append(run.run_id)
        else:
            eval_only.append(run.run_id)
    arrays: list[ArrayPlan] = []
    for k, chunk in enumerate(_chunks(train, limit)):
        arrays.append(ArrayPlan(f"train-{k}", "train", chunk))
        arrays.append(ArrayPlan(f"eval-after-{k}", "eval", chunk, after=f"train-{k}"))
    arrays += [ArrayPlan(f"eval-{k}", "eval", chunk) for k, chunk in enumerate(_chunks(eval_only, limit))]
    return Selection(tuple(arrays), tuple(done), tuple(busy), tuple(waiting))


def with_assets_job(selection: Selection) -> Selection:
    """`selection` with the assets job first, building for every run in it; the arrays that had no
    dependency (train-K, eval-K) now wait for it (eval-after-K still follows its train-K)."""
    runs = tuple(dict.fromkeys(r for a in selection.arrays for r in a.run_ids))
    arrays = [a if a.after else replace(a, after=ASSETS) for a in selection.arrays]
    return replace(selection, arrays=(ArrayPlan(ASSETS, ASSETS, runs), *arrays))
