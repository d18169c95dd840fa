"""`sweep preflight DIR`: every distinct configuration of a planned sweep checked once, and its disk budget.

    report = preflight_sweep(sweep_dir, backend="cs3", concurrency=4)
    report.refuse_if_failed()            # `sweep run --backend cs3` and `sweep submit` call this first

Runs whose checks would be identical are grouped (`group_key`): the same model, task (so the same
data), mode, mask method and structure, and backend; they differ only in sparsity and seed, which
change the mask file and the seeds, not the code path. Per group, one run stands for it (the
first by run id) in the config checks (1, 5); checks 2 and the mask-file half of 1 run for every
distinct mask file of the group (their rows are merged when they agree), and the data checks (3)
once per data directory. The scaled-down twin (4) runs once per `twin_key` (a group without its
backend: a cs3 run and its GPU twin train the same params); a passing twin is remembered in
`DIR/preflight/twins/<key>/result.json` with the digest of everything it was built from, and is
not run again while that digest holds (`rerun=True` runs it again). Shared assets that are not
built yet (masks, data) are not failures here: the checks that need them are skipped with that
reason, the ModelZoo validation uses a stand-in data directory (said so), and the twin uses
counting sequences. The disk budget (6) sums every run that still has work, plus the assets still
to build, against the sweep directory's filesystem. The report is also written to
`DIR/preflight/report.txt` and `report.json`.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from modelzoo_ext.atomic import atomic_file
from modelzoo_ext.errors import UserError
from modelzoo_ext.run_config import load_run_config
from modelzoo_ext.study.preflight.config_checks import (
    checkpoint_check,
    model_check,
    modelzoo_check,
    reference_check,
)
from modelzoo_ext.study.preflight.data_check import data_checks
from modelzoo_ext.study.preflight.disk import (
    DiskBudget,
    Term,
    data_bytes,
    disk_check,
    mask_file_bytes,
    pruned_bytes,
    run_outputs,
)
from modelzoo_ext.study.preflight.mask_callback import mask_callback_check, masks_fit_check
from modelzoo_ext.study.preflight.memory import memory_check_each
from modelzoo_ext.study.preflight.model_counts import model_counts
from modelzoo_ext.study.preflight.provenance_check import provenance_check
from modelzoo_ext.study.preflight.quota import filesystem_room
from modelzoo_ext.study.preflight.report import FAIL, PASS, SKIP, Check, PreflightReport, dumps
from modelzoo_ext.study.preflight.subject import Subject
from modelzoo_ext.study.preflight.twin import TwinMasks, twin_checks, twin_samples
from modelzoo_ext.study.sweep.plan import RunPlan, load_plans
from modelzoo_ext.study.sweep.records import read_record

PREFLIGHT_DIR = "preflight"


def group_key(plan: RunPlan) -> tuple[str, ...]:
    """Runs with the same key run the same checks: model, task, mode, method/structure, backend."""
    return (plan.model, plan.task, plan.mode, plan.method, plan.structure.replace(":", "of"), plan.backend)


def twin_key(plan: RunPlan) -> tuple[str, ...]:
    """Runs with the same key train the same twin: a group without its backend."""
    return group_key(plan)[:-1]


@dataclass
class Group:
    """The runs of one group key, the first standing for them."""

    key: tuple[str, ...]
    plans: list[RunPlan] = field(default_factory=list)

    @property
    def label(self) -> str:
        return "/".join(self.key)

    @property
    def first(self) -> RunPlan:
        return self.plans[0]


def _has_training_left(plan: RunPlan) -> bool:
    record = read_record(plan.run_dir)
    return plan.trains and (
        record is None or (record.status != "succeeded" and "model" not in record.artifacts)
    )


def _has_work(plan: RunPlan) -> bool:
    record = read_record(plan.run_dir)
    return record is None or record.status != "succeeded"


def selected(plans: list[RunPlan], backend: str | None, only: list[str] | None) -> list[RunPlan]:
    """The runs a `sweep run --backend` / `submit --backend` would execute (evaluation-only ones too)."""
    return [p for p in plans if (backend is None or p.backend in (backend, "eval"))
            and (only is None or p.run_id in only)]  # fmt: skip


def allowed_epochs(plan: RunPlan) -> float:
    """How often the sweep asked the run to go through its data (`train.epochs`; explicit
    `max_steps`: as often as that takes; neither: once, the params file's max_steps)."""
    length = plan.spec.train.length_for(plan.task)
    if length.epochs is not None:
        return float(length.epochs)
    return math.inf if length.max_steps is not None else 1.0


def planned_density(plan: RunPlan) -> float | None:
    """Every mask's kept fraction where the plan fixes it per layer (per-layer scope: each layer
    pruned to the sweep's sparsity), else None (a global threshold: per-layer densities vary)."""
    if plan.mode == "lora" or plan.spec.scope != "layer":
        return None
    return 1.0 - plan.sparsity


def subject_of(plan: RunPlan, label: str, device_memory: str | None) -> Subject:
    """The run as a preflight subject: its own params.yaml, backend, HF model, launch."""
    from modelzoo_ext.study.sweep.plan import load_params

    spec = plan.spec
    return Subject(
        label=label, params=load_params(plan.run_dir), params_path=plan.params_path, backend=plan.backend,
        hf_dir=Path(plan.hf_dir), gpus=spec.gpu.nproc_per_node, device_memory=device_memory or spec.gpu.device_memory,
        micro_batch_size=None if spec.gpu.micro_batch_size is None else str(spec.gpu.micro_batch_size),
        activation_checkpointing=spec.gpu.activation_checkpointing, fsdp=spec.gpu.fsdp,
        sampled_product=spec.gpu.sampled_product,
        allowed_epochs=allowed_epochs(plan),
        planned_max_seq_length=spec.data.max_seq_length, planned_mask_density=planned_density(plan),
    )  # fmt: skip


def _within(scope: str, checks: list[Check]) -> list[Check]:
    return [c.within(scope) for c in checks]


def _merged(name: str, checks: list[tuple[str, Check]]) -> list[Check]:
    """Per-mask-file rows of one check: one row when they agree (pass, or skip for one reason),
    every failure on its own row."""
    out = [Check(f"{name} ({which})", c.status, c.detail) for which, c in checks if c.failed]
    for status in (PASS, SKIP):
        same = [(which, c) for which, c in checks if c.status == status]
        if same:
            example = same[0][1].detail
            more = f"; {len(same) - 1} more mask files alike" if len(same) > 1 else ""
            out.append(Check(f"{name} ({len(same)} mask files)", status, f"{example}{more}"))
    return out


def _stand_in_data(work: Path, vocab: int) -> str:
    """A small data directory for ModelZoo's validation where the run's is not prepared yet."""
    from modelzoo_ext.data.hdf5 import write_samples

    folder = work / "data_stand_in"
    if not (folder / "data-0.h5").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        samples, _ = twin_samples(None, 4, vocab, 0)
        write_samples(folder / "data-0.h5", samples)
    return str(folder)


class SweepPreflight:
    """One preflight of one sweep directory (see the module docstring)."""

    def __init__(self, sweep_dir: Path, *, twin: bool, rerun: bool, device_memory: str | None) -> None:
        self.sweep_dir = sweep_dir
        self.work = sweep_dir / PREFLIGHT_DIR
        self.twin, self.rerun, self.device_memory = twin, rerun, device_memory
        self.data_done: set[str] = set()
        self.twins_done: set[tuple[str, ...]] = set()

    def group_checks(self, group: Group) -> list[Check]:
        """Checks 1-5 of one group, and its twin once per twin key."""
        plan = group.first
        subject = subject_of(plan, group.label, self.device_memory)
        work = self.work / "groups" / group.label.replace("/", "__")
        work.mkdir(parents=True, exist_ok=True)
        data_ready = bool(subject.data_dir) and Path(subject.data_dir).is_dir()
        hf_config, _ = subject.hf_config()
        stand_in = None if data_ready else _stand_in_data(work, int(hf_config["vocab_size"]))
        checks = [modelzoo_check(subject, data_stand_in=stand_in)]
        reference, cfg = reference_check(subject, work)
        checks.append(reference)
        if cfg is not None:
            checks += [model_check(subject, cfg), checkpoint_check(subject, cfg)]
        checks.append(mask_callback_check(subject, mask_file_later=not self._masks_built(plan)))
        checks += self._per_mask_file(group)
        if subject.data_dir not in self.data_done:
            self.data_done.add(subject.data_dir)
            checks += data_checks(subject, cfg, prepared_later=True)
        if cfg is not None and (memory := self._memory(group, cfg)) is not None:
            checks.append(memory)
        out = _within(group.label, checks)
        if self.twin and twin_key(plan) not in self.twins_done:
            self.twins_done.add(twin_key(plan))
            twin_scope = "/".join(twin_key(plan)) + " (twin, every backend)"
            out += _within(twin_scope, self._twin(plan, subject, prior_failed=any(c.failed for c in checks)))
        return out

    def _memory(self, group: Group, cfg) -> Check | None:
        """The memory plan at each sparsity of the group (the s2s index grows with the kept weights)."""
        by_sparsity = {plan.sparsity: plan for plan in group.plans}
        subjects = [
            subject_of(plan, f"sparsity {s:g}", self.device_memory) for s, plan in sorted(by_sparsity.items())
        ]
        return memory_check_each(subjects, cfg)

    def _masks_built(self, plan: RunPlan) -> bool:
        return plan.assets.masks is None or Path(plan.assets.masks).is_file()

    def _per_mask_file(self, group: Group) -> list[Check]:
        """Masks vs model and provenance, for each distinct mask file of the group."""
        if group.first.assets.masks is None:
            return []
        fits, provenance, seen = [], [], set()
        for plan in group.plans:
            if plan.assets.masks in seen:
                continue
            seen.add(plan.assets.masks)
            which = Path(plan.assets.masks).stem
            if not Path(plan.assets.masks).is_file():
                skip = Check("", SKIP, "not built yet (sweep run builds the masks before training)")
                fits.append((which, skip))
                provenance.append((which, skip))
                continue
            subject = subject_of(plan, which, self.device_memory)
            fits.append((which, masks_fit_check(subject)))
            provenance.append((which, provenance_check(subject)))
        return _merged("masks vs model", fits) + _merged("mask provenance", provenance)

    def _twin(self, plan: RunPlan, subject: Subject, *, prior_failed: bool) -> list[Check]:
        if prior_failed:
            return [Check("twin", SKIP, "not run: the checks above failed (fix them first)")]
        masks = None if plan.assets.masks is None else TwinMasks(
            plan.method, plan.structure, plan.spec.scope, plan.sparsity, plan.seeds["masks"],
            source=f"as the sweep plans {Path(plan.assets.masks).name}")  # fmt: skip
        work = self.work / "twins" / "__".join(twin_key(plan))
        digest = twin_digest(subject, masks)
        cached = _cached(work, digest) if not self.rerun else None
        if cached is not None:
            return cached
        checks = twin_checks(subject, masks, work)
        if not any(c.failed for c in checks):
            with atomic_file(work / "result.json") as tmp:
                tmp.write_text(json.dumps({"digest": digest, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                           "checks": [c.__dict__ for c in checks]}, indent=2))  # fmt: skip
        return checks


def twin_digest(subject: Subject, masks: TwinMasks | None) -> str:
    """sha256 of what a twin is built from: the run's params (without its own paths and seeds'
    places), the masks' recipe, the data's identity, config.json, this package and the stack."""
    from modelzoo_ext.data.hdf5 import read_params
    from modelzoo_ext.versions import run_versions

    hf_config, _ = subject.hf_config()
    data = read_params(subject.data_dir) if subject.data_dir and Path(subject.data_dir).is_dir() else {}
    versions = {k: v for k, v in run_versions().items() if k != "python"}
    material = {"params": subject.params, "masks": masks.__dict__ if masks else None, "hf_config": hf_config,
                "data": data.get("data_sha256", "not prepared"), "versions": versions}  # fmt: skip
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()


def _cached(work: Path, digest: str) -> list[Check] | None:
    path = work / "result.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("digest") != digest:
        return None
    note = f" (remembered: passed at {record['finished_at']} with the same inputs; --rerun trains it again)"
    checks = [Check(c["name"], c["status"], c["detail"]) for c in record["checks"]]  # scope set by the caller
    checks[0] = Check(checks[0].name, checks[0].status, checks[0].detail + note)
    return checks


# -- the disk budget ---------------------------------------------------------------------------------
def _evaluated(plan: RunPlan) -> int:
    """Examples the run's evaluation scores (each task of eval.tasks, or the run's own)."""
    from modelzoo_ext.data.protocol import OFFICIAL_ROWS, evaluation_split

    ev, data = plan.spec.eval, plan.spec.data
    total = 0
    for task in ev.tasks or [plan.task]:
        rows = OFFICIAL_ROWS[(task, evaluation_split(task))]
        if data.protocol == "offline":
            rows = math.ceil(rows * data.held_out_fraction)
        total += min(rows, ev.limit) if ev.limit else rows
    return total


def _training_rows(plan: RunPlan) -> int:
    from modelzoo_ext.data.protocol import OFFICIAL_ROWS, evaluation_split, training_split

    data = plan.spec.data
    if data.protocol == "official":
        return OFFICIAL_ROWS[(plan.task, training_split(plan.task))]
    return math.ceil(OFFICIAL_ROWS[(plan.task, evaluation_split(plan.task))] * (1 - data.held_out_fraction))


def model_hf_config(plan: RunPlan) -> dict:
    """The config.json of the run's model: its HF directory's, else what its params file describes."""
    from modelzoo_ext.run_config import load_yaml

    params_file = plan.spec.models[plan.model].params
    subject = Subject(plan.model, load_yaml(params_file), Path(params_file), plan.backend, Path(plan.hf_dir))
    return subject.hf_config()[0]


def _asset_terms(plans: list[RunPlan]) -> list[Term]:
    """The shared assets the runs need that are not built yet."""
    terms, seen = [], set()
    for plan in plans:
        spec, hf_dir = plan.spec, Path(plan.hf_dir)
        hf_config = model_hf_config(plan)
        if plan.assets.masks and plan.assets.masks not in seen and not Path(plan.assets.masks).exists():
            counts = model_counts(hf_config, _default_targets(plan), 1)
            terms.append(Term("assets: masks", mask_file_bytes(counts), plan.assets.masks))
        if plan.assets.pruned and plan.mode in ("s2d", "none") and plan.assets.pruned not in seen \
                and not Path(plan.assets.pruned).exists():  # fmt: skip
            counts = model_counts(hf_config, _default_targets(plan), 1)
            terms.append(
                Term(
                    "assets: pruned checkpoints", pruned_bytes(counts, hf_config, hf_dir), plan.assets.pruned
                )
            )
        for path, rows in ((plan.assets.data, _training_rows(plan)), (plan.assets.heldout, _evaluated(plan))):
            if path and path not in seen and not Path(path).exists():
                terms.append(
                    Term(
                        "assets: prepared data",
                        data_bytes(rows, spec.data.max_seq_length),
                        f"{path} (before gzip)",
                    )
                )
        seen.update(
            p for p in (plan.assets.masks, plan.assets.pruned, plan.assets.data, plan.assets.heldout) if p
        )
    return terms


def _default_targets(plan: RunPlan) -> list[str]:
    """The projections `masks compute` targets by default (its rule), in the reference's names."""
    from modelzoo_ext.families import family_of_hf_config
    from modelzoo_ext.run_config.migrate import all_projections

    return all_projections(family_of_hf_config(model_hf_config(plan)).name)


def sweep_budget(
    plans: list[RunPlan], sweep_dir: Path, *, concurrency: int, keep: int, setting: str
) -> DiskBudget:
    """The bytes the runs with work left (and the assets still to build) will write, with `keep`
    checkpoints per run (`train.keep_checkpoints`)."""
    runs = []
    for plan in plans:
        if not _has_work(plan):
            continue
        evaluated = _evaluated(plan)
        if not _has_training_left(plan):
            runs.append(_eval_only(plan, evaluated))
            continue
        cfg = load_run_config(plan.params_path)
        hf_config = model_hf_config(plan)
        counts = model_counts(hf_config, cfg.sparse_lora.target_modules, cfg.sparse_lora.r)
        runs.append(run_outputs(cfg, counts, backend=plan.backend, label=plan.run_id, hf_dir=Path(plan.hf_dir),
                                evaluated=evaluated, keep=keep, keep_is_sweep=True))  # fmt: skip
    return DiskBudget(runs, filesystem_room(sweep_dir), _asset_terms(plans), concurrency, setting)


def _eval_only(plan: RunPlan, evaluated: int):
    from modelzoo_ext.study.preflight.disk import EVAL_BYTES_PER_EXAMPLE, EVAL_FIXED_BYTES, RunOutputs

    return RunOutputs(
        plan.run_id, (Term("evaluation results", EVAL_FIXED_BYTES + EVAL_BYTES_PER_EXAMPLE * evaluated),)
    )


def sweep_disk_check(plans: list[RunPlan], sweep_dir: Path, concurrency: int) -> Check:
    spec_keep = plans[0].spec.train.keep_checkpoints if plans else 1
    try:
        budget = sweep_budget(plans, sweep_dir, concurrency=concurrency, keep=spec_keep, setting="")
        alternatives = [sweep_budget(plans, sweep_dir, concurrency=concurrency, keep=k,
                                     setting=f"train.keep_checkpoints: {k} (then replan)")
                        for k in sorted({1, 0} - {spec_keep}, reverse=True) if k < spec_keep]  # fmt: skip
    except (UserError, OSError, KeyError) as exc:
        return Check("disk budget", FAIL, f"cannot count the sweep's outputs: {exc}")
    return disk_check(budget, alternatives)


# -- the whole sweep -----------------------------------------------------------------------------------
def preflight_sweep(
    sweep_dir: str | Path, *, backend: str | None = None, only: list[str] | None = None, twin: bool = True,
    rerun: bool = False, concurrency: int = 1, device_memory: str | None = None,
) -> PreflightReport:  # fmt: skip
    """Check every distinct configuration of the runs `sweep run --backend` would execute, and
    the disk budget of all of them (module docstring)."""
    sweep_dir = Path(sweep_dir).resolve()
    _, plans = load_plans(sweep_dir)
    chosen = selected(plans, backend, only)
    groups: dict[tuple[str, ...], Group] = defaultdict(lambda: Group(()))
    for plan in chosen:
        if _has_training_left(plan):
            group = groups[group_key(plan)]
            group.key = group_key(plan)
            group.plans.append(plan)
    report = PreflightReport(f"sweep {sweep_dir} ({backend or 'every backend'})")
    started = time.perf_counter()
    runner = SweepPreflight(sweep_dir, twin=twin, rerun=rerun, device_memory=device_memory)
    for group in groups.values():
        report.extend(runner.group_checks(group))
    report.add(sweep_disk_check(chosen, sweep_dir, concurrency))
    training = sum(len(g.plans) for g in groups.values())
    report.notes.append(f"{training} runs with training left in {len(groups)} groups (model/task/mode/method/"
                        f"structure/backend), {len(runner.twins_done)} twins; {len(chosen) - training} runs "
                        f"evaluation only or trained; {time.perf_counter() - started:.0f} s")  # fmt: skip
    _write(report, runner.work)
    return report


def _write(report: PreflightReport, work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    with atomic_file(work / "report.txt") as tmp:
        tmp.write_text(report.table() + "\n")
    with atomic_file(work / "report.json") as tmp:
        tmp.write_text(dumps(report) + "\n")
