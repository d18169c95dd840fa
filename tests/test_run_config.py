"""The architecture check's tables (`modelzoo_ext.run_config.modelzoo_fields`) against the installed ModelZoo.

`check_architecture` counts a key the run config leaves out with ModelZoo's default, compares the
ModelZoo-only keys that change the computation with their defaults, and skips the rest with a
reason. The `modelzoo` tests hold those tables to ModelZoo's real config classes: every default
equal, every key of the classes in exactly one table, less the keys the installed release does not
have yet (`MODELZOO_KEYS_SINCE`, itself checked against the classes). The others check what the
tables do.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelzoo_ext.run_config import check_architecture, hf_to_cs_model_config, normalise_model_section
from modelzoo_ext.run_config.architecture import MIXTRAL_MOE_FIXED
from modelzoo_ext.run_config.modelzoo_fields import (
    MODELZOO_ALIASES,
    MODELZOO_DEFAULTS,
    MODELZOO_KEYS_SINCE,
    MODELZOO_ONLY_ABSENT,
    MODELZOO_ONLY_DEFAULTS,
    MOE_DEFAULTS,
    NOT_COMPARED,
    keys_newer_than,
)

FIXTURES = Path(__file__).parent / "fixtures" / "hf_configs"
RUN_CONFIG_KEYS = {"name", "loss_scaling", "loss_weight"}  # read by modelzoo_ext.run_config.params


def real_config(model: str) -> dict:
    return json.loads((FIXTURES / f"{model}.config.json").read_text())


def llama31_section() -> dict:
    """The model section `convert hf-to-cs` writes for Llama-3.1-8B (accepted as it is)."""
    return hf_to_cs_model_config(real_config("Llama-3.1-8B"), "llama")


def modelzoo_config_classes():
    from cerebras.modelzoo.models.nlp.llama.model import LlamaModelConfig
    from cerebras.modelzoo.models.nlp.mistral.model import MistralModelConfig

    return {"llama": LlamaModelConfig, "mistral": MistralModelConfig}


def newer_than_installed() -> set[str]:
    """Table keys the installed ModelZoo release does not have (`moe.` keys with their prefix)."""
    from importlib.metadata import version

    return keys_newer_than(version("cerebras_modelzoo"))


def yaml_name(field_name: str) -> str:
    """The name the check reads a ModelZoo field under (its alias where ModelZoo has one)."""
    return MODELZOO_ALIASES.get(field_name, field_name)


# ----------------------------------------------------------------------------- against ModelZoo
@pytest.mark.modelzoo
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_modelzoo_defaults_equal_modelzoo_config_class_defaults(family):
    """MODELZOO_DEFAULTS and MODELZOO_ONLY_DEFAULTS are ModelZoo 2.10's field defaults, value for value."""
    fields = {yaml_name(name): f for name, f in modelzoo_config_classes()[family].model_fields.items()}
    for table in (MODELZOO_DEFAULTS, MODELZOO_ONLY_DEFAULTS):
        for key, ours in table.items():
            if key in newer_than_installed():
                continue
            assert key in fields, f"{key} is not a field of ModelZoo's {family} config"
            theirs = fields[key].get_default(call_default_factory=True)
            assert theirs == ours and type(theirs) is type(ours), (key, theirs, ours)


@pytest.mark.modelzoo
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_every_modelzoo_key_is_in_exactly_one_table(family):
    """A key ModelZoo adds (or this package forgets) fails here instead of passing the check unseen."""
    hf_map = set(hf_to_cs_model_config(real_config("Mistral-7B-v0.1"), "mistral")) | {"attention_inner_dim"}
    compared = hf_map | set(MODELZOO_DEFAULTS)
    tables = {
        "compared with config.json": compared - set(NOT_COMPARED),
        "compared with ModelZoo's default": set(MODELZOO_ONLY_DEFAULTS),
        "must be absent": set(MODELZOO_ONLY_ABSENT),
        "not compared": {k for k in NOT_COMPARED if not k.startswith("moe.")} - RUN_CONFIG_KEYS,
        "run config": RUN_CONFIG_KEYS,
    }
    names = {yaml_name(name) for name in modelzoo_config_classes()[family].model_fields}
    for key in names:
        holders = [table for table, keys in tables.items() if key in keys]
        assert len(holders) == 1, (key, holders)
    # no table names a key ModelZoo does not have, except those of later releases, which are
    # exactly the ones this release lacks
    assert set().union(*tables.values()) - names == {
        k for k in newer_than_installed() if not k.startswith("moe.")
    }


@pytest.mark.modelzoo
def test_every_modelzoo_moe_key_is_compared_or_skipped_with_a_reason():
    """Mixtral's `moe:` block: each key of ModelZoo's MoEConfig is compared (what HF Mixtral fixes,
    or a key of the HF map) or not compared with its reason, never unseen; `MOE_DEFAULTS` is the
    whole block's defaults (what the record fills in for keys left out)."""
    from cerebras.modelzoo.layers.FeedForwardNetwork import MoEConfig

    fields = MoEConfig.model_fields
    skipped = {k.removeprefix("moe.") for k in NOT_COMPARED if k.startswith("moe.")}
    hf_map = set(hf_to_cs_model_config(real_config("Mixtral-8x7B-v0.1"), "mixtral")["moe"])
    later = {k.removeprefix("moe.") for k in newer_than_installed() if k.startswith("moe.")}
    compared = (set(MIXTRAL_MOE_FIXED) | hf_map) - skipped
    for name in fields:
        assert name in compared or name in skipped, name
    assert (compared | skipped) - set(fields) <= later
    assert set(MOE_DEFAULTS) - set(fields) == later
    for key, ours in MOE_DEFAULTS.items():
        if key in later:
            continue
        theirs = fields[key].get_default(call_default_factory=True)
        assert theirs == ours, (key, theirs, ours)


def test_what_hf_mixtral_fixes_is_modelzoos_moe_default():
    """Where HF Mixtral fixes a value (MIXTRAL_MOE_FIXED), ModelZoo's default must be it too, or a
    run config that leaves the key out would train another router than the HF model has."""
    for key, value in MIXTRAL_MOE_FIXED.items():
        assert MOE_DEFAULTS[key] == value, key


def test_an_unknown_moe_key_is_refused_and_moe_keys_are_compared_by_name():
    section = hf_to_cs_model_config(real_config("Mixtral-8x7B-v0.1"), "mixtral")
    assert check_architecture(section, real_config("Mixtral-8x7B-v0.1"), "mixtral").ok
    bad = {**section, "moe": {**section["moe"], "top_k": 1, "num_expert": 8}}
    check = check_architecture(bad, real_config("Mixtral-8x7B-v0.1"), "mixtral")
    assert sorted(m.split(":")[0] for m in check.mismatches) == ["moe.num_expert", "moe.top_k"]


def test_keys_newer_than_a_release():
    assert keys_newer_than("2.6.0") == set(MODELZOO_KEYS_SINCE)
    assert keys_newer_than("2.9.3") == set(MODELZOO_KEYS_SINCE) - {"moe.probability_before_ffn"}
    assert keys_newer_than("2.10.0") == set() == keys_newer_than("2.11.0")


@pytest.mark.modelzoo
def test_modelzoo_only_absent_sections_default_to_off():
    from cerebras.modelzoo.models.nlp.llama.model import LlamaModelConfig

    fields = LlamaModelConfig.model_fields
    assert not fields["memory_tokens_config"].get_default(call_default_factory=True).memory_tokens_enabled
    assert fields["moe_params"].get_default(call_default_factory=True).num_experts <= 1


@pytest.mark.modelzoo
@pytest.mark.parametrize(
    "section",
    [
        {"hidden_size": 4096, "num_heads": 32, "position_embedding_type": "rotary"},
        {"hidden_size": 64, "num_heads": 4, "position_embedding_type": "rotary", "attention_inner_dim": 128},
        {"hidden_size": 4096, "num_heads": 32, "position_embedding_type": "rotary", "dropout_rate": 0.0},
        {"hidden_size": 4096, "num_heads": 32, "position_embedding_type": "rotary", "dropout_rate": 0.3},
    ],
)
def test_values_left_out_are_normalised_as_modelzoo_fills_them(section):
    """What the check reads for keys the run config leaves out is what ModelZoo builds: rotary_dim a
    quarter of hidden_size // num_heads, embedding dropout = dropout_rate (its `post_init`)."""
    from cerebras.modelzoo.models.nlp.llama.model import LlamaModelConfig

    config = LlamaModelConfig(name="llama", **section)
    ours = normalise_model_section(section)
    for key, theirs in [("rotary_dim", config.rotary_dim), ("embedding_dropout_rate", config.embd_pdrop),
                        ("attention_dropout_rate", config.attention_dropout_rate)]:  # fmt: skip
        assert ours.values[key] == theirs, key
    assert ours.head_dim * ours.num_heads == (config.attention_inner_dim or config.hidden_size)


# ----------------------------------------------------------------------------- what the tables do
@pytest.mark.parametrize(
    "key, value",
    [
        ("embeddings_scale", 10.0),
        ("attention_logit_softcapping", 30.0),
        ("mup_base_hidden_size", 256),
        ("sliding_window_every_other_decoder_layer", True),
        ("lr_adjustment_groups", {"embedding": {"param_paths": "*embedding*", "scale": 0.1}}),
    ],
)
def test_a_modelzoo_only_key_away_from_its_default_is_refused(key, value):
    check = check_architecture({**llama31_section(), key: value}, real_config("Llama-3.1-8B"), "llama")
    assert len(check.mismatches) == 1 and check.mismatches[0].startswith(f"{key}: run config {value!r}")


def test_a_modelzoo_only_key_at_its_default_is_accepted_and_recorded():
    section = {**llama31_section(), "embeddings_scale": 1.0, "scale_qk_dot_by_d": False}
    check = check_architecture(section, real_config("Llama-3.1-8B"), "llama")
    assert check.ok, check.mismatches
    assert check.as_record()["compared_with_modelzoo_default"] == ["embeddings_scale", "scale_qk_dot_by_d"]


@pytest.mark.parametrize("key", ["moe", "moe_params", "memory_tokens"])
def test_experts_or_memory_tokens_on_a_dense_llama_are_refused(key):
    check = check_architecture(
        {**llama31_section(), key: {"num_experts": 8}}, real_config("Llama-3.1-8B"), "llama"
    )
    assert check.mismatches == [f"{MODELZOO_ALIASES.get(key, key)}: set in the run config, but "
                                f"{MODELZOO_ONLY_ABSENT[MODELZOO_ALIASES.get(key, key)]}: remove it"]  # fmt: skip


def test_an_unknown_key_is_refused():
    check = check_architecture(
        {**llama31_section(), "hiden_size": 4096}, real_config("Llama-3.1-8B"), "llama"
    )
    assert check.mismatches == [
        "hiden_size: not a key of ModelZoo 2.10's llama model config (ModelZoo refuses it too)"
    ]


def test_keys_that_do_not_change_the_computation_are_skipped_with_their_reason():
    section = {**llama31_section(), "attention_softmax_fp32": False, "fold_rope_consts": True, "top_k": 5}
    check = check_architecture(section, real_config("Llama-3.1-8B"), "llama")
    assert check.ok, check.mismatches
    for key in ("attention_softmax_fp32", "fold_rope_consts", "top_k", "max_position_embeddings", "name"):
        assert check.not_compared[key] == NOT_COMPARED[key]


def test_max_position_embeddings_is_compared_under_longrope():
    """longrope's frequencies and attention factor depend on it (in ModelZoo and in transformers)."""
    hf = {**real_config("Llama-3.1-8B"), "max_position_embeddings": 131072,
          "rope_scaling": {"rope_type": "longrope", "factor": 16.0, "original_max_position_embeddings": 8192,
                           "short_factor": [1.0] * 64, "long_factor": [2.0] * 64}}  # fmt: skip
    section = {**hf_to_cs_model_config(hf, "llama"), "max_position_embeddings": 8192}
    check = check_architecture(section, hf, "llama")
    assert check.mismatches == ["max_position_embeddings: run config 8192, HF model 131072"]
    assert check_architecture({**section, "max_position_embeddings": 131072}, hf, "llama").ok


def test_attention_dropout_in_config_json_is_refused():
    hf = {**real_config("Llama-3.1-8B"), "attention_dropout": 0.1}
    check = check_architecture(llama31_section(), hf, "llama")
    assert len(check.mismatches) == 1 and check.mismatches[0].startswith("attention_dropout: HF model 0.1")


def test_aliases_are_read_under_the_yaml_name():
    """ModelZoo accepts `embd_pdrop` for `embedding_dropout_rate`: a non-zero one is still found."""
    section = {k: v for k, v in llama31_section().items() if k != "embedding_dropout_rate"}
    check = check_architecture({**section, "embd_pdrop": 0.1}, real_config("Llama-3.1-8B"), "llama")
    assert check.mismatches == ["embedding_dropout_rate: run config 0.1, HF model 0.0"]


# ----------------------------------------------------------------------------- one setting at a time
def test_trainer_yaml_accessors_change_what_the_validated_config_reads(tmp_path):
    """Each accessor reads or changes the setting where the run config holds it (the validated
    view `load_run_config` gives back the values set)."""
    from modelzoo_ext.run_config import load_run_config
    from modelzoo_ext.run_config import trainer_yaml as rc

    repo = Path(__file__).resolve().parents[1]
    params = rc.load_yaml(repo / "model_configs" / "params_sparse_lora_tiny.yaml")
    assert rc.max_steps(params) == 4 and rc.train_batch_size(params) == 4
    assert rc.model_section(params)["name"] == "sparse_lora_llama"
    rc.set_max_steps(params, 7)
    rc.set_train_batch_size(params, 2)
    rc.set_optimizer(params, {"AdamW": {"lr": 0.5}}, None)
    rc.set_save_initial_checkpoint(params, False)
    rc.set_model_section(params, {**rc.model_section(params), "moe_params": {}})
    rc.train_dataloader(params)["shuffle"] = True
    config = load_run_config(rc.write_yaml(tmp_path / "params.yaml", params))
    assert (config.max_steps, config.init.checkpoint.steps, rc.max_steps(params)) == (7, 7, 7)
    assert config.fit.train_dataloader.batch_size == 2 and config.fit.train_dataloader.shuffle
    assert config.init.optimizer == {"AdamW": {"lr": 0.5}} and config.init.schedulers is None
    assert config.init.checkpoint.save_initial_checkpoint is False
    assert config.model_section.stated["moe"] == {} and config.model_section.spelled_as("moe") == "moe_params"
