"""Building the shared assets runs use (data, masks, pruned checkpoints), each once.

An asset is built when its path does not exist yet, by the step `commands.py` gives for it; every
step writes its output atomically, so an existing path is a finished asset. A failed asset is
remembered with its reason: the runs that need it (and the assets built from it) fail with that
reason instead of running the failed step again. Logs: `DIR/assets/logs/<asset>.log`.

Runs share assets, so a local runner builds them one at a time before it starts the runs
(`build_for`); a run alone (a cluster task) builds what it is missing before its stage (`ensure`).
"""

from __future__ import annotations

from pathlib import Path

from modelzoo_ext.study.grid import DATA_DRIVEN
from modelzoo_ext.study.steps import StepFailed, StepPolicy, run_step
from modelzoo_ext.study.sweep.commands import data_prepare_command, masks_apply_command, masks_compute_command
from modelzoo_ext.study.sweep.plan import RunPlan


class AssetBuilder:
    """Builds the missing shared assets of runs, remembering failures (one per sweep execution)."""

    def __init__(self, sweep_dir: Path, policy: StepPolicy) -> None:
        self.assets_dir = Path(sweep_dir) / "assets"
        self.policy = policy
        self.failed: dict[str, str] = {}  # asset path -> why it is not there

    def build_for(self, plans: list[RunPlan]) -> None:
        """Build every missing asset of `plans`, in order (failures are remembered, not raised)."""
        for plan in plans:
            self._build_missing(plan)

    def ensure(self, plan: RunPlan) -> None:
        """Build `plan`'s missing assets; `StepFailed` naming the first one that could not be built."""
        self._build_missing(plan)
        missing = [self.failed[p] for p in plan.assets.paths() if p in self.failed]
        if missing:
            raise StepFailed(f"a shared asset failed: {missing[0]}")

    def _build_missing(self, plan: RunPlan) -> None:
        assets = plan.assets
        if assets.data:
            self._build(assets.data, data_prepare_command(plan, "train"))
        if assets.heldout:
            self._build(assets.heldout, data_prepare_command(plan, "heldout"))
        if assets.masks:
            calibration = assets.data if plan.method in DATA_DRIVEN else None
            self._build(assets.masks, masks_compute_command(plan), needs=calibration)
        if assets.pruned and plan.mode in ("s2d", "none"):
            self._build(assets.pruned, masks_apply_command(plan), needs=assets.masks)

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
