"""Check 1, continued: what the mask callback and the model variant refuse only once a run has started.

ModelZoo's validation accepts a config whose masks will be refused later: `cszoo fit` builds the
trainer and the model first (on a CS-3, after the job was queued), and only then does
`SparseLoRAMasks` (`modelzoo_ext.cerebras.callbacks`) or the `sparse_lora_<family>` model refuse
it. These are the same rules, applied to the YAML and the mask file's header now:

    mask_callback_check(subject)     SparseLoRAMasks present for a masked mode (without it the model
                                     refuses its first forward: it would train with unmasked base
                                     weights); no ModelZoo `Lora` callback (a second, unmasked
                                     adapter); no `sparsity:` section; a sparse_lora_<family> model;
                                     a base checkpoint for cs3 (the callback refuses a random base);
                                     the mask file there and readable
    masks_fit_check(subject)         the mask file against the model's targeted layers: one mask per
                                     target and none other, each of the weight's shape
                                     (`check_masks_match`, on a `meta`-device copy of the model)

The scaled-down twin (`twin.py`) then runs the real callback and model through `cszoo fit`.
"""

from __future__ import annotations

import torch

from modelzoo_ext.errors import UserError
from modelzoo_ext.masks.format import MaskFile
from modelzoo_ext.masks.provenance import OVERRIDE_KEY
from modelzoo_ext.run_config import SparseLoRAConfig, normalise_model_section
from modelzoo_ext.run_config.migrate import is_lora_callback, lora_callback_refusal
from modelzoo_ext.study.preflight.model_counts import meta_model
from modelzoo_ext.study.preflight.report import FAIL, PASS, SKIP, Check
from modelzoo_ext.study.preflight.subject import Subject

MASKS_CALLBACK = "SparseLoRAMasks"


def _callback_names(subject: Subject) -> list[str]:
    entries = subject.params["trainer"]["init"].get("callbacks") or []
    return [str(next(iter(e))) if isinstance(e, dict) and e else str(e) for e in entries]


def _problems(subject: Subject) -> list[str]:
    """Every rule of the callback and the model variant the params break."""
    problems = []
    name = str(subject.model.get("name"))
    if subject.family is None or not name.startswith("sparse_lora_"):
        problems.append(
            f"model {name!r} is not a sparse_lora_<family> model: SparseLoRAMasks refuses it at setup"
        )
    callbacks = _callback_names(subject)
    entries = subject.params["trainer"]["init"].get("callbacks") or []
    if not subject.dense_baseline and MASKS_CALLBACK.lower() not in {c.lower() for c in callbacks}:
        problems.append(f"no {MASKS_CALLBACK} callback: the model refuses its first forward step (it would train "
                        f"with unmasked base weights); add `- {MASKS_CALLBACK}: {{}}` to trainer.init.callbacks")  # fmt: skip
    if any(is_lora_callback(e) for e in entries):
        problems.append(str(lora_callback_refusal("trainer.init.callbacks")))
    if subject.params["trainer"]["init"].get("sparsity") is not None:
        problems.append("a `sparsity:` section: it would also sparsify the optimizer of frozen weights (the "
                        "first step fails); the masks come from sparse_lora.mask_path")  # fmt: skip
    skip_provenance = bool(subject.sparse_lora.get("skip_provenance_check"))
    if (
        subject.backend == "cs3"
        and not subject.dense_baseline
        and not subject.ckpt_path
        and not skip_provenance
    ):
        problems.append(f"no fit.ckpt_path: SparseLoRAMasks refuses a random base (set the base from "
                        f"`sparse-lora convert hf-to-cs`, or {OVERRIDE_KEY}: true)")  # fmt: skip
    return problems


def _mask_file(subject: Subject) -> tuple[MaskFile | None, str | None]:
    """(the run's mask file, or None; why not)."""
    path = subject.mask_path
    if path is None:
        return None, "sparse_lora.mask_path is not set (and dense_baseline is not true)"
    try:
        return MaskFile(path), None
    except UserError as exc:
        return None, f"the mask file cannot be read: {exc}"


def mask_callback_check(subject: Subject, *, mask_file_later: bool = False) -> Check:
    """The rules `SparseLoRAMasks` and the model variant apply at run time (module docstring).

    `mask_file_later`: the mask file is built before the run (a sweep's asset); the rules about the
    YAML are checked now and the file is not asked for."""
    name = "mask callback"
    problems = _problems(subject)
    later = mask_file_later and not subject.dense_baseline
    masks, why = (None, None) if subject.dense_baseline or later else _mask_file(subject)
    if why:
        problems.append(why)
    if problems:
        return Check(name, FAIL, "; ".join(problems))
    if subject.dense_baseline:
        return Check(name, PASS, "dense baseline (plain LoRA, no masks): nothing to mask")
    if later:
        return Check(name, PASS, f"{MASKS_CALLBACK} present, no ModelZoo Lora, no sparsity section; the mask file "
                     f"{subject.mask_path} is not built yet (the sweep builds it before training)")  # fmt: skip
    meta = masks.metadata
    return Check(name, PASS, f"{MASKS_CALLBACK} present; {masks.path}: {len(masks.keys())} masks, "
                 f"{meta.get('method')} {meta.get('structure')}, sparsity {meta.get('achieved_sparsity', 0):.4f}")  # fmt: skip


def masks_fit_check(subject: Subject) -> Check | None:
    """The mask file's masks against the layers the run targets (None for the dense baseline)."""
    name = "masks vs model"
    if subject.dense_baseline:
        return None
    masks, why = _mask_file(subject)
    if masks is None:
        return Check(name, SKIP, f"no mask file to compare ({why})")
    try:
        return _fit(subject, masks)
    except UserError as exc:
        return Check(name, FAIL, str(exc))


def _fit(subject: Subject, masks: MaskFile) -> Check:
    from modelzoo_ext.masks.view import MaskView
    from modelzoo_ext.name_map import RopeLayout
    from modelzoo_ext.sparse_lora.apply import check_masks_match, find_target_linears

    if subject.backend != "cs3":  # the reference trainer reads HF-named files only
        masks.require_naming("hf", "the reference trainer")
    block = SparseLoRAConfig(**subject.sparse_lora)
    hf_config, source = subject.hf_config()
    model = meta_model(hf_config)
    targets = find_target_linears(model, block.target_modules)
    layout = RopeLayout.from_model_section(normalise_model_section(
        {k: v for k, v in subject.model.items() if k not in ("name", "sparse_lora", "loss_scaling", "loss_weight")}
    ))  # fmt: skip
    view = MaskView(masks, "hf", subject.family.name, layout)
    shapes = {key: tuple(view.info(key)["shape"]) for key in view.keys()}  # noqa: SIM118 (a MaskView, not a dict)
    check_masks_match(
        targets, {k: torch.empty(s, dtype=torch.bool, device="meta") for k, s in shapes.items()}, block
    )
    return Check("masks vs model", PASS, f"{len(targets)} targeted layers ({', '.join(block.target_modules)}), one mask "
                 f"of the weight's shape each, none other (model from {source}; mask naming {masks.naming})")  # fmt: skip
