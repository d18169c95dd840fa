"""Meeting a cluster as it is: ModelZoo releases 2.6 to 2.10, and users' existing ModelZoo run configs.

- versions: `stack_versions()` reads the installed stack, `release_warning()` warns (never refuses)
  about an untested release or a cerebras-pytorch that is not ModelZoo's;
- the no-change installer's bookkeeping (`scripts/install_into_env.py`); the installs themselves
  were measured per release (docs/modelzoo.md, "Releases");
- ModelZoo's own `Lora` callback: refused by the reference trainer in every spelling, and by
  `cszoo fit` (the `modelzoo` test, CPU backend) before anything trains;
- `sparse-lora migrate-config`: ModelZoo's matching rule for `target_modules` against the real
  model's classes, ModelZoo's own Llama-3.1 / Mistral / Mixtral params files (plus a `Lora`
  callback) migrated and accepted by the reference trainer's checks against the real config.json,
  and (slow) a migrated tiny twin trained on both backends with per-step loss parity;
- the converter registry of the installed release (stand-ins only where ModelZoo's tree lacks them).
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from modelzoo_ext.errors import UserError
from modelzoo_ext.run_config import check_architecture, load_run_config
from modelzoo_ext.run_config.migrate import (
    migrate_run_config,
    modelzoo_class_paths,
    wrapped_by_modelzoo_lora,
)
from modelzoo_ext.versions import STACK_DISTRIBUTIONS, TESTED_RELEASES, release_warning, stack_versions

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "hf_configs"
LORA = {"lora_params": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": ["Linear"]}}
ALL_DENSE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ----------------------------------------------------------------------------- versions
def test_stack_versions_reads_installed_metadata_and_none_where_missing(monkeypatch):
    from importlib.metadata import version

    versions = stack_versions()
    assert list(versions) == list(STACK_DISTRIBUTIONS)
    assert versions["torch"] == version("torch") and versions["modelzoo-sparse-lora"] == "0.1.0"
    monkeypatch.setitem(STACK_DISTRIBUTIONS, "nothing", "no-such-distribution-xyz")
    assert stack_versions()["nothing"] is None


def test_release_warning_warns_about_untested_or_mismatched_releases_only():
    assert release_warning({"cerebras-modelzoo": None, "cerebras-pytorch": None}) is None
    for release in TESTED_RELEASES:
        assert release_warning({"cerebras-modelzoo": release, "cerebras-pytorch": release}) is None
    untested = release_warning({"cerebras-modelzoo": "2.5.0", "cerebras-pytorch": "2.5.0"})
    assert "2.5.0 is not a release this package was tested with" in untested
    mismatch = release_warning({"cerebras-modelzoo": "2.6.0", "cerebras-pytorch": "2.10.0"})
    assert "cerebras-pytorch 2.10.0 does not match ModelZoo 2.6.0" in mismatch


def test_the_reference_run_json_records_the_stack(monkeypatch):
    import torch

    import gpu_reference.train as train

    recorded = train._versions()
    build = {"python", "git_revision", "torch", "torch_cuda"}
    assert {k: v for k, v in recorded.items() if k not in build} == {
        k: v for k, v in stack_versions().items() if k != "torch"
    }
    assert recorded["python"] == sys.version.split()[0] and recorded["torch"] == torch.__version__


# ----------------------------------------------------------------------------- the installer
def _installer():
    spec = importlib.util.spec_from_file_location(
        "install_into_env", REPO / "scripts" / "install_into_env.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_installer_refuses_any_change_pip_plans_and_reports_additions():
    installer = _installer()
    before = {"transformers": "4.45.2", "click": "8.1.7", "modelzoo-sparse-lora": "0.0.1"}
    report = {"install": [
        {"metadata": {"name": "Transformers", "version": "4.57.1"}},
        {"metadata": {"name": "blake3", "version": "1.0.11"}},
        {"metadata": {"name": "modelzoo_sparse_lora", "version": "0.1.0"}},  # ours: reinstalled editable
    ]}  # fmt: skip
    assert installer.planned_changes(report, before) == ["Transformers 4.45.2 -> 4.57.1"]
    after = {**before, "blake3": "1.0.11", "modelzoo-sparse-lora": "0.1.0"}
    assert installer.diff(before, after) == (["blake3==1.0.11"], [])
    assert installer.diff(before, {**after, "click": "8.3.0"})[1] == ["click 8.1.7 -> 8.3.0"]
    assert installer.canonical("Foo_Bar.baz") == "foo-bar-baz"


def test_installer_needs_an_existing_environment(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "install_into_env.py"), "--venv", str(tmp_path / "none")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "must be an existing environment" in result.stderr


# ----------------------------------------------------------------------------- run configs
def tiny_modelzoo_lora_params(spelling: str = "Lora") -> dict:
    """The repository's tiny run config as a user's ModelZoo LoRA config: stock `llama`, ModelZoo's
    Lora callback with `Linear`, and the CS-3 habits of the original study's configs."""
    params = yaml.safe_load((REPO / "model_configs" / "params_sparse_lora_tiny.yaml").read_text())
    init = params["trainer"]["init"]
    block = init["model"].pop("sparse_lora")
    init["model"]["name"] = "llama"
    init["precision"] = {"enabled": False, "log_loss_scale": True}
    init["callbacks"] = [
        {"ComputeNorm": {}},
        {"ScopedTrainFlags": {"csx.performance.micro_batch_size": "auto"}},
        {"LoadCheckpointStates": {"load_checkpoint_states": "model"}},
        {spelling: {"lora_params": {"r": block["r"], "alpha": block["alpha"], "target_modules": ["Linear"]}}},
    ]
    return params


def write(path: Path, params: dict) -> Path:
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.mark.parametrize("spelling", ["Lora", "lora", "LoRA", "LORA"])
def test_the_reference_trainer_refuses_modelzoos_lora_callback_with_the_migration(tmp_path, spelling):
    params = tiny_modelzoo_lora_params(spelling)
    params["trainer"]["init"]["model"]["name"] = "sparse_lora_llama"
    params["trainer"]["init"]["model"]["sparse_lora"] = {
        "mode": "sparse_to_sparse",
        "mask_path": "m.safetensors",
    }
    with pytest.raises(UserError) as exc:
        load_run_config(write(tmp_path / "p.yaml", params))
    message = str(exc.value)
    assert "second, dense and unmasked LoRA" in message and "sparse-lora migrate-config" in message
    assert "lora_params.r -> sparse_lora.r" in message


def test_load_checkpoint_states_is_mirrored_and_must_load_the_model(tmp_path):
    params = migrate_run_config(tiny_modelzoo_lora_params(), mask_path="m.safetensors").params
    config = load_run_config(write(tmp_path / "ok.yaml", params))
    assert "gpu_reference loads the model only" in config.ignored["callbacks.LoadCheckpointStates"]
    assert "dynamic loss scaling" in config.ignored["precision.log_loss_scale"]
    for entry in params["trainer"]["init"]["callbacks"]:
        if "LoadCheckpointStates" in entry:
            entry["LoadCheckpointStates"]["load_checkpoint_states"] = "optimizer,global_step"
    with pytest.raises(UserError, match="but not the model"):
        load_run_config(write(tmp_path / "bad.yaml", params))


def test_migration_of_a_modelzoo_lora_config_lists_every_change():
    source = tiny_modelzoo_lora_params()
    migration = migrate_run_config(source, mode="s2s", mask_path="build/tiny/masks_hf.safetensors")
    init = migration.params["trainer"]["init"]
    assert init["model"]["name"] == "sparse_lora_llama"
    assert init["model"]["sparse_lora"] == {
        "mode": "sparse_to_sparse", "r": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": ALL_DENSE,
        "mask_path": "build/tiny/masks_hf.safetensors",
    }  # fmt: skip
    names = [next(iter(c)) for c in init["callbacks"]]
    assert names == [
        "ComputeNorm",
        "ScopedTrainFlags",
        "LoadCheckpointStates",
        "SparseLoRAMasks",
        "SparseLoRALossLog",
    ]
    text = "\n".join(migration.changes)
    assert "model.name: llama -> sparse_lora_llama" in text and "also wrapped ['lm_head']" in text
    # everything else kept, the input untouched
    for key in ("optimizer", "schedulers", "loop", "precision", "backend", "seed", "model_dir"):
        assert init[key] == source["trainer"]["init"][key]
    assert source["trainer"]["init"]["model"]["name"] == "llama"
    assert migration.params["trainer"]["fit"] == source["trainer"]["fit"]


def test_migration_refuses_what_it_cannot_carry_over():
    params = tiny_modelzoo_lora_params()
    with pytest.raises(UserError, match="--mask-path is needed"):
        migrate_run_config(params, mode="s2s")
    assert migrate_run_config(params, mode="lora").params["trainer"]["init"]["model"]["sparse_lora"][
        "dense_baseline"
    ]
    two = copy.deepcopy(params)
    two["trainer"]["init"]["callbacks"][-1]["Lora"]["lora_params"] = [{"r": 4}, {"r": 8}]
    with pytest.raises(UserError, match="2 lora_params groups"):
        migrate_run_config(two, mask_path="m")
    sparsity = copy.deepcopy(params)
    sparsity["trainer"]["init"]["sparsity"] = {"algorithm": "static"}
    with pytest.raises(UserError, match="sparsity"):
        migrate_run_config(sparsity, mask_path="m")
    other = copy.deepcopy(params)
    other["trainer"]["init"]["model"]["name"] = "gpt2"
    with pytest.raises(UserError, match="no sparse-LoRA variant"):
        migrate_run_config(other, mask_path="m")


def test_modelzoo_lora_targets_are_matched_on_class_names():
    assert wrapped_by_modelzoo_lora(["Linear"], "llama", "multiquery_attention") == [*ALL_DENSE, "lm_head"]
    assert wrapped_by_modelzoo_lora(["MultiQueryAttention"], "llama", "multiquery_attention") == ALL_DENSE[:4]
    assert (
        wrapped_by_modelzoo_lora(["MultiheadAttention", "Linear"], "llama", "aiayn_attention")
        == ALL_DENSE[:4]
    )
    assert wrapped_by_modelzoo_lora(["Linear"], "mixtral", "multiquery_attention") == [
        *ALL_DENSE[:4],
        "gate",
        "lm_head",
    ]
    assert "embed_tokens" in wrapped_by_modelzoo_lora(None, "mistral", "multiquery_attention")


def test_migrate_config_command_writes_the_config_and_prints_the_changes(tmp_path, capsys):
    from modelzoo_ext.cli import main

    source = write(tmp_path / "in.yaml", tiny_modelzoo_lora_params())
    assert main(["migrate-config", str(source), "--out", str(tmp_path / "out.yaml"), "--mask-path", "m"]) == 0
    out = capsys.readouterr().out
    assert "model.name: llama -> sparse_lora_llama" in out and "callbacks: + SparseLoRAMasks" in out
    assert (
        yaml.safe_load((tmp_path / "out.yaml").read_text())["trainer"]["init"]["model"]["sparse_lora"]["r"]
        == 8
    )
    assert main(["migrate-config", str(source), "--out", str(source), "--mask-path", "m"]) == 2


# ----------------------------------------------------------------------------- against ModelZoo
def modelzoo_params_file(family: str) -> Path:
    import cerebras.modelzoo

    files = {
        "llama": "llama/configs/params_llama3p1_8b_msl_8k.yaml",
        "mistral": "mistral/configs/params_mistral_7B_msl128k.yaml",
        "mixtral": "mixtral/configs/params_mixtral_8x7b.yaml",
    }
    return Path(cerebras.modelzoo.__file__).parent / "models" / "nlp" / files[family]


@pytest.mark.modelzoo
@pytest.mark.parametrize(
    "family,hf", [("llama", "Llama-3.1-8B"), ("mistral", "Mistral-7B-v0.1"), ("mixtral", "Mixtral-8x7B-v0.1")]
)
def test_modelzoos_own_params_files_migrated_pass_the_reference_checks(tmp_path, family, hf):
    """ModelZoo's own params file of the installed release plus a `Lora` callback, migrated: the
    reference trainer reads it and its model section describes the real model's config.json."""
    from modelzoo_ext.cerebras.config import CONFIG_CLASSES

    params = yaml.safe_load(modelzoo_params_file(family).read_text())
    params["trainer"]["init"].setdefault("callbacks", []).append({"Lora": copy.deepcopy(LORA)})
    migration = migrate_run_config(params, mode="s2s", mask_path="masks.safetensors")
    fit = migration.params["trainer"]["fit"]
    if fit["train_dataloader"]["data_processor"] != "GptHDF5MapDataProcessor":  # pretraining data
        assert any("GptHDF5MapDataProcessor" in change for change in migration.changes)
    for loader in (fit["train_dataloader"], fit["val_dataloader"]):  # as a fine-tuning run reads its data
        loader["data_processor"] = "GptHDF5MapDataProcessor"
    config = load_run_config(write(tmp_path / "migrated.yaml", migration.params))
    hf_config = json.loads((FIXTURES / f"{hf}.config.json").read_text())
    check = check_architecture(config.init.model.architecture, hf_config, family)
    assert check.ok, check.mismatches
    block = config.sparse_lora
    assert (block.r, block.alpha, block.dropout) == (16, 32.0, 0.05)
    expected = (
        ALL_DENSE[:4] if family == "mixtral" else ALL_DENSE
    )  # ModelZoo's Lora never wraps fused experts
    assert block.target_modules == expected
    # ModelZoo's own validation of the variant's model section (pydantic, extra="forbid")
    section = migration.params["trainer"]["init"]["model"]
    CONFIG_CLASSES[family](**section)


def _ancestry(module, names=(), prefix=""):
    import torch

    names = (*names, type(module).__name__)
    out = {}
    for child_name, child in module.named_children():
        out.update(_ancestry(child, names, f"{prefix}{child_name}."))
    if isinstance(module, torch.nn.Linear | torch.nn.Embedding):
        out[prefix[:-1]] = names
    return out


def _tiny_modelzoo_model(family: str, attention_module: str):
    from modelzoo_ext.cerebras.config import stock_config_class
    from modelzoo_ext.families import FAMILIES

    config_file = (
        "params_sparse_lora_tiny_mixtral.yaml" if family == "mixtral" else "params_sparse_lora_tiny.yaml"
    )
    section = yaml.safe_load((REPO / "model_configs" / config_file).read_text())["trainer"]["init"]["model"]
    section = {k: v for k, v in section.items() if k not in ("name", "sparse_lora")}
    if attention_module == "aiayn_attention":
        section.pop("extra_attention_params")
        section["attention_module"] = attention_module
    if family == "mixtral":
        section["moe"] = {**section["moe"], "moe_implementation": "optimized"}
    spec = FAMILIES[family]
    model_class = getattr(importlib.import_module(spec.modelzoo_module), spec.modelzoo_class)
    return model_class(stock_config_class(spec)(name=spec.modelzoo_model, **section))


@pytest.mark.modelzoo
@pytest.mark.parametrize(
    "family,attention",
    [("llama", "multiquery_attention"), ("llama", "aiayn_attention"), ("mixtral", "multiquery_attention")],
)
def test_class_paths_and_lora_matching_equal_modelzoos_own(family, attention):
    """`modelzoo_class_paths` is the real model's class-name ancestry, and for each target spelling
    `wrapped_by_modelzoo_lora` names exactly the modules ModelZoo's `make_model_lora` converts."""
    from cerebras.modelzoo.common.utils.model.lora import LoRALayer, make_model_lora

    from modelzoo_ext.name_map import cs_to_hf_name

    ours = modelzoo_class_paths(family, attention)
    real = _ancestry(_tiny_modelzoo_model(family, attention))
    hf_of = {"model.lm_head": "lm_head", "model.embedding_layer.word_embeddings": "embed_tokens"}

    def hf_module(cs_name: str) -> str:
        if cs_name in hf_of:
            return hf_of[cs_name]
        if cs_name.endswith("ffn.gate"):
            return "gate"
        return cs_to_hf_name(f"{cs_name}.weight", family).split(".")[-2]

    for cs_name, names in real.items():
        assert ours[hf_module(cs_name)] == names, cs_name
    for targets in (["Linear"], ["MultiQueryAttention"], ["MultiheadAttention"], ["SparseMoEBlock"], None):
        model = _tiny_modelzoo_model(family, attention)
        try:
            make_model_lora(model, {"r": 2, "alpha": 4, "target_modules": targets})
        except RuntimeError:  # "No modules were converted to LoRA"
            wrapped = set()
        else:
            wrapped = {hf_module(n) for n, m in model.named_modules() if isinstance(m, LoRALayer)}
        assert wrapped == set(wrapped_by_modelzoo_lora(targets, family, attention)), targets


@pytest.mark.modelzoo
def test_converter_registry_as_shipped_or_with_its_missing_modules_stood_in():
    """ModelZoo 2.6-2.9 import `checkpoint_converters.internal.*`, absent from their public trees:
    the stand-ins let the registry load (llama converts), and the models needing them are dropped
    and named. Where the package exists (2.10), the registry is left as shipped."""
    from cerebras.modelzoo.tools.checkpoint_converters import registry

    import modelzoo_ext.cerebras  # noqa: F401  (the import watcher)
    from modelzoo_ext.cerebras.converters import (
        INTERNAL_PACKAGE,
        converter_registry_note,
        newest_stock_cs_format,
    )

    note = converter_registry_note()
    assert {"llama", "mistral", "mixtral", "sparse_lora_llama"} <= set(registry.converters)
    stood_in = getattr(sys.modules.get(INTERNAL_PACKAGE), "__path__", None) == []
    if stood_in:
        assert "qwen2" not in registry.converters and "conversion of qwen2" in note
    else:
        assert note == "ModelZoo's converter registry as shipped"
    from importlib.metadata import version

    release = tuple(int(x) for x in version("cerebras_modelzoo").split(".")[:2])
    assert newest_stock_cs_format("llama") == ("cs-2.9" if release >= (2, 9) else "cs-2.5")


@pytest.fixture(scope="module")
def tiny_cs_workdir(tmp_path_factory, tokenizer_dir) -> Path:
    from modelzoo_ext.study.tiny_assets import make_tiny_assets

    work = tmp_path_factory.mktemp("tiny_migrate")
    make_tiny_assets(work / "build" / "tiny", tokenizer_from=tokenizer_dir)
    return work


def _cszoo_fit(work: Path, config: Path) -> subprocess.CompletedProcess:
    from test_cerebras_fit import FIT_TIMEOUT_S, run_env

    return subprocess.run(
        [str(Path(sys.executable).parent / "cszoo-sparse-lora"), "fit", str(config)],
        cwd=work, env=run_env(work), capture_output=True, text=True, timeout=FIT_TIMEOUT_S,
    )  # fmt: skip


@pytest.mark.modelzoo
def test_cszoo_fit_refuses_modelzoos_lora_next_to_the_variant_before_training(tiny_cs_workdir):
    """The tiny s2s variant plus ModelZoo's `Lora` (spelled `LoRA`): `cszoo fit` stops at trainer
    construction with the migration message; no checkpoint is written."""
    params = yaml.safe_load((REPO / "model_configs" / "params_sparse_lora_tiny.yaml").read_text())
    params["trainer"]["init"]["model_dir"] = "build/tiny/runs/two_loras"
    params["trainer"]["init"]["callbacks"].append({"LoRA": copy.deepcopy(LORA)})
    result = _cszoo_fit(tiny_cs_workdir, write(tiny_cs_workdir / "two_loras.yaml", params))
    assert result.returncode != 0
    assert "second, dense and unmasked LoRA" in result.stdout + result.stderr
    assert "sparse-lora migrate-config" in result.stdout + result.stderr
    assert not list((tiny_cs_workdir / "build" / "tiny" / "runs" / "two_loras").glob("checkpoint_*.mdl"))


@pytest.mark.modelzoo
@pytest.mark.slow
def test_a_migrated_tiny_lora_config_trains_on_both_backends_with_equal_losses(tiny_cs_workdir, capsys):
    """A user's ModelZoo LoRA config (tiny twin of the CS-3 ones), migrated, runs through `cszoo fit`
    (CPU) and the reference trainer: per-step losses within 1e-4 relative (`sparse-lora parity`)."""
    import argparse

    from gpu_reference.parity import run_parity

    work = tiny_cs_workdir
    source = write(work / "user_lora.yaml", tiny_modelzoo_lora_params())
    migration = migrate_run_config(
        yaml.safe_load(source.read_text()), mode="s2s", mask_path="build/tiny/masks_hf.safetensors"
    )
    migration.params["trainer"]["init"]["model_dir"] = "build/tiny/runs/migrated"
    migrated = write(work / "migrated.yaml", migration.params)
    fit = _cszoo_fit(work, migrated)
    assert fit.returncode == 0, fit.stdout[-2000:] + fit.stderr[-3000:]
    gpu = subprocess.run(
        [sys.executable, "-m", "gpu_reference.train", str(migrated), "--hf-model", "build/tiny/hf", "--out",
         "gpu_migrated", "--device", "cpu", "--no-progress"],
        cwd=work, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert gpu.returncode == 0, gpu.stderr[-3000:]
    run = json.loads((work / "gpu_migrated" / "run.json").read_text())
    assert run["versions"]["cerebras-modelzoo"] == stack_versions()["cerebras-modelzoo"]
    args = argparse.Namespace(
        cs_run=str(work / "build/tiny/runs/migrated"),
        gpu_run=str(work / "gpu_migrated"),
        rtol=1e-4,
        plot=None,
    )
    assert run_parity(args) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith("ok")
    shutil.rmtree(work / "gpu_migrated")
