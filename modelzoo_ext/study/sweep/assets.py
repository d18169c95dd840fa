"""Building the shared assets runs use (data, masks, pruned checkpoints), each once.

An asset is built when its path does not exist yet, by the step `commands.py` gives for it; every
step writes its output atomically, so an existing path is a finished asset. A failed asset is
remembered with its reason: the runs that need it (and the assets built from it) fail with that
reason instead of running the failed step again. Logs: `DIR/assets/logs/<asset>.log`.

Runs share assets, and two processes building one asset at once would race (the second rename
replaces the first's output, whose checksum a run may already have recorded). So assets are built
by one process for many runs, before the runs start (`build_for`): the local runner does it, and on
a cluster the assets job (`sparse-lora sweep assets`) does it before the job arrays run.
`missing(plans)` lists what would be built. A run's stage then only checks its assets (`ensure`):
a builder made with `build=False` (the task entry point's) builds nothing and fails the run
instead; the local runner's builder builds what is still missing.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from modelzoo_ext.study.grid import DATA_DRIVEN
from modelzoo_ext.study.steps import StepFailed, StepPolicy, run_step
from modelzoo_ext.study.sweep.commands import data_prepare_command, masks_apply_command, masks_compute_command
from modelzoo_ext.study.sweep.plan import RunPlan


def asset_steps(plan: RunPlan) -> Iterator[tuple[str, list[str], str | None]]:
    """`(asset path, command that builds it, asset it is built from)` for each shared asset `plan`
    uses, in build order (data before the masks calibrated on it, masks before the pruned model)."""
    assets = plan.assets
    if assets.data:
        yield assets.data, data_prepare_command(plan, "train"), None
    if assets.heldout:
        yield assets.heldout, data_prepare_command(plan, "heldout"), None
    if assets.masks:
        yield assets.masks, masks_compute_command(plan), assets.data if plan.method in DATA_DRIVEN else None
    if assets.pruned and plan.mode in ("s2d", "none"):  # s2s trains on the dense base with its masks
        yield assets.pruned, masks_apply_command(plan), assets.masks


def missing(plans: list[RunPlan]) -> list[str]:
    """The shared assets of `plans` that do not exist yet (each once, in build order)."""
    paths = (path for plan in plans for path, _, _ in asset_steps(plan))
    return [path for path in dict.fromkeys(paths) if not Path(path).exists()]


class AssetBuilder:
    """Builds the missing shared assets of runs, remembering failures (one per sweep execution).

    With `build=False` it builds nothing: `ensure` fails a run whose assets are missing.
    """

    def __init__(self, sweep_dir: Path, policy: StepPolicy, *, build: bool = True) -> None:
        self.assets_dir = Path(sweep_dir) / "assets"
        self.policy = policy
        self.builds = build
        self.failed: dict[str, str] = {}  # asset path -> why it is not there

    def build_for(self, plans: list[RunPlan]) -> dict[str, str]:
        """Build every missing asset of `plans`, in order; the assets that failed, with why
        (failures are remembered, not raised)."""
        for plan in plans:
            self._build_missing(plan)
        return dict(self.failed)

    def ensure(self, plan: RunPlan) -> None:
        """Build `plan`'s missing assets; `StepFailed` naming the first one that is not there."""
        if self.builds:
            self._build_missing(plan)
        failed = [self.failed[p] for p in plan.assets.paths() if p in self.failed]
        if failed:
            raise StepFailed(f"a shared asset failed: {failed[0]}")
        absent = missing([plan])
        if absent:
            raise StepFailed(
                f"a shared asset is missing: {absent[0]} (build it with `sparse-lora sweep assets`)"
            )

    def _build_missing(self, plan: RunPlan) -> None:
        for path, command, needs in asset_steps(plan):
            self._build(path, command, needs)

    def _build(self, path: str, command: list[str], needs: str | None = None) -> None:
        if Path(path).exists() or path in self.failed:
            return
        if needs and needs in self.failed:
            self.failed[path] = f"needs {needs}, which failed"
            return
        # The log is named after the asset's place under assets/ (data/<model>__<task>/train -> data__..__train).
        name = "__".join(Path(path).relative_to(self.assets_dir).parts)
        try:
            run_step(command, self.assets_dir / "logs" / f"{name}.log", self.policy)
        except StepFailed as exc:
            self.failed[path] = str(exc)
