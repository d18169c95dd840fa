"""The ModelZoo-facing pieces without a `cszoo fit`: import cost, the hook, registration, the model
config, setup-time errors, the LoRA init shared with the GPU path, and the mask-file sparsity
algorithm on the real cerebras-pytorch CPU backend."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import get_cstorch_cpu_backend
from torch import nn

REPO = Path(__file__).resolve().parents[1]
LLAMA_SECTION = {  # the `model:` section of the tiny configs (tiny_models.tiny_config("llama"))
    "vocab_size": 32000, "hidden_size": 64, "filter_size": 128, "num_hidden_layers": 2, "num_heads": 4,
    "attention_module": "multiquery_attention", "extra_attention_params": {"num_kv_groups": 2},
    "max_position_embeddings": 256, "position_embedding_type": "rotary", "rotary_dim": 16,
    "rope_theta": 10000.0, "nonlinearity": "swiglu", "norm_type": "rmsnorm", "layer_norm_epsilon": 1e-5,
    "share_embedding_weights": False, "use_bias_in_output": False, "use_ffn_bias": False,
    "use_ffn_bias_in_attention": False, "use_projection_bias_in_attention": False,
    "embedding_dropout_rate": 0.0, "dropout_rate": 0.0, "attention_dropout_rate": 0.0,
}  # fmt: skip
HF_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def random_masks(shapes: dict[str, tuple[int, int]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.rand(shape, generator=g) < 0.5 for name, shape in shapes.items()}


def tiny_hf_shapes() -> dict[str, tuple[int, int]]:
    per_layer = {
        "self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64), "self_attn.v_proj": (32, 64),
        "self_attn.o_proj": (64, 64), "mlp.gate_proj": (128, 64), "mlp.up_proj": (128, 64),
        "mlp.down_proj": (64, 128),
    }  # fmt: skip
    return {f"model.layers.{i}.{m}.weight": s for i in range(2) for m, s in per_layer.items()}


# ----------------------------------------------------------------------------- import cost, hook


def test_import_modelzoo_ext_imports_neither_torch_nor_modelzoo():
    result = python(
        "import sys, modelzoo_ext\n"
        "from modelzoo_ext.cerebras.autoregister import ModelZooImportWatcher, install\n"
        "install(); install()\n"
        "heavy = [m for m in ('torch', 'cerebras', 'cerebras.modelzoo', 'numpy') if m in sys.modules]\n"
        "watchers = sum(isinstance(f, ModelZooImportWatcher) for f in sys.meta_path)\n"
        "print(heavy, watchers)"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[0] == "[] 1"


def test_install_hook_writes_a_pth_that_imports_the_package(tmp_path):
    from modelzoo_ext.cerebras.hook import PTH_NAME, hook_installed
    from modelzoo_ext.cli import main

    assert main(["install-hook", "--site-dir", str(tmp_path)]) == 0
    assert hook_installed(tmp_path) and (tmp_path / PTH_NAME).read_text().count("\n") == 1
    # site.py processes .pth files of site dirs exactly like this at interpreter start.
    result = python(
        f"import site, sys; site.addsitedir({str(tmp_path)!r}); print('modelzoo_ext' in sys.modules)"
    )
    assert result.returncode == 0 and result.stdout.strip() == "True", result.stderr
    assert main(["install-hook", "--uninstall", "--site-dir", str(tmp_path)]) == 0
    assert not (tmp_path / PTH_NAME).exists()


def test_install_hook_into_missing_folder_exits_2(tmp_path, capsys):
    from modelzoo_ext.cli import main

    assert main(["install-hook", "--site-dir", str(tmp_path / "nope")]) == 2
    assert "site-packages folder not found" in capsys.readouterr().err
    assert not (tmp_path / "nope").exists()


# ----------------------------------------------------------------------------- registration


@pytest.mark.modelzoo
@pytest.mark.parametrize("order", ["modelzoo_ext first", "ModelZoo first"])
def test_registration_happens_whichever_is_imported_first(order):
    imports = ["import modelzoo_ext.cerebras", "from cerebras.modelzoo.registry import registry"]
    if order == "ModelZoo first":
        imports.reverse()
    result = python(
        "\n".join(imports) + "\n"
        "from cerebras.modelzoo.registry import registry\n"
        "from modelzoo_ext.cerebras.registration import register_all\n"
        "register_all(); register_all()  # idempotent\n"
        "names = registry.get_model_names()\n"
        "print(names.count('sparse_lora_llama'), names.count('sparse_lora_mistral'), names.count('sparse_lora_mixtral'))\n"
        "print(registry.get_model_class('sparse_lora_mistral').__name__)\n"
        "print(sorted(registry.get_data_processor_names('sparse_lora_llama')))"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "1 1 1"
    assert lines[1] == "SparseLoRAMistralModel"
    assert lines[2] == "['GptHDF5DataProcessor', 'GptHDF5MapDataProcessor']"


@pytest.mark.modelzoo
def test_callback_and_algorithm_are_visible_to_validation_after_trainer_import():
    result = python(
        "import modelzoo_ext.cerebras, cerebras.modelzoo.trainer\n"
        "import cerebras.pytorch as cstorch\n"
        "from cerebras.appliance.utils.classes import retrieve_all_subclasses\n"
        "from cerebras.modelzoo.trainer.callbacks import Callback\n"
        "print(sorted(c.__name__ for c in retrieve_all_subclasses(Callback) if c.__module__.startswith('modelzoo_ext')))\n"
        "print([c.__name__ for c in retrieve_all_subclasses(cstorch.sparse.SparsityAlgorithm) if c.__module__.startswith('modelzoo_ext')])"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines() == [
        "['SparseLoRALossLog', 'SparseLoRAMasks']",
        "['MaskFileSparsity']",
    ]


# ----------------------------------------------------------------------------- config


def model_config(family: str = "llama", **sparse_lora):
    from modelzoo_ext.cerebras.config import SparseLoRALlamaModelConfig, SparseLoRAMistralModelConfig

    cls = SparseLoRALlamaModelConfig if family == "llama" else SparseLoRAMistralModelConfig
    block = {
        "mode": "sparse_to_sparse",
        "r": 4,
        "alpha": 8.0,
        "mask_path": "masks.safetensors",
        **sparse_lora,
    }
    return cls(name=f"sparse_lora_{family}", sparse_lora=block, **LLAMA_SECTION)


@pytest.mark.modelzoo
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_model_config_holds_the_family_config_plus_sparse_lora(family):
    config = model_config(family)
    assert config.family == family and config.hidden_size == 64
    assert config.sparse_lora.mode == "sparse_to_sparse" and config.sparse_lora.scaling == 2.0


@pytest.mark.modelzoo
@pytest.mark.parametrize(
    "bad, message",
    [
        ({"mode": "sparse_to_sometimes"}, "sparse_to_sometimes"),
        ({"mask_path": None}, "mask_path is required"),
        ({"rank": 8}, "rank"),
        ({"target_modules": ["q_proj", "qkv_proj"]}, "qkv_proj"),
    ],
)
def test_model_config_rejects_bad_sparse_lora_blocks(bad, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        model_config(**bad)


@pytest.mark.modelzoo
def test_model_config_rejects_unknown_model_keys():
    from pydantic import ValidationError

    from modelzoo_ext.cerebras.config import SparseLoRALlamaModelConfig

    with pytest.raises(ValidationError, match="hidden_sise"):
        SparseLoRALlamaModelConfig(
            name="sparse_lora_llama",
            sparse_lora={"mode": "sparse_to_dense", "mask_path": "m"},
            hidden_sise=3,
            **LLAMA_SECTION,
        )


# ----------------------------------------------------------------------------- model setup


def write_hf_masks(path: Path, masks: dict[str, torch.Tensor]) -> Path:
    from modelzoo_ext.masks.format import save_masks

    save_masks(path, masks, naming="hf")
    return path


@pytest.fixture
def hf_masks() -> dict[str, torch.Tensor]:
    return random_masks(tiny_hf_shapes())


def build_model(mask_path: Path, family: str = "llama", **sparse_lora):
    from modelzoo_ext.cerebras.model import SparseLoRALlamaModel, SparseLoRAMistralModel

    get_cstorch_cpu_backend()
    config = model_config(family, mask_path=str(mask_path), **sparse_lora)
    return (SparseLoRALlamaModel if family == "llama" else SparseLoRAMistralModel)(config)


@pytest.mark.modelzoo
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_model_targets_by_attribute_name_freezes_base_and_seeds_lora_a_like_hf(tmp_path, hf_masks, family):
    """Only the 14 targeted linears get LoRA; A equals the GPU path's A for the same HF module."""
    from transformers import AutoModelForCausalLM

    from modelzoo_ext.sparse_lora import SparseLoRAConfig, apply_sparse_lora_, sparse_lora_layers
    from modelzoo_ext.tiny_models import tiny_config

    model = build_model(write_hf_masks(tmp_path / "m.safetensors", hf_masks), family)
    layers = sparse_lora_layers(model)
    assert len(layers) == 14
    assert {name.rsplit(".", 1)[-1] for name in layers} == {
        "proj_q_dense_layer", "proj_k_dense_layer", "proj_v_dense_layer", "proj_output_dense_layer",
        "linear_layer", "linear_layer_for_glu",
    }  # fmt: skip
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{name}.lora_{ab}.weight" for name in layers for ab in "AB"}

    hf = AutoModelForCausalLM.from_config(tiny_config(family))
    apply_sparse_lora_(hf, SparseLoRAConfig(mode="sparse_to_sparse", r=4, alpha=8.0, mask_path="m"), hf_masks)
    hf_layers = sparse_lora_layers(hf)
    for cs_name, layer in layers.items():
        assert torch.equal(
            layer.lora_A.weight, hf_layers[model.hf_module_name(cs_name)].lora_A.weight
        ), cs_name


@pytest.mark.modelzoo
def test_model_masks_are_the_hf_masks_with_q_k_rows_permuted(tmp_path, hf_masks):
    from modelzoo_ext.name_map import permute_rows_hf_to_cs
    from modelzoo_ext.sparse_lora import sparse_lora_layers

    layers = sparse_lora_layers(build_model(write_hf_masks(tmp_path / "m.safetensors", hf_masks)))
    prefix = "model.transformer_decoder.layers.1."
    q = hf_masks["model.layers.1.self_attn.q_proj.weight"]
    k = hf_masks["model.layers.1.self_attn.k_proj.weight"]
    assert torch.equal(layers[prefix + "self_attn.proj_q_dense_layer"].mask, permute_rows_hf_to_cs(q, 4, 16))
    assert torch.equal(layers[prefix + "self_attn.proj_k_dense_layer"].mask, permute_rows_hf_to_cs(k, 2, 16))
    assert not torch.equal(permute_rows_hf_to_cs(q, 4, 16), q)  # the permutation is not a no-op here
    v = hf_masks["model.layers.1.self_attn.v_proj.weight"]
    assert torch.equal(layers[prefix + "self_attn.proj_v_dense_layer"].mask, v)


@pytest.mark.modelzoo
def test_setup_errors_name_the_offending_tensors(tmp_path, hf_masks):
    from modelzoo_ext.errors import UserError

    extra = dict(hf_masks, **{"model.layers.5.mlp.up_proj.weight": torch.ones(128, 64, dtype=torch.bool)})
    with pytest.raises(
        UserError, match=r"masks with no targeted nn.Linear.*layers\.5\.ffn\.ffn\.0\.linear_layer\.weight"
    ):
        build_model(write_hf_masks(tmp_path / "extra.safetensors", extra))

    missing = {k: v for k, v in hf_masks.items() if "layers.1.mlp.down_proj" not in k}
    with pytest.raises(
        UserError, match=r"targeted layers without a mask.*layers\.1\.ffn\.ffn\.1\.linear_layer\.weight"
    ):
        build_model(write_hf_masks(tmp_path / "missing.safetensors", missing))

    wrong = dict(hf_masks, **{"model.layers.0.self_attn.v_proj.weight": torch.ones(64, 64, dtype=torch.bool)})
    with pytest.raises(UserError, match=r"mismatch.*layers\.0\.self_attn\.proj_v_dense_layer\.weight"):
        build_model(write_hf_masks(tmp_path / "wrong.safetensors", wrong))

    with pytest.raises(UserError, match="mask_path does not exist"):
        build_model(tmp_path / "absent.safetensors")


@pytest.mark.modelzoo
def test_model_refuses_to_run_before_the_masks_callback(tmp_path, hf_masks):
    from modelzoo_ext.errors import UserError

    model = build_model(write_hf_masks(tmp_path / "m.safetensors", hf_masks))
    batch = {k: torch.ones(1, 8, dtype=torch.int32) for k in ("input_ids", "attention_mask", "labels")}
    with pytest.raises(UserError, match="SparseLoRAMasks"):
        model(batch)


@pytest.mark.modelzoo
def test_masks_callback_makes_cstorch_sparse_params_and_model_trains_the_design_math(tmp_path, hf_masks):
    """Callback setup -> every targeted weight a cstorch sparse parameter; forward zeroes W off the
    mask; each layer then computes the s2s math of design.md with a non-zero B."""
    from types import SimpleNamespace

    from modelzoo_ext.cerebras.callbacks import SparseLoRAMasks
    from modelzoo_ext.sparse_lora import sparse_lora_layers

    model = build_model(write_hf_masks(tmp_path / "m.safetensors", hf_masks))
    logs = []
    callback = SparseLoRAMasks()
    callback.setup(SimpleNamespace(model=model, logger=SimpleNamespace(info=logs.append)))
    callback.sparsity.initialize()
    assert model.masks_applied and "14 weights masked" in logs[0]
    layers = sparse_lora_layers(model)
    with torch.no_grad():
        for layer in layers.values():
            layer.weight.add_(1.0)  # dense weights: the cstorch hook must zero them off the mask
            layer.lora_B.weight.normal_()
    batch = {k: torch.randint(1, 100, (2, 8), dtype=torch.int32) for k in ("input_ids", "labels")}
    batch["attention_mask"] = torch.ones(2, 8, dtype=torch.int32)
    loss = model(batch)
    loss.backward()
    state = model.state_dict()
    for name, layer in layers.items():
        assert torch.equal(state[f"{name}.weight_mask"], layer.mask), name
        assert not layer.weight[~layer.mask].any(), name
        assert layer.lora_B.weight.grad is not None and layer.weight.grad is None
        x = torch.randn(3, layer.in_features)
        s = layer.scaling
        delta = s * layer.lora_B.weight @ layer.lora_A.weight
        reference = x @ ((layer.weight + delta) * layer.mask).T  # design.md, sparse_to_sparse
        torch.testing.assert_close(layer(x), reference, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- the algorithm alone


class NestedLinears(nn.Module):
    """nn.Linear modules at given qualified names (CS naming), plus a LoRA-like parameter."""

    def __init__(self, shapes: dict[str, tuple[int, int]]) -> None:
        super().__init__()
        for name, (out_f, in_f) in shapes.items():
            parent = self
            *path, leaf = name.removesuffix(".weight").split(".")
            for part in path:
                if not hasattr(parent, part):
                    parent.add_module(part, nn.Module())
                parent = getattr(parent, part)
            parent.add_module(leaf, nn.Linear(in_f, out_f, bias=False))
            parent.add_module("lora_A", nn.Linear(in_f, 2, bias=False))

    def forward(self, x):
        return [m(x[..., : m.in_features]) for m in self.modules() if isinstance(m, nn.Linear)]


@pytest.mark.cs
def test_mask_file_sparsity_on_the_cstorch_cpu_backend(tmp_path):
    from modelzoo_ext.cerebras.sparsity import MaskFileSparsity
    from modelzoo_ext.errors import UserError
    from modelzoo_ext.masks.view import MaskView
    from modelzoo_ext.name_map import RopeLayout, hf_to_cs_name, permute_rows_hf_to_cs

    hf = random_masks(
        {"model.layers.0.self_attn.q_proj.weight": (64, 64), "model.layers.0.mlp.down_proj.weight": (64, 128)}
    )
    path = write_hf_masks(tmp_path / "m.safetensors", hf)
    cs_shapes = {hf_to_cs_name(n, "llama"): tuple(m.shape) for n, m in hf.items()}
    model = NestedLinears(cs_shapes)
    get_cstorch_cpu_backend()
    view = MaskView(path, "cs", "llama", RopeLayout.from_cs_config(LLAMA_SECTION))  # what the model holds
    algorithm = MaskFileSparsity(view)
    algorithm.apply(model)
    algorithm.check_covers(list(cs_shapes))
    algorithm.initialize()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    model(torch.ones(1, 128))
    state = model.state_dict()
    expected = {
        hf_to_cs_name(n, "llama"): permute_rows_hf_to_cs(m, 4, 16) if "q_proj" in n else m
        for n, m in hf.items()
    }
    assert sorted(k for k in state if k.endswith("_mask")) == sorted(f"{n}_mask" for n in expected)
    for name, mask in expected.items():
        assert torch.equal(state[f"{name}_mask"], mask)
        assert torch.equal(state[name], mask.float())  # ones, zeroed in place off the mask
    assert all(p.all() for n, p in state.items() if "lora_A" in n)  # LoRA never sparsified

    with pytest.raises(UserError, match="targeted weights without a mask.*extra.weight"):
        algorithm.check_covers([*cs_shapes, "model.extra.weight"])
    other = MaskFileSparsity(view)
    other.apply(NestedLinears({next(iter(cs_shapes)): (64, 64)}))
    with pytest.raises(UserError, match="masks that match no parameter.*ffn.ffn.1.linear_layer.weight"):
        other.check_covers([next(iter(cs_shapes))])
    # A YAML `sparsity:` section can only hand it plain values: refused with the fix.
    with pytest.raises(UserError, match="applied by the SparseLoRAMasks callback"):
        MaskFileSparsity(str(path))


@pytest.mark.modelzoo
def test_spawned_processes_register_by_themselves(tmp_path):
    """ModelZoo's autorestart runs trainers in `spawn` children: they re-import the main script
    (here shaped like `cszoo-sparse-lora`: `import modelzoo_ext.cerebras` at the top) and register again."""
    script = tmp_path / "launcher.py"
    script.write_text(
        "import multiprocessing as mp\n"
        "import modelzoo_ext.cerebras  # noqa: F401\n\n"
        "def names():\n"
        "    from cerebras.modelzoo.registry import registry\n"
        "    return sorted(n for n in registry.get_model_names() if n.startswith('sparse_lora'))\n\n"
        "if __name__ == '__main__':\n"
        "    with mp.get_context('spawn').Pool(1) as pool:\n"
        "        print(pool.apply(names))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "['sparse_lora_llama', 'sparse_lora_mistral', 'sparse_lora_mixtral']"


@pytest.mark.modelzoo
def test_modelzoo_status_lists_what_cszoo_fit_needs(capsys):
    from modelzoo_ext.cli import main

    status = main(["modelzoo", "status"])
    out = capsys.readouterr().out
    assert "registered models: sparse_lora_llama, sparse_lora_mistral, sparse_lora_mixtral" in out
    assert "ok       cerebras.modelzoo" in out
    bigcode_missing = "MISSING  bigcode_eval" in out
    assert status == (1 if bigcode_missing else 0)
    # the stack's versions, the tested releases, and a warning only where the release is untested
    from modelzoo_ext.versions import TESTED_RELEASES, release_warning, stack_versions

    versions = stack_versions()
    for name in ("cerebras-modelzoo", "cerebras-pytorch", "cerebras-appliance", "transformers", "lm-eval"):
        assert f"{name:22} {versions[name]}" in out.splitlines()
    assert f"tested with ModelZoo releases: {', '.join(TESTED_RELEASES)}" in out
    assert ("WARNING" in out) == (release_warning(versions) is not None)
    assert "checkpoint converters: " in out
