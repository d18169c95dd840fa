"""Bad inputs wherever a checkpoint is read or meets a mask file: exit status 2, one line, nothing written.

- a truncated safetensors shard (`masks compute`, `masks apply`, `convert hf-to-cs`, `train`);
- a mask file computed on another checkpoint of the same shapes (`convert hf-to-cs`, `train`), and
  the cases the provenance rule accepts: the source, its `masks apply` output with the same masks,
  and the explicit override;
- a model directory with config.json but no weights, and a missing one (`train`).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import modelzoo_ext.cli as cli
from modelzoo_ext.data.hdf5 import write_samples
from modelzoo_ext.run_config import hf_to_cs_model_config

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def run(capsys, *argv) -> tuple[int, str]:
    status = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    return status, err


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("sparse-lora: error:")]
    assert len(lines) == 1, err
    return lines[0]


def compute(model: Path, out: Path, *options: str) -> Path:
    """`sparse-lora masks compute` (layer-scope magnitude unless `options` say otherwise)."""
    assert (
        cli.main(["masks", "compute", "--model", str(model), "--no-plot", "--out", str(out), *options]) == 0
    )
    return out


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def truncated(tmp_path, tiny_llama_dir) -> Path:
    model = _copy_model(tiny_llama_dir, tmp_path / "truncated")
    weights = model / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(200_000)
    return model


@pytest.fixture
def other_weights(tmp_path, tiny_llama_dir) -> Path:
    """The tiny Llama's config and shapes with other weights (a different checkpoint)."""
    model = _copy_model(tiny_llama_dir, tmp_path / "other")
    state = load_file(model / "model.safetensors")
    gen = torch.Generator().manual_seed(99)
    state = {k: torch.randn(v.shape, generator=gen).to(v.dtype) * 0.02 for k, v in state.items()}
    save_file(state, model / "model.safetensors", metadata={"format": "pt"})
    return model


@pytest.fixture(scope="module")
def masks_of_tiny(tmp_path_factory, tiny_llama_dir) -> Path:
    return compute(tiny_llama_dir, tmp_path_factory.mktemp("masks") / "m.safetensors", "--sparsity", "0.5")


def test_a_truncated_shard_is_one_error_in_every_reader(capsys, tmp_path, truncated, masks_of_tiny):
    commands = {
        "masks compute": (
            "masks",
            "compute",
            "--model",
            truncated,
            "--sparsity",
            "0.5",
            "--out",
            tmp_path / "m.safetensors",
        ),
        "masks apply": (
            "masks",
            "apply",
            "--model",
            truncated,
            "--masks",
            masks_of_tiny,
            "--out",
            tmp_path / "pruned",
        ),
        "convert hf-to-cs": (
            "convert",
            "hf-to-cs",
            "--model",
            truncated,
            "--family",
            "llama",
            "--out",
            tmp_path / "cs",
        ),
    }
    for what, argv in commands.items():
        status, err = run(capsys, *argv)
        assert status == 2, (what, err)
        line = error_line(err)
        assert "truncated or corrupt" in line and str(truncated / "model.safetensors") in line, (what, line)
    assert not [p for p in tmp_path.iterdir() if p.name != "truncated"], "nothing may be written"


# ----------------------------------------------------------------------------- provenance
@pytest.mark.cs
def test_convert_refuses_masks_of_another_checkpoint(capsys, tmp_path, other_weights, masks_of_tiny):
    status, err = run(capsys, "convert", "hf-to-cs", "--model", other_weights, "--masks", masks_of_tiny,
                      "--family", "llama", "--out", tmp_path / "cs")  # fmt: skip
    assert status == 2
    line = error_line(err)
    assert "do not belong to this checkpoint" in line
    assert str(masks_of_tiny) in line and str(other_weights) in line and "--skip-provenance-check" in line
    assert not (tmp_path / "cs").exists() and not list(tmp_path.glob(".cs*"))


@pytest.mark.cs
def test_convert_accepts_the_source_its_pruned_output_and_the_logged_override(
    capsys, caplog, tmp_path, tiny_llama_dir, other_weights, masks_of_tiny
):
    from modelzoo_ext.masks.provenance import CS_PROVENANCE

    assert run(capsys, "convert", "hf-to-cs", "--model", tiny_llama_dir, "--masks", masks_of_tiny,
               "--family", "llama", "--out", tmp_path / "cs_source")[0] == 0  # fmt: skip
    record = json.loads((tmp_path / "cs_source" / CS_PROVENANCE).read_text())
    assert record["embedded_masks"] and record["hf_source"]["pruned_from"] is None
    assert (
        run(
            capsys,
            "masks",
            "apply",
            "--model",
            tiny_llama_dir,
            "--masks",
            masks_of_tiny,
            "--out",
            tmp_path / "pruned",
        )[0]
        == 0
    )
    assert run(capsys, "convert", "hf-to-cs", "--model", tmp_path / "pruned", "--masks", masks_of_tiny,
               "--family", "llama", "--out", tmp_path / "cs_pruned")[0] == 0  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="modelzoo_ext.provenance"):
        assert run(capsys, "convert", "hf-to-cs", "--model", other_weights, "--masks", masks_of_tiny, "--family",
                   "llama", "--out", tmp_path / "cs_other", "--skip-provenance-check")[0] == 0  # fmt: skip
    assert "provenance check skipped" in caplog.text


def test_masks_of_the_source_pruned_by_other_masks_are_refused(tmp_path, tiny_llama_dir, masks_of_tiny):
    from modelzoo_ext.errors import UserError
    from modelzoo_ext.hf_checkpoint import HFCheckpoint
    from modelzoo_ext.masks.format import MaskFile
    from modelzoo_ext.masks.provenance import check_hf_checkpoint

    other = tmp_path / "m70.safetensors"
    compute(tiny_llama_dir, other, "--sparsity", "0.7")
    apply = [
        "masks",
        "apply",
        "--model",
        str(tiny_llama_dir),
        "--masks",
        str(other),
        "--out",
        str(tmp_path / "p70"),
    ]
    assert cli.main(apply) == 0
    pruned = HFCheckpoint(tmp_path / "p70")
    assert check_hf_checkpoint(MaskFile(other), pruned) == "the masks' source pruned by these masks"
    assert check_hf_checkpoint(MaskFile(masks_of_tiny), HFCheckpoint(tiny_llama_dir)) == "the masks' source"
    with pytest.raises(UserError, match="pruned by OTHER masks"):
        check_hf_checkpoint(MaskFile(masks_of_tiny), pruned)
    # The pruned copy edited after `masks apply`: its record no longer describes it.
    state = load_file(tmp_path / "p70" / "model.safetensors")
    name = next(k for k in state if "q_proj" in k)
    state[name] = state[name] + 1.0
    save_file(state, tmp_path / "p70" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="neither the checkpoint the masks were computed on"):
        check_hf_checkpoint(MaskFile(other), HFCheckpoint(tmp_path / "p70"))


@pytest.mark.cs
def test_cs_checkpoint_rule_at_run_start(tmp_path, tiny_llama_dir, other_weights, masks_of_tiny):
    """What the ModelZoo callback asks before `cszoo fit` loads its base checkpoint."""
    from mask_converters.hf_to_cs import convert_hf_to_cs
    from modelzoo_ext.errors import UserError
    from modelzoo_ext.masks.format import MaskFile
    from modelzoo_ext.masks.provenance import check_cs_checkpoint

    masks = MaskFile(masks_of_tiny)
    convert_hf_to_cs(tiny_llama_dir, tmp_path / "plain", "llama")  # base without embedded masks
    assert (
        check_cs_checkpoint(masks, tmp_path / "plain" / "model.mdl", run_dir=None)
        == "converted from the masks' source"
    )
    convert_hf_to_cs(other_weights, tmp_path / "other", "llama")
    with pytest.raises(UserError, match="neither the checkpoint the masks were computed on"):
        check_cs_checkpoint(masks, tmp_path / "other" / "model.mdl", run_dir=None)
    other_masks = compute(
        tiny_llama_dir, tmp_path / "m_other.safetensors", "--method", "random", "--sparsity", "0.5"
    )
    convert_hf_to_cs(tiny_llama_dir, tmp_path / "embeds_other", "llama", other_masks)
    with pytest.raises(UserError, match="embeds other masks"):
        check_cs_checkpoint(masks, tmp_path / "embeds_other" / "model.mdl", run_dir=None)
    shutil.copy(tmp_path / "other" / "model.mdl", tmp_path / "plain" / "model.mdl")  # swapped after convert
    with pytest.raises(UserError, match="changed since"):
        check_cs_checkpoint(masks, tmp_path / "plain" / "model.mdl", run_dir=None)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(tmp_path / "other" / "model.mdl", run_dir / "checkpoint_4.mdl")
    assert (
        check_cs_checkpoint(masks, run_dir / "checkpoint_4.mdl", run_dir=run_dir)
        == "the run's own checkpoint (resuming)"
    )


# ----------------------------------------------------------------------------- train
def _train_inputs(tmp_path: Path, hf_dir: Path, masks: Path) -> Path:
    samples = torch.randint(3, 1000, (4, 3, 16), generator=torch.Generator().manual_seed(0)).to(torch.int32)
    samples[:, 1] = 1
    (tmp_path / "data").mkdir()
    write_samples(tmp_path / "data" / "data-0.h5", samples.numpy())
    config = (
        json.loads((Path(hf_dir) / "config.json").read_text())
        if (Path(hf_dir) / "config.json").exists()
        else {}
    )
    model = (
        {**hf_to_cs_model_config(config, "llama"), "name": "sparse_lora_llama"}
        if config
        else {"name": "sparse_lora_llama"}
    )
    model["sparse_lora"] = {"mode": "sparse_to_sparse", "r": 2, "alpha": 4.0, "mask_path": str(masks)}
    params = {"trainer": {
        "init": {"model": model, "optimizer": {"AdamW": {"lr": 1e-3}}, "loop": {"max_steps": 1}},
        "fit": {"train_dataloader": {"data_processor": "GptHDF5MapDataProcessor", "data_dir": str(tmp_path / "data"), "batch_size": 2}},
    }}  # fmt: skip
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_train_refuses_masks_of_another_checkpoint(capsys, tmp_path, other_weights, masks_of_tiny):
    params = _train_inputs(tmp_path, other_weights, masks_of_tiny)
    status, err = run(
        capsys, "train", params, "--hf-model", other_weights, "--out", tmp_path / "run", "--device", "cpu"
    )
    assert status == 2
    line = error_line(err)
    assert (
        "do not belong to this checkpoint" in line
        and str(other_weights) in line
        and str(masks_of_tiny) in line
    )
    assert not (tmp_path / "run").exists()


def test_train_on_bad_model_directories(capsys, tmp_path, truncated, masks_of_tiny, tiny_llama_dir):
    params = _train_inputs(tmp_path, tiny_llama_dir, masks_of_tiny)
    weightless = tmp_path / "config_only"
    weightless.mkdir()
    shutil.copy(tiny_llama_dir / "config.json", weightless / "config.json")
    expected = {
        truncated: "truncated or corrupt",
        weightless: "no weights: neither model.safetensors nor model.safetensors.index.json",
        tmp_path / "missing": "HF model directory not found",
    }
    for model, message in expected.items():
        status, err = run(
            capsys, "train", params, "--hf-model", model, "--out", tmp_path / "run", "--device", "cpu"
        )
        line = error_line(err)
        assert status == 2 and message in line and "Fix:" in line, line
    assert not (tmp_path / "run").exists()
