"""The flagship params files run on every backend: Llama-3.1-8B, Mistral-7B-v0.1 and Llama-2-7B.

Each `model_configs/params_sparse_lora_<model>.yaml` serves `cszoo fit` (CS-3) and the reference
trainer (GPU). These tests hold them against the models' real `config.json`
(tests/fixtures/hf_configs, sources in README.md there; no weights):
- the reference trainer accepts each file with its model's config.json up to the point of reading
  weights, and refuses a config.json that really differs (another vocabulary) before any weight
  file is opened, with one error naming the key (exit status 2);
- what only the CSX backend reads is listed as ignored, each key with its reason, and stays in the file;
- ModelZoo itself (`modelzoo` marker) still validates the files, and its own params files and
  config converters agree with the fixtures.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

import gpu_reference.model
import gpu_reference.train
from gpu_reference.model import open_base
from modelzoo_ext.errors import UserError
from modelzoo_ext.run_config import check_architecture, hf_to_cs_model_config, load_run_config
from modelzoo_ext.run_config.modelzoo_fields import MODELZOO_DEFAULTS
from modelzoo_ext.run_config.trainer_yaml import set_mode

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "hf_configs"

# model -> (params file, family, ModelZoo 2.10's own params file for the same model)
FLAGSHIPS = {
    "Llama-3.1-8B": ("params_sparse_lora_llama3p1_8b.yaml", "llama", "llama/configs/params_llama3p1_8b_msl_8k.yaml"),
    "Mistral-7B-v0.1": ("params_sparse_lora_mistral_7b.yaml", "mistral", "mistral/configs/params_mistral_7B_msl128k.yaml"),
    "Llama-2-7B": ("params_sparse_lora_llama2_7b.yaml", "llama", "llama/configs/params_llama2_7b.yaml"),
}  # fmt: skip
MODELS = list(FLAGSHIPS)

# What only the CSX backend reads in every flagship file: skipped by rule, each with its reason.
CSX_ONLY_KEYS = {
    "backend",
    "logging",
    "callbacks.ScopedTrainFlags",
    "callbacks.ScopedValidateFlags",
    "callbacks.SparseLoRAMasks",
    "callbacks.SparseLoRALossLog",
    "checkpoint.save_initial_checkpoint",
    "checkpoint.disable_strict_checkpoint_loading",
    "precision.loss_scaling_factor",
    "fit.ckpt_path",
    "fit.train_dataloader.num_workers",
    "fit.val_dataloader.num_workers",
}


def real_config(model: str) -> dict:
    return json.loads((FIXTURES / f"{model}.config.json").read_text())


def params_path(model: str) -> Path:
    return REPO / "model_configs" / FLAGSHIPS[model][0]


def model_dir(tmp_path: Path, config: dict) -> Path:
    """A directory with `config` as config.json and a small safetensors file holding one dummy
    tensor (no weight of the model): enough for the guarded reader to open it."""
    directory = tmp_path / "hf"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    save_file({"dummy": torch.zeros(2)}, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


class WeightsRead(Exception):
    """Raised by the stand-in for transformers' weight loading."""


@pytest.fixture
def no_weight_loading(monkeypatch):
    """Loading the model's weights fails with `WeightsRead`, wherever the trainer calls it from."""

    def refuse(hf_model, *args, **kwargs):
        raise WeightsRead(str(hf_model))

    monkeypatch.setattr(gpu_reference.model, "load_hf_model", refuse)
    monkeypatch.setattr(gpu_reference.train, "load_hf_model", refuse)


# ----------------------------------------------------------------------------- the fixtures
@pytest.mark.parametrize(
    "model, values",
    [
        ("Llama-3.1-8B", {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                          "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                          "rope_theta": 500000.0, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
                          "tie_word_embeddings": False,
                          "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 8192, "rope_type": "llama3"}}),
        ("Mistral-7B-v0.1", {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
                             "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                             "rope_theta": 10000.0, "sliding_window": 4096, "max_position_embeddings": 32768,
                             "rms_norm_eps": 1e-5, "tie_word_embeddings": False}),
        ("Llama-2-7B", {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
                        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_scaling": None,
                        "tie_word_embeddings": False}),
    ],
)  # fmt: skip
def test_fixtures_hold_the_published_values(model, values):
    config = real_config(model)
    assert {key: config[key] for key in values} == values
    assert "rope_theta" not in config or model != "Llama-2-7B"  # Llama-2's file leaves it to the default


# ----------------------------------------------------------------------------- CSX-only keys
@pytest.mark.parametrize("model", MODELS)
def test_csx_only_keys_are_ignored_with_reasons_and_stay_in_the_file(model):
    cfg = load_run_config(params_path(model))
    assert set(cfg.ignored) == CSX_ONLY_KEYS
    assert all(isinstance(reason, str) and len(reason) > 10 for reason in cfg.ignored.values())
    assert "cluster_config" in cfg.ignored["backend"]
    assert "csx.performance.micro_batch_size" in cfg.ignored["callbacks.ScopedTrainFlags"]
    assert "csx.performance.micro_batch_size" in cfg.ignored["callbacks.ScopedValidateFlags"]
    raw = yaml.safe_load(params_path(model).read_text())["trainer"]  # nothing deleted per backend
    assert raw["init"]["backend"]["cluster_config"]["num_csx"] == 1
    assert {"ScopedTrainFlags": {"csx.performance.micro_batch_size": 8}} in raw["init"]["callbacks"]


# ----------------------------------------------------------------------------- accepted
@pytest.mark.parametrize("model", MODELS)
def test_the_real_config_json_is_accepted_up_to_reading_weights(model, tmp_path, no_weight_loading):
    params, family, _ = FLAGSHIPS[model]
    cfg = load_run_config(params_path(model))
    base = open_base(model_dir(tmp_path, real_config(model)), cfg)
    assert base.family == family
    assert base.checkpoint.keys() == ["dummy"]  # opened through the guarded reader; nothing else read
    record = base.architecture.as_record()
    assert {"vocab_size", "hidden_size", "filter_size", "num_hidden_layers", "num_heads", "rope_theta",
            "rotary_dim", "layer_norm_epsilon", "attention_module", "nonlinearity"} <= set(record["compared"])  # fmt: skip
    if real_config(model)["num_key_value_heads"] != real_config(model)["num_attention_heads"]:
        assert "extra_attention_params" in record["compared"]  # the key/value heads
    assert (
        "max_position_embeddings" in record["not_compared"] and "initializer_range" in record["not_compared"]
    )
    if (
        model == "Llama-3.1-8B"
    ):  # 8192 in the YAML, 131072 in config.json: skipped on purpose, with the reason
        assert cfg.init.model.architecture["max_position_embeddings"] == 8192
        assert "131072" in record["not_compared"]["max_position_embeddings"]
        assert {"pos_scaling_type", "pos_scaling_factor", "pos_scaling_extra_args"} <= set(record["compared"])
    if model == "Mistral-7B-v0.1":
        assert "attention_sliding_window_length" in record["compared"]


@pytest.mark.parametrize("model", MODELS)
def test_the_trainer_gets_as_far_as_loading_the_weights(model, tmp_path, no_weight_loading):
    """The whole setup (config, processes, architecture, masks) passes; the first thing it cannot do
    here is load the 7B weights, which the stand-in refuses."""
    params = yaml.safe_load(params_path(model).read_text())
    set_mode(params, "lora", None)  # the dense baseline: no mask file needed
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    hf = model_dir(tmp_path, real_config(model))
    with pytest.raises(WeightsRead, match=str(hf)):
        gpu_reference.train.setup(path, hf, tmp_path / "run", "cpu", None, False, False)


# ----------------------------------------------------------------------------- refused
OTHER_VOCABULARY = {"Llama-3.1-8B": 32000, "Mistral-7B-v0.1": 128256, "Llama-2-7B": 128256}


@pytest.mark.parametrize("model", MODELS)
def test_another_vocabulary_is_refused_before_any_weight_file_is_opened(model, tmp_path, monkeypatch,
                                                                       no_weight_loading, capsys):  # fmt: skip
    import modelzoo_ext.hf_checkpoint

    def no_shard(path, *args, **kwargs):
        raise AssertionError(f"a weight file was opened: {path}")

    monkeypatch.setattr(modelzoo_ext.hf_checkpoint, "read_header", no_shard)  # the layout's one open
    monkeypatch.setattr(modelzoo_ext.hf_checkpoint, "safe_open", no_shard)  # the torch reader's
    other = OTHER_VOCABULARY[model]
    hf = model_dir(tmp_path, {**real_config(model), "vocab_size": other})
    out = tmp_path / "run"
    status = gpu_reference.train.main(
        [
            str(params_path(model)),
            "--hf-model",
            str(hf),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(err) == 1 and err[0].startswith(
        "gpu_reference.train: error: the run config and the HF model disagree"
    )
    ours = yaml.safe_load(params_path(model).read_text())["trainer"]["init"]["model"]["vocab_size"]
    assert f"vocab_size: run config {ours}, HF model {other}" in err[0]
    assert "rope" not in err[0] and "hidden_size" not in err[0]  # only the key that differs
    assert not out.exists()


@pytest.mark.parametrize("model", MODELS)
def test_a_directory_without_weights_is_one_clear_error(model, tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(real_config(model)))
    with pytest.raises(UserError, match="no weights") as info:
        open_base(hf, load_run_config(params_path(model)))
    assert str(hf) in str(info.value)


def test_a_yaml_without_rotary_dim_is_refused_against_llama(tmp_path):
    """ModelZoo rotates a quarter of each head when `rotary_dim` is left out (32 of 128 here);
    transformers' Llama rotates the whole head: a different network."""
    cfg = load_run_config(params_path("Llama-3.1-8B"))
    section = {k: v for k, v in cfg.init.model.architecture.items() if k != "rotary_dim"}
    check = check_architecture(section, real_config("Llama-3.1-8B"), "llama")
    assert check.mismatches == ["rotary_dim: run config 32 (not set: ModelZoo's default), HF model 128"]


# ----------------------------------------------------------------------------- ModelZoo itself
def modelzoo_configs_dir() -> Path:
    import cerebras.modelzoo

    return Path(cerebras.modelzoo.__file__).parent / "models" / "nlp"


@pytest.mark.modelzoo
@pytest.mark.parametrize("model", MODELS)
def test_modelzoo_own_params_file_describes_the_same_model(model):
    """ModelZoo 2.10's params file for the model agrees with the fixture on every compared key."""
    _, family, theirs = FLAGSHIPS[model]
    section = yaml.safe_load((modelzoo_configs_dir() / theirs).read_text())["trainer"]["init"]["model"]
    for key in ("loss_scaling", "loss_weight"):
        section.pop(key, None)
    check = check_architecture(section, real_config(model), family)
    assert check.ok, check.mismatches
    assert "vocab_size" in check.compared and "rotary_dim" in check.compared


@pytest.mark.modelzoo
@pytest.mark.parametrize("model", MODELS)
def test_modelzoo_config_converter_on_the_real_config_json(model):
    """ModelZoo's own HF -> CS config converter turns each real config.json into our model section."""
    from cerebras.modelzoo.tools.convert_checkpoint import convert_config

    from modelzoo_ext.cerebras.converters import newest_stock_cs_format

    family = FLAGSHIPS[model][1]
    fmt = newest_stock_cs_format(family)
    stock = convert_config(family, "hf", fmt, real_config(model), drop_unmatched_keys=True)["model"]
    expected = {k: v for k, v in stock.items() if k not in ("norm_first", "use_ff_layer1_dropout")}
    ours = hf_to_cs_model_config(real_config(model), family)
    assert {k: ours[k] for k in expected} == expected
    # what the stock converter leaves out is ModelZoo's default (Llama-2 has no rope_theta: 10000)
    assert {k: ours[k] for k in ours.keys() - expected.keys()} == {
        k: MODELZOO_DEFAULTS[k] for k in ours.keys() - expected.keys()
    }


@pytest.mark.modelzoo
def test_flagship_yamls_stay_valid_for_modelzoo(tmp_path):
    """ModelZoo's own validation (what `cszoo fit` runs first) accepts the three files and reads
    the architecture of each model from them."""
    from test_cerebras_fit import data_dirs, run_env

    configs = [params_path(model) for model in MODELS]
    for config in configs:
        for folder in data_dirs(yaml.safe_load(config.read_text())):
            (tmp_path / folder).mkdir(parents=True, exist_ok=True)  # ModelZoo checks they exist
    code = (
        "import json, sys, yaml, modelzoo_ext.cerebras  # registers the sparse_lora models\n"
        "from cerebras.modelzoo.trainer.validate import validate_trainer_params\n"
        "for path in sys.argv[1:]:\n"
        "    init = validate_trainer_params(yaml.safe_load(open(path)))[0].init\n"
        "    m = init.model.config\n"
        "    print(json.dumps({'name': m.name, 'vocab_size': m.vocab_size, 'filter_size': m.filter_size,\n"
        "        'kv': m.extra_attention_params.get('num_kv_groups', m.num_heads), 'rotary_dim': m.rotary_dim,\n"
        "        'rope_theta': m.rope_theta, 'window': m.attention_sliding_window_length,\n"
        "        'callbacks': sorted(type(c).__name__ for c in init.callbacks)}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, *map(str, configs)],
        cwd=tmp_path, env=run_env(tmp_path), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-5000:]
    seen = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert len(seen) == len(MODELS)
    for model, got in zip(MODELS, seen, strict=True):
        hf = real_config(model)
        assert got["name"] == f"sparse_lora_{FLAGSHIPS[model][1]}"
        assert got["vocab_size"] == hf["vocab_size"] and got["filter_size"] == hf["intermediate_size"]
        assert got["kv"] == hf["num_key_value_heads"] and got["rotary_dim"] == 128
        assert got["rope_theta"] == hf.get("rope_theta", 10000.0)
        assert got["window"] == hf.get("sliding_window")
        assert {"SparseLoRAMasks", "ScopedTrainFlags", "ScopedValidateFlags"} <= set(got["callbacks"])
