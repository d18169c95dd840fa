"""The family table (`modelzoo_ext.families`): each family's traits are those of its transformers
config class, and the ModelZoo names it carries exist in the installed ModelZoo.

Code asks a family's traits instead of its name, so a wrong trait would silently treat a family
as another; these tests hold the traits to the real classes.
"""

from __future__ import annotations

import importlib
import warnings

import pytest
from conftest import skip_mixtral_on_transformers_5
from transformers import AutoConfig

from modelzoo_ext.families import FAMILIES
from modelzoo_ext.tiny_models import tiny_config


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_traits_are_those_of_the_transformers_config(name):
    family = FAMILIES[name]
    config = AutoConfig.for_model(family.hf_model_type)
    assert config.architectures is None or family.hf_architecture in config.architectures
    assert family.sliding_window == hasattr(config, "sliding_window")
    assert family.hf_mlp_bias == hasattr(config, "mlp_bias")
    assert family.has_experts == hasattr(config, "num_local_experts")
    tiny = tiny_config(name)
    assert tiny.model_type == family.hf_model_type
    assert getattr(tiny, "sliding_window", None) is None  # the tiny models attend without a window


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_the_rule_table_maps_every_tensor_of_the_tiny_model(name):
    """Every parameter of the family's transformers model matches exactly one rule."""
    skip_mixtral_on_transformers_5(name)  # its in-memory layout there is not the checkpoints'
    import re

    import torch
    from transformers import AutoModelForCausalLM

    family = FAMILIES[name]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config(name))
    patterns = [
        re.compile(re.sub(r"\\\{\w+\\\}", r"\\d+", re.escape(r.hf)) + r"\.(weight|bias)")
        for r in family.rules
    ]
    for param in model.state_dict():
        if "rotary_emb" in param:
            continue
        matched = [p.pattern for p in patterns if p.fullmatch(param)]
        assert len(matched) == 1, (param, matched)


@pytest.mark.modelzoo
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_modelzoo_names_exist_and_experts_match_modelzoos_config(name):
    family = FAMILIES[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydantic's schema warning on a ModelZoo field type
        module = importlib.import_module(family.modelzoo_module)
        converter_module, _, converter = family.modelzoo_config_converter.rpartition(".")
        assert hasattr(importlib.import_module(converter_module), converter)
    assert hasattr(module, family.modelzoo_class)
    config_class = getattr(module, family.modelzoo_config_class)
    assert family.modelzoo_model in config_class.model_fields["name"].annotation.__args__
