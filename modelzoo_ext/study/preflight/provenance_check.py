"""Check 2: the masks belong to the checkpoint the run starts from (`modelzoo_ext.masks.provenance`).

The rule each trainer applies at its start, applied now to the same files: cs3 asks it of the CS
base checkpoint (`fit.ckpt_path`, through the record `convert hf-to-cs` wrote beside it), as
`SparseLoRAMasks` does before ModelZoo loads it; gpu and cpu ask it of the HF model directory, as
the reference trainer does. A mask file computed on another checkpoint is refused here, with the
same message. The rule reads fingerprints of the weights: an HF directory holding only its
config.json (no weights here) cannot be checked, and the check says so.
"""

from __future__ import annotations

from pathlib import Path

from modelzoo_ext.errors import UserError
from modelzoo_ext.masks.format import MaskFile
from modelzoo_ext.masks.provenance import check_cs_checkpoint, check_hf_checkpoint
from modelzoo_ext.study.preflight.report import FAIL, PASS, SKIP, Check
from modelzoo_ext.study.preflight.subject import Subject

NAME = "mask provenance"


def provenance_check(subject: Subject) -> Check | None:
    """The provenance rule for the run's backend (None for the dense baseline: no masks)."""
    if subject.dense_baseline:
        return None
    skip = bool(subject.sparse_lora.get("skip_provenance_check"))
    try:
        masks = MaskFile(subject.mask_path)
    except (UserError, TypeError) as exc:
        return Check(NAME, SKIP, f"no mask file to check ({exc}; see the mask callback check)")
    try:
        if subject.backend == "cs3":
            return _cs(subject, masks, skip)
        return _hf(subject, masks, skip)
    except UserError as exc:
        return Check(NAME, FAIL, str(exc))


def _cs(subject: Subject, masks: MaskFile, skip: bool) -> Check:
    ckpt = subject.ckpt_path
    if not ckpt:
        return Check(NAME, SKIP if skip else FAIL, "no fit.ckpt_path (see the mask callback check)")
    if not Path(ckpt).is_file():
        return Check(NAME, FAIL, f"fit.ckpt_path {ckpt} does not exist: the run cannot load its base")
    verdict = check_cs_checkpoint(masks, ckpt, run_dir=subject.model_dir, skip=skip)
    return Check(NAME, PASS, f"{ckpt}: {verdict}")


def _hf(subject: Subject, masks: MaskFile, skip: bool) -> Check:
    from modelzoo_ext.hf_checkpoint import HFCheckpoint

    if subject.hf_dir is None:
        return Check(
            NAME, FAIL, "no HF model directory given (--hf-model): the reference trainer reads its weights"
        )
    try:
        checkpoint = HFCheckpoint(subject.hf_dir)
    except UserError as exc:
        if (subject.hf_dir / "config.json").is_file():  # config.json alone: this machine has no weights
            return Check(NAME, SKIP, f"needs the weights' fingerprint: {exc}")
        raise
    verdict = check_hf_checkpoint(masks, checkpoint, skip=skip)
    return Check(NAME, PASS, f"{subject.hf_dir}: {verdict}")
