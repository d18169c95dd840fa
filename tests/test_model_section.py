"""The `model:` section as ModelZoo reads it (`modelzoo_ext.run_config.model_section`), and the
spelling rule: a key ModelZoo accepts under two names means the same run on both backends.

ModelZoo's config classes accept a field by its alias and by its field name (`populate_by_name`):
`moe` / `moe_params`, `embedding_dropout_rate` / `embd_pdrop`, `memory_tokens` /
`memory_tokens_config`. For each pair of the mirrored list (`MODELZOO_ALIASES`), the reference
trainer runs the same steps to the same losses under either spelling, or refuses both with the
same message; both at once are refused, as ModelZoo refuses them. The `modelzoo` tests hold the
mirrored list and the record to the installed ModelZoo classes.
"""

from __future__ import annotations

import importlib
import json
import warnings
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from gpu_reference.metrics import read_metrics
from gpu_reference.train import train
from modelzoo_ext.errors import UserError
from modelzoo_ext.families import FAMILIES
from modelzoo_ext.name_map import RopeLayout
from modelzoo_ext.run_config import hf_to_cs_model_config, load_run_config, normalise_model_section
from modelzoo_ext.run_config.modelzoo_fields import MODELZOO_ALIASES, MOE_DEFAULTS, keys_newer_than

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "hf_configs"
TINY_PARAMS = {"llama": "params_sparse_lora_tiny.yaml", "mixtral": "params_sparse_lora_tiny_mixtral.yaml"}
MIXTRAL_MOE = {
    "num_experts": 4,
    "top_k": 2,
    "load_balancing_loss_coef": 0.02,
    "moe_implementation": "optimized",
}

# One run per YAML name of the mirrored list: (family, value, the error both spellings get or None).
SPELLING_RUNS = {
    "moe": ("mixtral", MIXTRAL_MOE, None),
    "embedding_dropout_rate": ("llama", 0.0, None),
    "memory_tokens": ("llama", {"memory_tokens_enabled": False}, "memory_tokens: set in the run config"),
}
# Values refused before any run, under either spelling (the message names the key as written).
REFUSED_AT_LOAD = {"embedding_dropout_rate": 0.1}


def real_config(model: str) -> dict:
    return json.loads((FIXTURES / f"{model}.config.json").read_text())


def installed_aliases(config_class) -> dict[str, str]:
    """Field name -> alias of every field the class accepts under two names."""
    return {n: f.alias for n, f in config_class.model_fields.items() if f.alias and f.alias != n}


def stock_config_class(family):
    return getattr(importlib.import_module(family.modelzoo_module), family.modelzoo_config_class)


# ----------------------------------------------------------------------------- the record
@pytest.mark.parametrize("field_name, alias", sorted(MODELZOO_ALIASES.items()))
def test_either_spelling_gives_the_same_record(field_name, alias):
    section = hf_to_cs_model_config(real_config("Mixtral-8x7B-v0.1"), "mixtral")
    value = section.pop(alias, {"memory_tokens_enabled": False} if alias == "memory_tokens" else 0.0)
    by_alias = normalise_model_section({**section, alias: value})
    by_field_name = normalise_model_section({**section, field_name: value})
    assert by_alias.values == by_field_name.values and by_alias.stated == by_field_name.stated
    assert by_field_name.spelled_as(alias) == field_name and by_alias.spelled_as(alias) == alias
    with pytest.raises(UserError, match=f"`{alias}` and `{field_name}` are one ModelZoo setting"):
        normalise_model_section({**section, alias: value, field_name: value}, where="params.yaml")


def test_the_record_derives_the_layout_and_moe_once():
    section = hf_to_cs_model_config(real_config("Mixtral-8x7B-v0.1"), "mixtral")
    moe = section.pop("moe")
    record = normalise_model_section({**section, "moe_params": moe})
    assert (record.num_heads, record.num_kv_heads, record.head_dim, record.rotary_dim) == (32, 8, 128, 128)
    assert (record.num_experts, record.top_k, record.load_balancing_loss_coef) == (8, 2, 0.02)
    assert record.moe == {**MOE_DEFAULTS, **moe}
    expected = RopeLayout(num_heads=32, num_kv_heads=8, head_dim=128, rotary_dim=128, num_experts=8)
    assert RopeLayout.from_cs_config({**section, "moe_params": moe}) == expected
    assert RopeLayout.from_hf_config(real_config("Mixtral-8x7B-v0.1")) == expected


def test_keys_left_out_take_modelzoos_defaults():
    """ModelZoo's defaults and post_init fills: a quarter-head rotary size, one key/value group
    under multi-query attention without `num_kv_groups`, MoEConfig's top_k 1."""
    record = normalise_model_section(
        {
            "hidden_size": 64,
            "num_heads": 4,
            "position_embedding_type": "rotary",
            "attention_module": "multiquery_attention",
            "moe": {"num_experts": 4},
        }  # fmt: skip
    )
    assert (record.head_dim, record.rotary_dim, record.num_kv_heads, record.top_k) == (16, 4, 1, 1)
    assert record.values["embedding_dropout_rate"] == record.values["dropout_rate"] == 0.1


# ----------------------------------------------------------------------------- against ModelZoo
@pytest.mark.modelzoo
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_mirrored_aliases_are_modelzoos(family):
    """Every field ModelZoo's config class of the family accepts under two names is in
    MODELZOO_ALIASES (and nothing else is); the `moe` block's class has no second names."""
    from cerebras.modelzoo.layers.FeedForwardNetwork import MoEConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydantic's schema warning on a ModelZoo field type
        config_class = stock_config_class(FAMILIES[family])
    assert installed_aliases(config_class) == MODELZOO_ALIASES
    assert installed_aliases(MoEConfig) == {}


@pytest.mark.modelzoo
@pytest.mark.parametrize("spelling", ["moe", "moe_params"])
def test_the_record_is_what_modelzoo_builds_under_either_spelling(spelling):
    """ModelZoo's MixtralModelConfig built from the section (with `moe` or `moe_params`): our record
    of the YAML section and of ModelZoo's own `model_dump()` (field names, as the CS model holds
    it) agree with it on every derived number."""
    from cerebras.modelzoo.models.nlp.mixtral.model import MixtralModelConfig

    section = hf_to_cs_model_config(real_config("Mixtral-8x7B-v0.1"), "mixtral")
    section[spelling] = section.pop("moe")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        built = MixtralModelConfig(**section)
    # keys of later releases (filled with the value older releases compute without them) aside
    later = {k.removeprefix("moe.") for k in keys_newer_than(version("cerebras_modelzoo"))}
    for record in (normalise_model_section(section), normalise_model_section(built.model_dump())):
        assert {k: v for k, v in record.moe.items() if k not in later} == built.moe_params.model_dump()
        assert (record.rotary_dim, record.num_experts) == (built.rotary_dim, built.moe_params.num_experts)
        assert record.values["embedding_dropout_rate"] == built.embd_pdrop
    assert RopeLayout.from_cs_config(built.model_dump()) == RopeLayout.from_cs_config(section)


@pytest.mark.modelzoo
def test_modelzoo_refuses_both_spellings_at_once_too():
    from cerebras.modelzoo.models.nlp.llama.model import LlamaModelConfig

    section = {"name": "llama", "hidden_size": 64, "num_heads": 4, "position_embedding_type": "rotary"}
    for field_name, alias in MODELZOO_ALIASES.items():
        value = {} if alias in ("moe", "memory_tokens") else 0.0
        with pytest.raises(ValueError, match=field_name), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            LlamaModelConfig(**section, **{alias: value, field_name: value})


# ----------------------------------------------------------------------------- the same run
@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory, tokenizer_dir):
    """family -> the paths of its tiny assets (HF model, masks, data), built once per family."""
    pytest.importorskip(
        "cerebras.pytorch", reason="the tiny assets include a CS checkpoint (cerebras-pytorch)"
    )
    from modelzoo_ext.study.tiny_assets import make_tiny_assets

    root = tmp_path_factory.mktemp("spelling")
    built: dict[str, dict[str, Path]] = {}

    def get(family: str) -> dict[str, Path]:
        if family not in built:
            built[family] = make_tiny_assets(root / family, family=family, tokenizer_from=tokenizer_dir)
        return built[family]

    return get


def params_with(tiny_assets, family: str, key: str, value, out: Path) -> Path:
    """The tiny run config of `family` (2 steps) with `key: value` in its model section."""
    assets = tiny_assets(family)
    config = yaml.safe_load((REPO / "model_configs" / TINY_PARAMS[family]).read_text())
    model = config["trainer"]["init"]["model"]
    for spelling in (
        key,
        MODELZOO_ALIASES.get(key, key),
        *[k for k, v in MODELZOO_ALIASES.items() if v == key],
    ):
        model.pop(spelling, None)
    model[key] = value
    model["sparse_lora"]["mask_path"] = str(assets["masks"])
    config["trainer"]["fit"]["train_dataloader"]["data_dir"] = str(assets["data"])
    config["trainer"]["init"]["loop"]["max_steps"] = 2
    config["trainer"]["init"]["checkpoint"]["steps"] = 2
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(config))
    return out


def run_losses(params: Path, hf: Path, out: Path) -> list[float] | str:
    """The per-step training losses of the reference trainer, or the message it refused with
    (the params file's own path replaced by `<params>`)."""
    try:
        run = train(params, hf, out, "cpu", progress=False)
    except UserError as exc:
        return str(exc).replace(str(params), "<params>")
    return [row["loss"] for row in read_metrics(run / "metrics.jsonl") if row.get("split") != "eval"]


def test_every_mirrored_alias_has_a_spelling_run():
    assert set(SPELLING_RUNS) == set(MODELZOO_ALIASES.values())


@pytest.mark.parametrize("field_name, alias", sorted(MODELZOO_ALIASES.items()))
def test_both_spellings_give_the_same_run_on_the_reference_trainer(field_name, alias, tiny_assets, tmp_path):
    """Losses equal bit for bit (float32 CPU), or both spellings refused with one message."""
    family, value, refused = SPELLING_RUNS[alias]
    hf = tiny_assets(family)["hf"]
    runs = {
        spelling: run_losses(
            params_with(tiny_assets, family, spelling, value, tmp_path / spelling / "params.yaml"),
            hf,
            tmp_path / spelling / "run",
        )
        for spelling in (alias, field_name)
    }
    assert runs[alias] == runs[field_name], runs
    if refused:
        assert isinstance(runs[alias], str) and refused in runs[alias]
    else:
        assert isinstance(runs[alias], list) and len(runs[alias]) == 2


def test_moe_params_trains_with_the_router_loss(tiny_assets, tmp_path):
    """The bug the record fixed: with `moe_params`, the reference trainer used to leave out
    ModelZoo's load-balancing loss (it read only `moe`), while `cszoo fit` adds it."""
    from gpu_reference.loss import RouterLoss

    params = params_with(tiny_assets, "mixtral", "moe_params", MIXTRAL_MOE, tmp_path / "params.yaml")
    section = load_run_config(params).model_section
    assert RouterLoss.from_model_section(section) == RouterLoss(num_experts=4, top_k=2, coef=0.02)


@pytest.mark.parametrize(
    "field_name, alias", [(f, a) for f, a in MODELZOO_ALIASES.items() if a in REFUSED_AT_LOAD]
)
def test_a_value_refused_is_refused_under_either_spelling(field_name, alias, tiny_assets, tmp_path):
    """One message, naming the key as the run config writes it."""
    messages = {}
    for spelling in (alias, field_name):
        params = params_with(
            tiny_assets, "llama", spelling, REFUSED_AT_LOAD[alias], tmp_path / spelling / "p.yaml"
        )
        with pytest.raises(UserError) as refused:
            load_run_config(params)
        messages[spelling] = str(refused.value).replace(str(params), "<params>")
        assert messages[spelling].startswith(f"{spelling} must be 0")
        assert f"<params>: trainer.init.model.{spelling}]" in messages[spelling]
    assert messages[alias].replace(alias, "<key>") == messages[field_name].replace(field_name, "<key>")


def test_both_spellings_at_once_are_refused_when_the_run_config_is_read(tiny_assets, tmp_path):
    params = params_with(tiny_assets, "mixtral", "moe", MIXTRAL_MOE, tmp_path / "params.yaml")
    config = yaml.safe_load(params.read_text())
    config["trainer"]["init"]["model"]["moe_params"] = MIXTRAL_MOE
    params.write_text(yaml.safe_dump(config))
    with pytest.raises(UserError, match="`moe` and `moe_params` are one ModelZoo setting") as refused:
        load_run_config(params)
    assert "trainer.init.model" in str(refused.value)
