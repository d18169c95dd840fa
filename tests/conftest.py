"""Shared fixtures and the marker policy.

Markers (declared in pyproject.toml):
- `modelzoo`: needs Cerebras ModelZoo (`cerebras.modelzoo`) importable; skipped with the reason.
- `cs`: needs cerebras-pytorch; skipped with the reason.
- `gpu`: needs CUDA; skipped otherwise.
- `slow`: excluded from `make test`, run by `make test-slow`.
- `slurm`: needs a real SLURM cluster: the `slurm_cluster` fixture reuses the one SLURM_CONF names
  or starts one with scripts/slurm_local_cluster.sh, and skips with the reason where it cannot.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

# Two cores are shared by everything on the test machines: keep torch from oversubscribing.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


HAS_MODELZOO = _has_module("cerebras.modelzoo")
HAS_CSTORCH = _has_module("cerebras.pytorch")
HAS_CUDA = torch.cuda.is_available()

SKIP_REASONS = {
    "modelzoo": (
        not HAS_MODELZOO,
        "Cerebras ModelZoo (cerebras.modelzoo) is not installed in this environment; "
        "install Release_2.10.0 editable to run it (README: 'Testing against ModelZoo')",
    ),
    "cs": (not HAS_CSTORCH, "cerebras-pytorch is not installed (install the `cs` extra)"),
    "gpu": (not HAS_CUDA, "no CUDA device"),
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        for marker, (skip, reason) in SKIP_REASONS.items():
            if skip and item.get_closest_marker(marker):
                item.add_marker(pytest.mark.skip(reason=reason))


SLURM_CLUSTER_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "slurm_local_cluster.sh"


def _slurm_answers(conf: str | None) -> bool:
    if not conf or not shutil.which("scontrol"):
        return False
    env = {**os.environ, "SLURM_CONF": conf}
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, env=env, timeout=30)
    return ping.returncode == 0 and "is UP" in ping.stdout


@pytest.fixture(scope="session")
def slurm_cluster() -> str:
    """The slurm.conf of a reachable cluster, exported as SLURM_CONF for the session: the one
    SLURM_CONF already names (e.g. started by .ci/run), else one started (or reused) by
    scripts/slurm_local_cluster.sh. Skips with the script's reason where none can run."""
    conf = os.environ.get("SLURM_CONF")
    if not _slurm_answers(conf):
        started = subprocess.run(
            [str(SLURM_CLUSTER_SCRIPT), "start"], capture_output=True, text=True, timeout=600
        )
        if started.returncode != 0:
            reason = (started.stderr.strip().splitlines() or ["no reason given"])[-1]
            pytest.skip(f"no SLURM cluster: {reason}")
        conf = started.stdout.strip().splitlines()[-1]
    os.environ["SLURM_CONF"] = conf
    return conf


def task_summary(states: dict) -> dict[str, dict[str, str]]:
    """{run: {stage: state}} of a sweep's scheduler tasks (`task_states`), as `sweep status` names them."""
    return {run: {stage: t.state.describe() for stage, t in stages.items()} for run, stages in states.items()}


def all_tasks_ended(states: dict) -> bool:
    """No task of the sweep is queued or running any more."""
    return not any(t.state.active for stages in states.values() for t in stages.values())


def wait_for_tasks(sweep: Path, until, what: str, timeout_s: float, poll_s: float = 0.5) -> dict:
    """Poll the scheduler until `until(task_states(sweep))` holds; those states, or an
    AssertionError naming `what` and every task's state after `timeout_s`."""
    from modelzoo_ext.study.cluster.submit import task_states

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        states = task_states(sweep)
        if until(states):
            return states
        time.sleep(poll_s)
    raise AssertionError(f"timed out waiting for {what}: {task_summary(task_states(sweep))}")


def get_cstorch_cpu_backend():
    """The process's cerebras-pytorch CPU backend: cstorch allows one backend per process, so
    every test that needs one shares it."""
    import cerebras.pytorch as cstorch
    from cerebras.pytorch.backend import current_backend

    return current_backend(raise_exception=False, raise_warning=False) or cstorch.backend("CPU")


@pytest.fixture
def cstorch_cpu_backend():
    """`get_cstorch_cpu_backend()` as a fixture."""
    return get_cstorch_cpu_backend()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The Mistral v1 tokenizer saved once per session."""
    from modelzoo_ext.tiny_models import save_tokenizer

    return save_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_mixtral_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny random Mixtral (4 experts, top-2, 2 layers, GQA) in shards of ~300 KB."""
    from modelzoo_ext.tiny_models import save_tiny_model

    return save_tiny_model(
        tmp_path_factory.mktemp("tiny_mixtral"), "mixtral", seed=0, tokenizer_from=tokenizer_dir,
        max_shard_size="300KB",
    )  # fmt: skip


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny random Llama (2 layers, hidden 64, GQA 4/2 heads) saved as one safetensors file."""
    from modelzoo_ext.tiny_models import save_tiny_model

    return save_tiny_model(
        tmp_path_factory.mktemp("tiny_llama"), "llama", seed=0, tokenizer_from=tokenizer_dir
    )


@pytest.fixture(scope="session")
def tiny_mistral_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny random Mistral (same shape as the Llama one) saved as one safetensors file."""
    from modelzoo_ext.tiny_models import save_tiny_model

    return save_tiny_model(
        tmp_path_factory.mktemp("tiny_mistral"), "mistral", seed=1, tokenizer_from=tokenizer_dir
    )


@pytest.fixture(scope="session")
def tiny_llama_sharded_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """The tiny Llama saved as several shards with a `model.safetensors.index.json`."""
    from modelzoo_ext.tiny_models import save_tiny_model

    return save_tiny_model(
        tmp_path_factory.mktemp("tiny_llama_sharded"),
        "llama",
        seed=0,
        tokenizer_from=tokenizer_dir,
        max_shard_size="2MB",
    )


def transformers_major() -> int:
    """The installed transformers' major version (5 fuses Mixtral's experts and renames its MoE block)."""
    import transformers

    return int(transformers.__version__.split(".")[0])


# Mixtral with per-expert nn.Linear experts (w1/w2/w3): transformers 4.x only; the reference trainer
# refuses Mixtral on 5 (docs/gpu_reference.md), so what reads its layout through transformers skips there.
MIXTRAL_ON_TRANSFORMERS_5 = (
    "transformers >= 5 fuses Mixtral's experts (the reference trainer refuses it there)"
)


def skip_mixtral_on_transformers_5(family: str) -> None:
    """Skip a Mixtral case where transformers lays its experts out fused (5.x)."""
    if "mixtral" in family and transformers_major() >= 5:
        pytest.skip(MIXTRAL_ON_TRANSFORMERS_5)
