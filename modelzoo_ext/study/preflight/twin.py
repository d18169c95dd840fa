"""Check 4: a scaled-down twin of the run, trained two steps through the real code path on the CPU.

    checks = twin_checks(subject, TwinMasks.of_file(mask_file), work_dir)

The twin is the run with only its size changed, so what refuses the run at its start on a CS-3 or
a GPU node refuses the twin here, in a minute:

- model: the same family and config.json with 2 layers, width 64, MLP width 128, 8 heads (fewer
  when the model has fewer; key/value heads in the model's ratio, so grouped-query attention stays
  grouped), the same vocabulary, position settings, RoPE scaling, sliding window and experts;
  random weights (seeded), saved as an HF directory; its CS base checkpoint made by `convert
  hf-to-cs` (with the provenance record the mask callback reads);
- masks: the run's method, structure, scope and sparsity (and target rule), computed on the
  twin's weights by `masks compute` (data-aware methods calibrated on the twin's data);
- data: the run's prepared data, kept as tokenised (the twin has the model's vocabulary, so no
  token is remapped): the first `TWIN_STEPS x batch` samples with loss tokens, each cut to the
  `TWIN_SEQ` tokens that end at its last loss token (the completion and the prompt just before
  it). Without prepared data (a sweep before its assets are built), counting sequences of the
  same length stand in, and the check says so;
- run config: the run's YAML and callbacks, with the twin's model section (sizes only), mask file,
  base checkpoint and data, `backend_type: CPU`, 2 steps, a batch of at most `TWIN_BATCH`, no
  validation loader, no data-loader workers; `SparseLoRALossLog` added where missing (it observes
  only) so the CS side's per-step losses can be read.

It then trains through `cszoo fit` on ModelZoo's CPU backend (where ModelZoo is installed: the real
variant, `SparseLoRAMasks` and the provenance rule) and through the reference trainer, and compares
their per-step losses (`gpu_reference.parity.compare`, relative difference <= `PARITY_RTOL`, the
tolerance of the repository's CS <-> reference parity tests). Precision settings are kept: on the
CPU, cbfloat16 is not emulated, and both sides compute in float32 (bfloat16 autocast where the
reference trainer's `precision.enabled` asks for it).
"""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modelzoo_ext.errors import UserError
from modelzoo_ext.run_config import check_architecture, hf_to_cs_model_config
from modelzoo_ext.run_config import trainer_yaml as rc
from modelzoo_ext.study.preflight.config_checks import modelzoo_installed
from modelzoo_ext.study.preflight.report import FAIL, PASS, SKIP, Check
from modelzoo_ext.study.preflight.subject import Subject

TWIN_LAYERS, TWIN_HIDDEN, TWIN_FFN, TWIN_MAX_HEADS = 2, 64, 128, 8
TWIN_STEPS, TWIN_BATCH, TWIN_SEQ = 2, 4, 128
PARITY_RTOL = 1e-4
TIMEOUT_S = 900
KEPT_FILES = ("params.yaml", "cszoo.log", "reference.log", "losses.json")  # what stays after a pass


@dataclass(frozen=True)
class TwinMasks:
    """How the run's masks are made, to make the twin's the same way."""

    method: str
    structure: str
    scope: str
    sparsity: float
    seed: int = 0
    include: str | None = None
    exclude: str | None = None
    source: str = ""  # where these settings come from (for the check's detail)

    @classmethod
    def of_file(cls, path: str | Path) -> TwinMasks:
        """The settings a mask file records (`masks compute` writes them)."""
        from modelzoo_ext.masks.format import MaskFile

        meta = MaskFile(path).metadata
        rule = meta.get("target_rule") or {}
        sparsity = meta.get("requested_sparsity", meta.get("sparsity", meta.get("achieved_sparsity")))
        scope = meta.get("scope") if meta.get("scope") in ("layer", "global") else "layer"
        return cls(str(meta.get("method")), str(meta.get("structure")), scope, float(sparsity),
                   int(meta.get("seed") or 0), None if rule.get("default", True) else rule.get("include"),
                   rule.get("exclude"), f"as recorded in {path}")  # fmt: skip


@dataclass(frozen=True)
class TwinFiles:
    """Everything the twin trains from, under its work directory."""

    work: Path
    hf_dir: Path
    params: Path
    cs_run: Path
    reference_run: Path
    data_note: str


# -- the twin's model ------------------------------------------------------------------------------
def _twin_heads(heads: int, kv_heads: int) -> tuple[int, int]:
    """(heads, key/value heads) of the twin: at most 8 heads dividing the width, kv in the model's ratio."""
    twin = next(h for h in (TWIN_MAX_HEADS, 4, 2, 1) if h <= heads and TWIN_HIDDEN % h == 0)
    return twin, max(1, twin * kv_heads // heads)


def twin_hf_config(hf_config: dict[str, Any]) -> dict[str, Any]:
    """The model's config.json with the twin's sizes (everything else as it is)."""
    heads = int(hf_config["num_attention_heads"])
    twin_heads, twin_kv = _twin_heads(heads, int(hf_config.get("num_key_value_heads") or heads))
    twin = {
        k: v
        for k, v in copy.deepcopy(hf_config).items()
        if k not in ("_name_or_path", "transformers_version")
    }
    twin.update(num_hidden_layers=TWIN_LAYERS, hidden_size=TWIN_HIDDEN, intermediate_size=TWIN_FFN,
                num_attention_heads=twin_heads, num_key_value_heads=twin_kv, torch_dtype="float32")  # fmt: skip
    if "head_dim" in twin:
        twin["head_dim"] = TWIN_HIDDEN // twin_heads
    return twin


def twin_model_section(section: dict[str, Any], twin_hf: dict[str, Any], family: str) -> dict[str, Any]:
    """The run config's model section with the twin's sizes; every other key as the run has it."""
    converted = hf_to_cs_model_config(twin_hf, family)
    twin = copy.deepcopy(section)
    for key in ("hidden_size", "filter_size", "num_hidden_layers", "num_heads"):
        twin[key] = converted[key]
    if "extra_attention_params" in converted:
        twin["extra_attention_params"] = {**(twin.get("extra_attention_params") or {}),
                                          **converted["extra_attention_params"]}  # fmt: skip
    for key in ("rotary_dim", "attention_inner_dim"):
        if key in twin:
            twin[key] = converted.get(key, TWIN_HIDDEN)
    check = check_architecture({k: v for k, v in twin.items() if k not in ("name", "sparse_lora", "loss_scaling",
                                                                          "loss_weight")}, twin_hf, family)  # fmt: skip
    if not check.ok:
        raise UserError(f"the twin's model section does not describe the twin model: {check.mismatches}")
    return twin


# -- the twin's data -------------------------------------------------------------------------------
def _window(sample: np.ndarray, length: int) -> np.ndarray | None:
    """The `length` tokens of a sample [3, msl] ending at its last loss token (None: no loss token)."""
    loss = np.flatnonzero(sample[1])
    if loss.size == 0:
        return None
    end = int(loss[-1]) + 1
    start = max(0, end - length)
    window = sample[:, start : start + length]
    if window.shape[1] < length:  # a sample shorter than the window: padded after its end, no loss there
        pad = np.zeros((3, length - window.shape[1]), dtype=window.dtype)
        pad[0], pad[2] = window[0, -1], window[2, -1]
        window = np.concatenate([window, pad], axis=1)
    return window


def twin_samples(data_dir: str | None, count: int, vocab: int, seed: int) -> tuple[np.ndarray, str]:
    """(int32 [count, 3, L] samples, where they come from): the run's data cut to the twin's
    length, or counting sequences when the data is not prepared."""
    from modelzoo_ext.data.hdf5 import SampleDataset

    if data_dir and Path(data_dir).is_dir() and list(Path(data_dir).glob("*.h5")):
        dataset = SampleDataset(data_dir)
        length = min(TWIN_SEQ, dataset.max_seq_length)
        picked = []
        for i in range(len(dataset)):
            window = _window(np.asarray(dataset[i]), length)
            if window is not None:
                picked.append(window)
            if len(picked) == count:
                break
        dataset.close()
        if len(picked) == count:
            return np.stack(picked).astype(
                np.int32
            ), f"the run's data ({data_dir}), {count} samples cut to {length} tokens"
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, max(1, vocab - 8 * TWIN_SEQ), size=count)
    tokens = starts[:, None] + rng.integers(1, 7, size=count)[:, None] * np.arange(TWIN_SEQ + 1)[None, :]
    tokens %= vocab
    loss = np.ones((count, TWIN_SEQ), dtype=np.int32)
    loss[:, : TWIN_SEQ // 4] = 0
    samples = np.stack([tokens[:, :-1], loss, tokens[:, 1:]], axis=1).astype(np.int32)
    return samples, f"counting sequences ({data_dir or 'no data dir'} is not prepared yet)"


# -- building --------------------------------------------------------------------------------------
def _twin_params(
    subject: Subject, twin_section: dict[str, Any], files: dict[str, Path], batch: int
) -> dict[str, Any]:
    """The run's YAML with the twin's model, masks, base, data, CPU backend and length."""
    params = copy.deepcopy(subject.params)
    trainer = params["trainer"]
    for key in ("validate", "validate_all"):
        trainer.pop(key, None)
    init = trainer["init"]
    init["backend"] = {"backend_type": "CPU"}
    init["model_dir"] = str(files["cs_run"])
    if not twin_section["sparse_lora"].get("dense_baseline"):
        twin_section["sparse_lora"]["mask_path"] = str(files["masks"])
    rc.set_model_section(params, twin_section)
    init["loop"] = {
        **{k: v for k, v in (init.get("loop") or {}).items() if k != "num_steps"},
        "max_steps": TWIN_STEPS,
    }
    checkpoint = init.get("checkpoint") or {}
    if checkpoint.get("steps"):
        checkpoint["steps"] = min(int(checkpoint["steps"]), TWIN_STEPS)
    rc.ensure_callback(params, "SparseLoRALossLog")
    rc.set_base_checkpoint(params, str(files["cs_checkpoint"]))
    trainer["fit"].pop("val_dataloader", None)
    loader = rc.train_dataloader(params)
    for key in ("prefetch_factor", "persistent_workers"):  # need data-loader workers
        loader.pop(key, None)
    loader.update(data_dir=str(files["data"]), batch_size=batch, num_workers=0)
    return params


def build_twin(subject: Subject, masks: TwinMasks | None, work: Path) -> TwinFiles:
    """Write the twin's model, masks, base checkpoint, data and run config under `work`."""
    from transformers import AutoConfig

    from mask_converters.hf_to_cs import convert_hf_to_cs
    from modelzoo_ext.data.hdf5 import write_samples
    from modelzoo_ext.tiny_models import save_random_model

    family = subject.family.name
    hf_config, _ = subject.hf_config()
    twin_hf = twin_hf_config(hf_config)
    section = twin_model_section(subject.model, twin_hf, family)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    files = {"hf": work / "hf", "masks": work / "masks.safetensors", "cs_checkpoint": work / "cs" / "model.mdl",
             "data": work / "data", "cs_run": work / "cs_run"}  # fmt: skip
    config = AutoConfig.for_model(
        twin_hf["model_type"], **{k: v for k, v in twin_hf.items() if k != "model_type"}
    )
    save_random_model(files["hf"], config, seed=0)
    loader = subject.params["trainer"]["fit"]["train_dataloader"]
    batch = min(int(loader["batch_size"]), TWIN_BATCH)
    accum = int((subject.params["trainer"]["init"].get("loop") or {}).get("grad_accum_steps", 1))
    samples, data_note = twin_samples(
        subject.data_dir, batch * accum * TWIN_STEPS, int(twin_hf["vocab_size"]), 0
    )
    files["data"].mkdir()
    write_samples(files["data"] / "data-0.h5", samples)
    if masks is not None:
        _twin_masks(files, masks, samples.shape[2])
    if modelzoo_installed():  # the CS base only `cszoo fit` reads (and only cerebras-pytorch writes)
        convert_hf_to_cs(files["hf"], files["cs_checkpoint"].parent, family)
    params = _twin_params(subject, section, files, batch)
    rc.write_yaml(work / "params.yaml", params)
    return TwinFiles(work, files["hf"], work / "params.yaml", files["cs_run"], work / "reference", data_note)


def _twin_masks(files: dict[str, Path], masks: TwinMasks, seq_len: int) -> None:
    from modelzoo_ext.masks.calibration import CalibrationConfig
    from modelzoo_ext.masks.compute import MaskRequest, compute_masks

    calibration = CalibrationConfig(
        data_dir=str(files["data"]), tokens=2 * seq_len, seq_len=seq_len, seed=masks.seed
    )
    request = MaskRequest(method=masks.method, structure=masks.structure, scope=masks.scope,
                          sparsities=(masks.sparsity,), seed=masks.seed, include=masks.include,
                          exclude=masks.exclude, calibration=calibration)  # fmt: skip
    compute_masks(files["hf"], request, files["masks"], plot=False, workers=1)


# -- running ---------------------------------------------------------------------------------------
def _run(argv: list[str], log: Path, cwd: Path) -> tuple[int, float]:
    started = time.perf_counter()
    with open(log, "w") as out:
        try:
            done = subprocess.run(
                argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, timeout=TIMEOUT_S, check=False
            )
            code = done.returncode
        except subprocess.TimeoutExpired:
            code = -1
            out.write(f"\ntimed out after {TIMEOUT_S} s\n")
    return code, time.perf_counter() - started


_ERROR = re.compile(r"(Error|error:|refused|Traceback|timed out)")


def failure_line(log: Path) -> str:
    """The last line of a log that names an error (else its last line)."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if _ERROR.search(line) and not line.startswith("Traceback")]
    return (errors or lines or ["(empty log)"])[-1][:600]


def _losses(row: dict[int, float]) -> str:
    return ", ".join(f"{v:.5f}" for _, v in sorted(row.items()))


def run_twin(files: TwinFiles) -> list[Check]:
    """Train the twin through `cszoo fit` (where ModelZoo is installed) and the reference trainer;
    compare their per-step losses."""
    from gpu_reference.parity import cs_losses, gpu_losses

    checks, losses = [], {}
    if modelzoo_installed():
        code, seconds = _run([sys.executable, "-m", "modelzoo_ext.cerebras.wrapper", "fit", str(files.params)],
                             files.work / "cszoo.log", files.work)  # fmt: skip
        if code == 0:
            losses["cs"] = cs_losses(files.cs_run)
            checks.append(
                Check(
                    "twin: cszoo fit (CPU)",
                    PASS,
                    f"{TWIN_STEPS} steps in {seconds:.0f} s, losses {_losses(losses['cs'])}",
                )
            )
        else:
            checks.append(Check("twin: cszoo fit (CPU)", FAIL, f"{failure_line(files.work / 'cszoo.log')} "
                                f"(log: {files.work / 'cszoo.log'})"))  # fmt: skip
    else:
        checks.append(Check("twin: cszoo fit (CPU)", SKIP, "ModelZoo is not installed here"))
    code, seconds = _run([sys.executable, "-m", "gpu_reference.train", str(files.params), "--hf-model", str(files.hf_dir),
                          "--out", str(files.reference_run), "--device", "cpu", "--no-progress"],
                         files.work / "reference.log", files.work)  # fmt: skip
    if code == 0:
        losses["reference"] = gpu_losses(files.reference_run)
        checks.append(Check("twin: reference trainer", PASS, f"{TWIN_STEPS} steps in {seconds:.0f} s, losses "
                            f"{_losses(losses['reference'])}"))  # fmt: skip
    else:
        checks.append(Check("twin: reference trainer", FAIL, f"{failure_line(files.work / 'reference.log')} "
                            f"(log: {files.work / 'reference.log'})"))  # fmt: skip
    checks.append(_parity(losses))
    (files.work / "losses.json").write_text(
        json.dumps({k: {str(s): v for s, v in d.items()} for k, d in losses.items()})
    )
    return checks


def _parity(losses: dict[str, dict[int, float]]) -> Check:
    from gpu_reference.parity import compare

    if set(losses) != {"cs", "reference"}:
        return Check("twin: loss parity", SKIP, "needs both trainers' losses (see above)")
    rows = compare(losses["cs"], losses["reference"])
    worst = max(rows, key=lambda r: r[3])
    detail = (f"max relative difference {worst[3]:.2e} at step {worst[0]} over {len(rows)} steps "
              f"(rtol {PARITY_RTOL:g})")  # fmt: skip
    if len(rows) < TWIN_STEPS or not math.isfinite(worst[3]) or worst[3] > PARITY_RTOL:
        return Check("twin: loss parity", FAIL, f"{detail}: the two backends do not compute the same run")
    return Check("twin: loss parity", PASS, detail)


def twin_checks(
    subject: Subject, masks: TwinMasks | None, work: Path, *, keep_files: bool = False
) -> list[Check]:
    """Build and train the twin (module docstring); its files are removed after a pass unless
    `keep_files` (the logs, its params and losses stay in `work`)."""
    started = time.perf_counter()
    try:
        files = build_twin(subject, masks, work)
    except UserError as exc:
        return [Check("twin: build", FAIL, str(exc))]
    checks = run_twin(files)
    what = "dense baseline, no masks" if masks is None else (
        f"masks {masks.method} {masks.structure} {masks.scope} {masks.sparsity:g} ({masks.source})")  # fmt: skip
    if not keep_files and not any(c.failed for c in checks):
        for item in work.iterdir():
            if item.name not in KEPT_FILES:
                shutil.rmtree(item) if item.is_dir() else item.unlink()
    seconds = time.perf_counter() - started
    build = Check("twin: build", PASS, f"{TWIN_LAYERS} layers, width {TWIN_HIDDEN}; {what}; data: {files.data_note}; "
                  f"the twin took {seconds:.0f} s in all")  # fmt: skip
    return [build, *checks]
