"""Which checkpoints a mask file may meet: its source, or the source pruned by exactly these masks.

Masks computed on one checkpoint and used with another of the same shapes give a model that is
silently wrong: a pruned base masked again by other masks trains at about half the density the
logs print, and a converted checkpoint keeps weights outside its embedded masks. So wherever a
mask file meets a checkpoint (`convert hf-to-cs`, `train`, the ModelZoo callback at run start)
the same rule decides:

    accepted  the checkpoint is the masks' source (its fingerprint is the one the mask file
              records), or the source pruned by these very masks (`masks apply` output, whose
              record names the masks and its own fingerprint), or a CS checkpoint converted from
              one of those (`convert hf-to-cs` output, whose record names its HF source and any
              masks it embeds);
    refused   anything else: a UserError naming both files (exit status 2), unless the user
              passes the explicit override (`--skip-provenance-check`, YAML
              `sparse_lora.skip_provenance_check: true`), which is logged.

The check reads a few megabytes (`modelzoo_ext.fingerprint`), never the whole checkpoint; the
records it needs are written when masks (`source_record`: the source checkpoint's name,
revision, directory and fingerprint), pruned checkpoints and converted checkpoints are.
`masks validate --model` and `masks apply` still compare every weight's full checksum.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelzoo_ext.errors import UserError
from modelzoo_ext.fingerprint import fingerprint_files
from modelzoo_ext.hf_checkpoint import HFCheckpoint
from modelzoo_ext.masks.format import MaskFile

PRUNING_RECORD = "sparse_lora_pruning.json"  # beside a pruned HF checkpoint (`masks apply`)
CS_PROVENANCE = "sparse_lora_provenance.json"  # beside a converted CS checkpoint (`convert hf-to-cs`)
OVERRIDE_FLAG = "--skip-provenance-check"
OVERRIDE_KEY = "sparse_lora.skip_provenance_check"
RUN_CHECKPOINT = re.compile(r"checkpoint_\d+\.mdl")

log = logging.getLogger("modelzoo_ext.provenance")


def source_record(checkpoint: HFCheckpoint) -> dict[str, Any]:
    """What a file derived from a checkpoint records about it (a mask file's `source_model`): the
    name and revision its config.json gives, its directory, and the fingerprint this rule compares."""
    config = checkpoint.config
    return {
        "name": config.get("_name_or_path") or checkpoint.directory.name,
        "revision": config.get("_commit_hash") or config.get("transformers_version"),
        "directory": str(checkpoint.directory.resolve()),
        "model_type": config.get("model_type"),
        "fingerprint": checkpoint.fingerprint(),
    }


def mask_identity(masks: MaskFile) -> str:
    """What names a set of masks across renamings: the metadata checksum of the file first written
    (files converted to the other naming carry it as `mask_identity`)."""
    return masks.metadata.get("mask_identity") or masks.metadata["metadata_sha256"]


def source_fingerprint(masks: MaskFile) -> str | None:
    """The fingerprint of the checkpoint the masks were computed on, or None when unrecorded."""
    return (masks.metadata.get("source_model") or {}).get("fingerprint")


@dataclass(frozen=True)
class Derivation:
    """How a checkpoint came to be: the fingerprint of its source and the masks that pruned it."""

    source_fingerprint: str
    mask_identity: str


def pruning_record(masks: MaskFile, source: HFCheckpoint, pruned_files: list[Path]) -> dict[str, Any]:
    """The record `masks apply` writes beside a pruned checkpoint (`PRUNING_RECORD`)."""
    return {
        "source_model": str(source.directory.resolve()),
        "source_fingerprint": source.fingerprint(),
        "mask_file": str(masks.path.resolve()),
        "mask_metadata_sha256": masks.metadata.get("metadata_sha256"),
        "mask_identity": mask_identity(masks),
        "fingerprint": fingerprint_files(pruned_files),
    }


def read_derivation(checkpoint: HFCheckpoint) -> Derivation | None:
    """The pruning record of a checkpoint, when it has one that describes these very files."""
    path = checkpoint.directory / PRUNING_RECORD
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("fingerprint") != checkpoint.fingerprint() or "mask_identity" not in record:
        return None  # the files changed since `masks apply` wrote them, or an old record
    return Derivation(record["source_fingerprint"], record["mask_identity"])


def _judge(masks: MaskFile, fingerprint: str, derivation: Derivation | None) -> tuple[str | None, str]:
    """(how the checkpoint is accepted, or None; why not)."""
    source = source_fingerprint(masks)
    if source is None:
        return (
            None,
            "the mask file records no fingerprint of its source checkpoint (written by an older version)",
        )
    if fingerprint == source:
        return "the masks' source", ""
    if derivation is not None and derivation.source_fingerprint == source:
        if derivation.mask_identity == mask_identity(masks):
            return "the masks' source pruned by these masks", ""
        return (
            None,
            "it is the masks' source pruned by OTHER masks (masking it again would change its density)",
        )
    return None, "it is neither the checkpoint the masks were computed on nor that checkpoint pruned by them"


def _decide(masks: MaskFile, where: str, accepted: str | None, why: str, skip: bool) -> str:
    if accepted is not None:
        return accepted
    source = masks.metadata.get("source_model") or {}
    described = source.get("directory") or source.get("name") or "unknown"
    if skip:
        log.warning("provenance check skipped (%s): %s [%s]", OVERRIDE_FLAG, why, where)
        return f"unverified ({OVERRIDE_FLAG}: {why})"
    raise UserError(
        f"the masks do not belong to this checkpoint: {why}; the masks were computed on {described}",
        where=where,
        fix="use the checkpoint the masks were computed on (or its `masks apply` output with these masks), "
        f"recompute the masks for this checkpoint, or pass {OVERRIDE_FLAG} (YAML {OVERRIDE_KEY}: true) "
        "if you know they belong together",
    )


def check_hf_checkpoint(masks: MaskFile, checkpoint: HFCheckpoint, *, skip: bool = False) -> str:
    """Apply the rule to an HF model directory; returns how it was accepted (UserError otherwise)."""
    accepted, why = _judge(masks, checkpoint.fingerprint(), read_derivation(checkpoint))
    return _decide(masks, f"{masks.path} vs {checkpoint.directory}", accepted, why, skip)


def cs_provenance_record(
    cs_checkpoint: Path, hf_source: HFCheckpoint, embedded: MaskFile | None
) -> dict[str, Any]:
    """The record `convert hf-to-cs` writes beside a CS checkpoint (`CS_PROVENANCE`)."""
    derivation = read_derivation(hf_source)
    return {
        "checkpoint": cs_checkpoint.name,
        "fingerprint": fingerprint_files([cs_checkpoint]),
        "hf_source": {
            "directory": str(hf_source.directory.resolve()),
            "fingerprint": hf_source.fingerprint(),
            "pruned_from": None
            if derivation is None
            else {
                "source_fingerprint": derivation.source_fingerprint,
                "mask_identity": derivation.mask_identity,
            },
        },
        "embedded_masks": None if embedded is None else mask_identity(embedded),
    }


def check_cs_checkpoint(
    masks: MaskFile, cs_checkpoint: str | Path, *, run_dir: str | Path | None, skip: bool = False
) -> str:
    """Apply the rule to a CS `.mdl` (the ModelZoo callback, before the checkpoint is loaded).

    A `checkpoint_<step>.mdl` of the run's own `run_dir` is the run resuming itself: accepted.
    """
    path = Path(cs_checkpoint)
    where = f"{masks.path} vs {path}"
    if (
        run_dir is not None
        and path.parent.resolve() == Path(run_dir).resolve()
        and RUN_CHECKPOINT.fullmatch(path.name)
    ):
        return "the run's own checkpoint (resuming)"
    record_path = path.parent / CS_PROVENANCE
    record = json.loads(record_path.read_text()) if record_path.is_file() else None
    if record is None or record.get("checkpoint") != path.name:
        why = f"it has no {CS_PROVENANCE} (it was not written by `sparse-lora convert hf-to-cs`)"
        return _decide(masks, where, None, why, skip)
    if record["fingerprint"] != fingerprint_files([path]):
        return _decide(masks, where, None, f"it changed since `convert hf-to-cs` wrote {CS_PROVENANCE}", skip)
    embedded = record.get("embedded_masks")
    if embedded is not None and embedded != mask_identity(masks):
        why = "it embeds other masks (<param>_mask entries), which cerebras-pytorch would use instead"
        return _decide(masks, where, None, why, skip)
    hf = record["hf_source"]
    pruned = hf.get("pruned_from")
    derivation = None if pruned is None else Derivation(pruned["source_fingerprint"], pruned["mask_identity"])
    accepted, why = _judge(masks, hf["fingerprint"], derivation)
    if accepted is not None:
        accepted = f"converted from {accepted}"
    return _decide(masks, where, accepted, why, skip)
