"""`sparse-lora masks ...` end to end on tiny Llamas: exit status 0, or 2 with one line and no output."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import modelzoo_ext.cli as cli
from modelzoo_ext.masks import cli as masks_cli
from modelzoo_ext.masks import load_masks


@pytest.fixture
def sparse_lora(monkeypatch, capsys):
    """Run the real `sparse-lora` entry point with only this stage's commands registered."""
    monkeypatch.setattr(cli, "COMMAND_MODULES", (masks_cli,))

    def run(*argv: str) -> tuple[int, str, str]:
        status = cli.main([str(a) for a in argv])
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    return run


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("sparse-lora: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("model_fixture", ["tiny_llama_dir", "tiny_llama_sharded_dir"])
def test_compute_validate_apply_import(request, sparse_lora, tmp_path, model_fixture):
    model = request.getfixturevalue(model_fixture)
    out = tmp_path / "masks" / "llama.safetensors"
    status, stdout, _ = sparse_lora(
        "masks", "compute", "--model", model, "--scope", "global", "--sparsity", "0.5", "0.8", "--out", out
    )
    assert status == 0, stdout
    levels = [tmp_path / "masks" / f"llama_sparsity{s}.safetensors" for s in ("0.5", "0.8")]
    for level, sparsity in zip(levels, ("0.5", "0.8"), strict=True):
        assert (
            level.exists()
            and level.with_suffix(".png").exists()
            and level.with_suffix(".stats.json").exists()
        )
        report = tmp_path / f"report{sparsity}.json"
        status, _, err = sparse_lora(
            "masks", "validate", level, "--model", model, "--expected-sparsity", sparsity,
            "--tolerance", "1e-4", "--report", report,
        )  # fmt: skip
        assert status == 0, err
        assert json.loads(report.read_text())["valid"] is True
    status, _, err = sparse_lora(
        "masks", "apply", "--model", model, "--masks", levels[1], "--out", tmp_path / "pruned"
    )
    assert status == 0, err
    status, _, err = sparse_lora(
        "masks", "import", tmp_path / "pruned", "--model", model, "--out", tmp_path / "back.safetensors"
    )
    assert status == 0, err
    original, _ = load_masks(levels[1])
    back, _ = load_masks(tmp_path / "back.safetensors")
    assert all(torch.equal(original[n], back[n]) for n in original)


def test_validate_prints_json_and_fails_on_tamper(sparse_lora, tiny_llama_dir, tmp_path):
    out = tmp_path / "m.safetensors"
    assert (
        sparse_lora(
            "masks", "compute", "--model", tiny_llama_dir, "--structure", "2:4", "--out", out, "--no-plot"
        )[0]
        == 0
    )
    status, stdout, _ = sparse_lora("masks", "validate", out)
    assert status == 0 and json.loads(stdout)["valid"] is True
    data = bytearray(out.read_bytes())
    data[-1] ^= 0x10  # one bit of the last mask's data
    out.write_bytes(bytes(data))
    status, stdout, err = sparse_lora("masks", "validate", out)
    assert status == 2 and json.loads(stdout)["valid"] is False
    assert "checksum" in error_line(err) and str(out) in error_line(err)


@pytest.fixture(scope="module")
def nan_model(tiny_llama_dir, tmp_path_factory):
    directory = tmp_path_factory.mktemp("nan_model")
    tensors = load_file(tiny_llama_dir / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.weight"][1, 2] = float("inf")
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sparsity", "1.0"], "outside [0, 1)"),
        (["--structure", "4:2"], "0 < N < M"),
        (["--structure", "2:4", "--sparsity", "0.3"], "fixes the sparsity"),
        (["--sparsity", "0.5", "--include", "("], "invalid regular expression"),
        ([], "no sparsity level given"),
    ],
)
def test_compute_bad_arguments(sparse_lora, tiny_llama_dir, tmp_path, args, message):
    out = tmp_path / "m.safetensors"
    status, _, err = sparse_lora("masks", "compute", "--model", tiny_llama_dir, "--out", out, *args)
    assert status == 2 and message in error_line(err)
    assert list(tmp_path.iterdir()) == []


def test_compute_non_finite_weights(sparse_lora, nan_model, tmp_path):
    status, _, err = sparse_lora(
        "masks", "compute", "--model", nan_model, "--sparsity", "0.5", "--out", tmp_path / "m.safetensors"
    )
    line = error_line(err)
    assert status == 2 and "k_proj" in line and str(nan_model) in line and "Fix:" in line
    assert list(tmp_path.iterdir()) == []


def test_pickle_checkpoint_and_pickle_masks_are_refused(sparse_lora, tiny_llama_dir, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save({"w": torch.zeros(2)}, pickled / "pytorch_model.bin")
    status, _, err = sparse_lora(
        "masks", "compute", "--model", pickled, "--sparsity", "0.5", "--out", tmp_path / "m.safetensors"
    )
    assert status == 2 and "pickle" in error_line(err)
    old = tmp_path / "old.pt"
    torch.save({"masks": {}}, old)
    status, _, err = sparse_lora(
        "masks", "import", old, "--model", tiny_llama_dir, "--out", tmp_path / "m.safetensors"
    )
    assert status == 2 and "--allow-pickle" in error_line(err)
    assert not (tmp_path / "m.safetensors").exists()


def test_apply_corrupt_or_tampered_masks_leaves_no_output(sparse_lora, tiny_llama_dir, tmp_path):
    masks = tmp_path / "m.safetensors"
    assert (
        sparse_lora(
            "masks", "compute", "--model", tiny_llama_dir, "--sparsity", "0.5", "--out", masks, "--no-plot"
        )[0]
        == 0
    )
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(masks.read_bytes()[:200])
    status, _, err = sparse_lora(
        "masks", "apply", "--model", tiny_llama_dir, "--masks", truncated, "--out", tmp_path / "out"
    )
    assert status == 2 and "truncated or corrupt" in error_line(err)
    tampered = tmp_path / "tampered.safetensors"
    data = bytearray(masks.read_bytes())
    data[len(data) // 2 + 2000] ^= 0x01
    tampered.write_bytes(bytes(data))
    status, _, err = sparse_lora(
        "masks", "apply", "--model", tiny_llama_dir, "--masks", tampered, "--out", tmp_path / "out"
    )
    assert status == 2 and "checksum mismatch" in error_line(err)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary left behind


def test_validate_against_other_model_names_tensor(sparse_lora, tiny_llama_dir, tiny_mistral_dir, tmp_path):
    masks = tmp_path / "m.safetensors"
    assert (
        sparse_lora(
            "masks", "compute", "--model", tiny_llama_dir, "--sparsity", "0.5", "--out", masks, "--no-plot"
        )[0]
        == 0
    )
    status, _, err = sparse_lora(
        "masks", "validate", masks, "--model", tiny_mistral_dir, "--report", tmp_path / "r.json"
    )
    line = error_line(err)
    assert status == 2 and "source blake3 model.layers." in line and "Fix:" in line


def test_help_names_every_subcommand(sparse_lora, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["masks", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(word in text for word in ("compute", "validate", "apply", "import"))


IMPORTS_OF = """
import sys
from modelzoo_ext import cli
status = cli.main(sys.argv[1:])
heavy = ("torch", "transformers", "matplotlib", "safetensors.torch")
print("loaded:", status, *sorted(m for m in heavy if m in sys.modules))
"""


@pytest.mark.parametrize(
    ("options", "allowed"),
    [
        (["--no-plot"], set()),
        (["--method", "random", "--scope", "global", "--no-plot"], set()),
        ([], {"matplotlib"}),  # the figure is drawn
        (["--structure", "rows", "--no-plot"], {"torch"}),  # line sums are torch's
    ],
)
def test_compute_imports_only_what_the_method_needs(tiny_llama_dir, tmp_path, options, allowed):
    """Start-up: magnitude and random masks load neither torch nor transformers (`-X importtime`
    showed torch alone at 1.5-2.5 s of the ~3 s start-up); plotting loads matplotlib only."""
    import subprocess
    import sys

    argv = ["masks", "compute", "--model", str(tiny_llama_dir), "--sparsity", "0.5"]
    argv += ["--out", str(tmp_path / "m.safetensors"), *options]
    result = subprocess.run(
        [sys.executable, "-c", IMPORTS_OF, *argv], capture_output=True, text=True, check=True
    )
    status, *loaded = result.stdout.split("loaded:")[-1].split()
    assert status == "0" and set(loaded) == allowed, result.stdout
