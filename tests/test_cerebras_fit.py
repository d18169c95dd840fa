"""`cszoo fit` of the tiny sparse-LoRA configs on ModelZoo's CPU backend, end to end.

Both modes run as real subprocesses from a temporary copy of the tiny assets: sparse_to_sparse
through the unmodified `cszoo` with the `install-hook` .pth in place, sparse_to_dense through the
`cszoo-sparse-lora` wrapper. The tests then read the checkpoints the Trainer wrote.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import get_cstorch_cpu_backend

pytestmark = pytest.mark.modelzoo

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY_CONFIGS = {
    "sparse_to_sparse": "params_sparse_lora_tiny.yaml",
    "sparse_to_dense": "params_sparse_lora_tiny_s2d.yaml",
}
FIT_TIMEOUT_S = 600


def bigcode_stand_in(folder: Path) -> str | None:
    """ModelZoo imports `bigcode_eval` (GitHub-only) while validating; a stand-in where it is missing.

    Returns a PYTHONPATH entry holding a minimal `bigcode_eval` package (the names ModelZoo's
    BigCode callback imports; using that callback with the stand-in raises), or None.
    """
    if importlib.util.find_spec("bigcode_eval") is not None:
        return None
    package = folder / "bigcode_eval"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text('"""Test stand-in: ModelZoo imports these names at validation."""\n')
    (package / "tasks.py").write_text(
        "ALL_TASKS = []\n\ndef get_task(*args, **kwargs):\n    raise RuntimeError('stand-in')\n"
    )
    (package / "base.py").write_text("class Task:\n    pass\n")
    (package / "evaluator.py").write_text("class Evaluator:\n    pass\n")
    (package / "utils.py").write_text(
        "def update_code_gens(*args, **kwargs):\n    raise RuntimeError('stand-in')\n"
    )
    return str(folder)


def run_env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    stand_in = bigcode_stand_in(tmp / "stand_in")
    if stand_in:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [stand_in, env.get("PYTHONPATH")]))
    return env


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory, tokenizer_dir) -> Path:
    """A folder laid out like the repository root: build/tiny/ assets and model_configs/."""
    from modelzoo_ext.study.tiny_assets import make_tiny_assets

    work = tmp_path_factory.mktemp("tiny_fit")
    make_tiny_assets(work / "build" / "tiny", tokenizer_from=tokenizer_dir)
    shutil.copytree(REPO / "model_configs", work / "model_configs")
    return work


@pytest.fixture(scope="session")
def pth_hook():
    """The `install-hook` .pth in this environment's site-packages for the duration of the session."""
    from modelzoo_ext.cerebras.hook import hook_installed, install_hook, uninstall_hook

    was_installed = hook_installed()
    path = install_hook()
    yield path
    if not was_installed:
        uninstall_hook()


def cszoo_fit(work: Path, command: list[str], config: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*command, "fit", f"model_configs/{config}"],
        cwd=work,
        env=run_env(work),
        capture_output=True,
        text=True,
        timeout=FIT_TIMEOUT_S,
    )


@pytest.fixture(scope="session")
def fit_runs(tiny_workdir, pth_hook) -> dict[str, Path]:
    """mode -> model_dir of a finished `cszoo fit` run (s2s: plain cszoo + .pth; s2d: wrapper)."""
    commands = {"sparse_to_sparse": [str(BIN / "cszoo")], "sparse_to_dense": [str(BIN / "cszoo-sparse-lora")]}
    runs = {}
    for mode, config in TINY_CONFIGS.items():
        result = cszoo_fit(tiny_workdir, commands[mode], config)
        assert (
            result.returncode == 0
        ), f"{mode}: cszoo fit failed\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        params = yaml.safe_load((tiny_workdir / "model_configs" / config).read_text())
        runs[mode] = tiny_workdir / params["trainer"]["init"]["model_dir"]
    return runs


def load_model_state(path: Path) -> dict[str, torch.Tensor]:
    import cerebras.pytorch as cstorch

    return {k: v.clone() for k, v in cstorch.load(str(path))["model"].items()}


def expected_cs_masks(tiny_workdir: Path) -> dict[str, torch.Tensor]:
    """The mask file's masks in CS naming, via the converters' rule table (q/k rows permuted)."""
    from modelzoo_ext.masks.format import load_masks
    from modelzoo_ext.name_map import RopeLayout, to_cs

    section = yaml.safe_load((tiny_workdir / "model_configs" / TINY_CONFIGS["sparse_to_sparse"]).read_text())
    layout = RopeLayout.from_cs_config(section["trainer"]["init"]["model"])
    masks, _ = load_masks(tiny_workdir / "build" / "tiny" / "masks_hf.safetensors")
    return dict(to_cs(name, mask, "llama", layout) for name, mask in masks.items())


@pytest.mark.parametrize("mode", list(TINY_CONFIGS))
def test_checkpoint_masks_frozen_base_and_trained_lora(fit_runs, tiny_workdir, mode):
    from modelzoo_ext.name_map import canonical_cs_names

    run = fit_runs[mode]
    initial = load_model_state(run / "checkpoint_0.mdl")
    final = load_model_state(run / "checkpoint_4.mdl")
    base = load_model_state(tiny_workdir / "build" / "tiny" / "cs" / "model.mdl")
    base = {cs: base[key] for key, cs in canonical_cs_names(base).items()}  # stock layout has no `model.`
    masks = expected_cs_masks(tiny_workdir)
    assert len(masks) == 14

    # A `<param>_mask` for every targeted weight, equal to the mask file, and nothing else masked.
    assert sorted(k for k in final if k.endswith("_mask")) == sorted(f"{name}_mask" for name in masks)
    for name, mask in masks.items():
        assert torch.equal(final[f"{name}_mask"], mask), name
        # Independent of the name map: the pruned base is non-zero exactly on the mask.
        assert torch.equal(final[f"{name}_mask"], base[name] != 0), name

    # Every non-LoRA tensor bit-identical to the initial and to the base checkpoint; zero off the mask.
    frozen = [k for k in final if ".lora_" not in k and not k.endswith("_mask")]
    assert len(frozen) == len(base)
    for name in frozen:
        assert torch.equal(final[name], initial[name]), name
        assert torch.equal(final[name], base[name]), name
    for name, mask in masks.items():
        assert not final[name][~mask].any(), name

    # LoRA factors trained: every B left zero, every A moved.
    lora_b = [k for k in final if k.endswith("lora_B.weight")]
    assert len(lora_b) == 14
    for name in lora_b:
        assert not initial[name].any() and final[name].abs().sum() > 0, name
        a_name = name.replace("lora_B", "lora_A")
        assert not torch.equal(final[a_name], initial[a_name]), a_name


@pytest.mark.parametrize("mode", list(TINY_CONFIGS))
def test_loss_falls_over_repeated_batches(fit_runs, mode):
    from modelzoo_ext.loss_log import LOSS_LOG_NAME

    records = [json.loads(line) for line in (fit_runs[mode] / LOSS_LOG_NAME).read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in records}
    assert sorted(losses) == [1, 2, 3, 4]
    # 8 samples, batch 4, no shuffle: steps 1 and 3 see batch 0, steps 2 and 4 batch 1.
    assert losses[3] < losses[1] and losses[4] < losses[2], losses
    assert all(r["time_s"] > 0 for r in records)


def test_cs_throughput_counts_each_steps_tokens_over_its_time(fit_runs, tiny_workdir):
    """The sweep's CS-3 throughput: the non-padding tokens of every step (from ModelZoo's data order)
    over the total step time the loss log recorded, with the padded tokens the wafer processed."""
    from modelzoo_ext.data.hdf5 import SampleDataset
    from modelzoo_ext.loss_log import LOSS_LOG_NAME
    from modelzoo_ext.study.throughput import cs_throughput

    run = fit_runs["sparse_to_sparse"]
    params = yaml.safe_load((tiny_workdir / "model_configs" / TINY_CONFIGS["sparse_to_sparse"]).read_text())
    loader = params["trainer"]["fit"]["train_dataloader"]
    assert loader["batch_size"] == 4 and not loader.get("shuffle")  # steps 1, 3: samples 0-3; 2, 4: 4-7
    data = SampleDataset(tiny_workdir / loader["data_dir"])
    tokens = [
        sum(int(data[i][1].nonzero()[0].max()) + 1 for i in range(start, start + 4)) for start in (0, 4)
    ]
    times = {r["step"]: r["time_s"] for r in map(json.loads, (run / LOSS_LOG_NAME).read_text().splitlines())}
    params["trainer"]["fit"]["train_dataloader"]["data_dir"] = str(tiny_workdir / loader["data_dir"])
    throughput = cs_throughput(run, params)
    assert throughput["tokens"] == 2 * (tokens[0] + tokens[1]) and throughput["samples"] == 16
    assert throughput["seconds"] == pytest.approx(sum(times[s] for s in (1, 2, 3, 4)), rel=1e-12)
    assert throughput["tokens_per_s"] == pytest.approx(
        throughput["tokens"] / throughput["seconds"], rel=1e-12
    )
    assert throughput["padded_tokens"] == 16 * data[0].shape[-1]


def test_s2s_merged_export_has_no_violations_and_same_logits(fit_runs, tiny_workdir):
    """Merge the trained s2s model: exactly zero off the mask, and the same logits (within 1e-5)."""
    from modelzoo_ext.cerebras.config import SparseLoRALlamaModelConfig
    from modelzoo_ext.cerebras.model import SparseLoRALlamaModel
    from modelzoo_ext.sparse_lora import check_sparsity, merge_sparse_lora_

    section = yaml.safe_load((tiny_workdir / "model_configs" / TINY_CONFIGS["sparse_to_sparse"]).read_text())
    section = section["trainer"]["init"]["model"]
    section["sparse_lora"]["mask_path"] = str(tiny_workdir / section["sparse_lora"]["mask_path"])
    trained = load_model_state(fit_runs["sparse_to_sparse"] / "checkpoint_4.mdl")
    masks = expected_cs_masks(tiny_workdir)

    get_cstorch_cpu_backend()
    model = SparseLoRALlamaModel(SparseLoRALlamaModelConfig(**section)).eval()
    missing, unexpected = model.load_state_dict(
        {k: v for k, v in trained.items() if not k.endswith("_mask")}, strict=False
    )
    assert not missing and not unexpected
    # The checkpoint's base weights are already zero off the mask (test above), which is what the
    # cstorch pre-forward hook would enforce; the layers do not re-mask W themselves.
    ids = torch.randint(0, 32000, (2, 16), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    with torch.no_grad():
        logits_trained = model.model(input_ids=ids)
        report = merge_sparse_lora_(model)
        logits_merged = model.model(input_ids=ids)

    assert len(report.merged) == 14
    sparsity = check_sparsity(model.state_dict(), masks)
    assert sparsity.ok and sparsity.matched == 14 and sparsity.total_violations == 0
    assert (logits_merged - logits_trained).abs().max().item() <= 1e-5
    # The update is real: merged weights differ from the base on the mask.
    base_q = trained["model.transformer_decoder.layers.0.self_attn.proj_q_dense_layer.weight"]
    assert not torch.equal(
        model.state_dict()["model.transformer_decoder.layers.0.self_attn.proj_q_dense_layer.weight"], base_q
    )


@pytest.mark.slow
def test_cszoo_fit_rejects_bad_mask_file_before_training(tiny_workdir, tmp_path):
    """A mask file for another model fails at setup with the offending names; no checkpoint is written."""
    from modelzoo_ext.masks.format import load_masks, save_masks

    masks, meta = load_masks(tiny_workdir / "build" / "tiny" / "masks_hf.safetensors")
    masks["model.layers.7.self_attn.q_proj.weight"] = masks["model.layers.0.self_attn.q_proj.weight"]
    bad = tmp_path / "bad_masks.safetensors"
    save_masks(bad, masks, naming="hf")
    params = yaml.safe_load((tiny_workdir / "model_configs" / TINY_CONFIGS["sparse_to_dense"]).read_text())
    params["trainer"]["init"]["model"]["sparse_lora"]["mask_path"] = str(bad)
    params["trainer"]["init"]["model_dir"] = str(tmp_path / "run")
    (tiny_workdir / "model_configs" / "bad.yaml").write_text(yaml.safe_dump(params))

    result = cszoo_fit(tiny_workdir, [str(BIN / "cszoo-sparse-lora")], "bad.yaml")
    assert result.returncode != 0
    assert "model.transformer_decoder.layers.7.self_attn.proj_q_dense_layer.weight" in result.stderr
    assert not list((tmp_path / "run").glob("checkpoint_*.mdl"))


def data_dirs(node) -> list[str]:
    """Every `data_dir` value in a trainer YAML."""
    if isinstance(node, dict):
        found = [v for k, v in node.items() if k == "data_dir" and isinstance(v, str)]
        return found + [d for v in node.values() for d in data_dirs(v)]
    if isinstance(node, list):
        return [d for v in node for d in data_dirs(v)]
    return []


def test_every_model_config_passes_modelzoo_validation(tmp_path):
    """ModelZoo's own validation (what `cszoo fit` runs first) accepts every YAML in model_configs/.

    ModelZoo checks that data directories exist, so empty ones are made under a scratch folder.
    """
    configs = sorted((REPO / "model_configs").glob("*.yaml"))
    assert len(configs) >= 4
    for config in configs:
        for folder in data_dirs(yaml.safe_load(config.read_text())):
            (tmp_path / folder).mkdir(parents=True, exist_ok=True)
    code = (
        "import sys, yaml, modelzoo_ext.cerebras  # registers the sparse_lora models\n"
        "from cerebras.modelzoo.trainer.validate import validate_trainer_params\n"
        "for path in sys.argv[1:]:\n"
        "    init = validate_trainer_params(yaml.safe_load(open(path)))[0].init\n"
        "    callbacks = [type(c).__name__ for c in init.callbacks]\n"
        "    print(path.rsplit('/', 1)[-1], init.model.config.name, init.model.config.sparse_lora.mode,\n"
        "          'SparseLoRAMasks' in callbacks, init.sparsity)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, *map(str, configs)],
        cwd=tmp_path,
        env=run_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=FIT_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == len(configs)
    for line in lines:
        name, model, mode, has_callback, sparsity = line.split()
        assert model in ("sparse_lora_llama", "sparse_lora_mistral", "sparse_lora_mixtral"), line
        assert mode in ("sparse_to_dense", "sparse_to_sparse") and has_callback == "True", line
        assert sparsity == "None", line  # never the YAML `sparsity:` section (it breaks frozen weights)
