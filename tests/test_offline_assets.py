"""The offline assets' environment: off the hub by default, the user's own setting kept."""

from __future__ import annotations

import os

import pytest

from modelzoo_ext.errors import UserError
from modelzoo_ext.offline_assets import asset_path, prefer_offline_environment


def test_offline_by_default_and_a_user_setting_wins(monkeypatch):
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # a user with a hub
    prefer_offline_environment()
    assert os.environ["HF_HUB_OFFLINE"] == "0"
    assert os.environ["HF_DATASETS_OFFLINE"] == "1"
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"


def test_unknown_asset_names_the_known_ones():
    with pytest.raises(UserError, match="unknown offline asset 'llama'") as err:
        asset_path("llama")
    assert "boolq_validation" in str(err.value)
