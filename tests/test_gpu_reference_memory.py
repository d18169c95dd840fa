"""Micro-batches, activation checkpointing and the memory plan of the reference trainer.

- micro-batching (sizes 1, 3 of a batch of 4: equal and unequal parts) and activation checkpointing
  (transformers' gradient checkpointing, non-reentrant) give the whole batch's loss and LoRA
  gradients, on a tiny Llama (s2s, s2d) and a tiny Mixtral (s2s, with the router loss), CPU
  float32: losses within 1e-6 relative, every gradient entry within 1e-5 of its tensor's largest
  entry (the micro-batches run smaller matmuls, which round differently; checkpointing alone is
  bit-equal);
- the same through torchrun with 2 gloo processes, plain and `--fsdp` (slow; Mixtral in
  test_mixtral_gpu_reference.py);
- the micro-batch setting: the CSX flag by default, `--micro-batch-size` over it, `explore`
  refused, `auto` the largest that fits;
- the plan's activation formula against the tensors autograd really saves;
- a run whose plan does not fit is refused before any weight is read (exit 2, the numbers), and
  `--plan` stops before the weights too.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import skip_mixtral_on_transformers_5, transformers_major
from safetensors.torch import load_file
from test_gpu_reference_train import assets, losses, write_params  # noqa: F401  (assets: a fixture)
from test_mixtral_core import needs_per_expert_mixtral
from test_mixtral_gpu_reference import torchrun

from gpu_reference.data import SequenceStats, collate
from gpu_reference.loss import RouterLoss
from gpu_reference.memory_plan import plan_memory
from gpu_reference.micro_batch import micro_batch_setting
from gpu_reference.model import load_hf_model
from gpu_reference.model_shape import activation_bytes_per_token, model_shape
from gpu_reference.step import StepConfig, train_step
from gpu_reference.train import train
from gpu_reference.train_args import MemoryOptions
from modelzoo_ext.data.hdf5 import SampleDataset
from modelzoo_ext.errors import UserError
from modelzoo_ext.masks.format import load_masks
from modelzoo_ext.run_config import load_run_config
from modelzoo_ext.sparse_lora import SparseLoRAConfig, apply_sparse_lora_

REPO = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MIXTRAL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"]
LOSS_RTOL = 1e-6
GRAD_TOL = 1e-5  # relative to each gradient tensor's largest entry


# ----------------------------------------------------------------------------- equivalence (one process)
def lora_model(hf_dir: Path, mode: str, targets: list[str], masks: dict, checkpointing: bool):
    """The HF model with sparse LoRA, B drawn non-zero (so A gets a gradient too)."""
    model = load_hf_model(hf_dir)
    config = SparseLoRAConfig(mode=mode, r=4, alpha=8.0, target_modules=targets, mask_path="masks")
    apply_sparse_lora_(model, config, masks, mask_base_in_forward="auto")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def step_loss_and_grads(model, batch, micro: int | None, router: RouterLoss | None = None):
    """One train_step (SGD at lr 0: nothing moves): its loss and the LoRA gradients before clipping."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    grads = {}

    def keep() -> None:
        grads.update({n: p.grad.clone() for n, p in zip(names, trainable, strict=True)})

    config = StepConfig(batch_size=batch["input_ids"].shape[0], micro_batch_size=micro, router=router)
    result = train_step(model, torch.optim.SGD(trainable, lr=0.0), trainable, [batch], config, on_grads=keep)
    return result, grads


def assert_same_step(got, expected, exact: bool = False) -> None:
    (result, grads), (ref_result, ref_grads) = got, expected
    assert result.loss_tokens == ref_result.loss_tokens and result.tokens == ref_result.tokens
    if exact:
        assert result.loss == ref_result.loss
        assert all(torch.equal(grads[k], ref_grads[k]) for k in ref_grads)
        return
    assert result.loss == pytest.approx(ref_result.loss, rel=LOSS_RTOL)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        scale = float(ref_grads[name].abs().max())
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=GRAD_TOL, atol=GRAD_TOL * scale)
    assert any(float(g.abs().max()) > 1e-4 for g in ref_grads.values())  # the comparison is not of zeros


def llama_batch(assets) -> dict[str, torch.Tensor]:  # noqa: F811
    return collate(SampleDataset(assets["data"]), [0, 1, 2, 3])  # prompts of different lengths


@pytest.mark.parametrize("mode", ["sparse_to_sparse", "sparse_to_dense"])
def test_llama_micro_batches_and_checkpointing_equal_the_whole_batch(assets, mode):  # noqa: F811
    masks, _ = load_masks(assets["masks"])
    batch = llama_batch(assets)
    whole = step_loss_and_grads(lora_model(assets["hf"], mode, TARGETS, masks, False), batch, None)
    checkpointed = step_loss_and_grads(lora_model(assets["hf"], mode, TARGETS, masks, True), batch, None)
    assert_same_step(checkpointed, whole, exact=True)  # recomputation repeats the same ops
    for micro in (1, 3):  # 4 parts of 1; parts of 3 and 1
        for checkpointing in (False, True):
            model = lora_model(assets["hf"], mode, TARGETS, masks, checkpointing)
            assert_same_step(step_loss_and_grads(model, batch, micro), whole)


@needs_per_expert_mixtral
def test_mixtral_micro_batches_and_checkpointing_equal_the_whole_batch(tiny_mixtral_dir):
    """s2s with random masks and ModelZoo's router loss (a sum over samples: micro-batches add)."""
    reference = load_hf_model(tiny_mixtral_dir)
    g = torch.Generator().manual_seed(5)
    masks = {
        f"{name}.weight": torch.rand(m.weight.shape, generator=g) >= 0.5
        for name, m in reference.named_modules()
        if name.rsplit(".", 1)[-1] in MIXTRAL_TARGETS
    }
    ids = torch.randint(3, 32000, (4, 12), generator=g, dtype=torch.int32)
    loss_mask = torch.zeros(4, 12, dtype=torch.int32)
    for row, end in enumerate((12, 7, 10, 5)):  # different lengths, 3 loss tokens each
        loss_mask[row, end - 3 : end] = 1
    batch = {"input_ids": ids, "labels": torch.roll(ids, -1, dims=1), "attention_mask": loss_mask}
    router = RouterLoss(num_experts=4, top_k=2, coef=0.02)
    build = lambda ckpt: lora_model(tiny_mixtral_dir, "sparse_to_sparse", MIXTRAL_TARGETS, masks, ckpt)  # noqa: E731
    whole = step_loss_and_grads(build(False), batch, None, router)
    assert_same_step(step_loss_and_grads(build(True), batch, None, router), whole, exact=True)
    for micro in (1, 3):
        assert_same_step(step_loss_and_grads(build(True), batch, micro, router), whole)


def test_a_run_with_micro_batches_and_checkpointing_trains_as_the_whole_batch(assets):  # noqa: F811
    """The trainer end to end: 3 steps, batch 4 as micro-batches of 1 with checkpointing, and the
    run record says what was used."""
    params = write_params(assets, "micro_whole", max_steps=3)
    whole = train(params, assets["hf"], assets["root"] / "run_micro_whole", "cpu", progress=False)
    options = MemoryOptions(micro_batch_size="1", activation_checkpointing=True)
    micro = train(params, assets["hf"], assets["root"] / "run_micro_1", "cpu", progress=False, memory=options)
    torch.testing.assert_close(torch.tensor(losses(micro)), torch.tensor(losses(whole)), rtol=1e-6, atol=0)
    a, b = load_file(whole / "lora.safetensors"), load_file(micro / "lora.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)  # as the DDP test: AdamW after 3 steps
    memory = json.loads((micro / "run.json").read_text())["memory"]
    assert memory["micro_batch_size"] == 1 and memory["micro_batch_source"] == "--micro-batch-size"
    assert memory["activation_checkpointing"] is True and memory["base_dtype"] == "float32"
    assert memory["plan"]["options"]["micro_batch_size"] == 1
    assert memory["plan"]["sequences"]["longest"] == 32  # the tiny data: prompts of 8..30 tokens + 2


# ----------------------------------------------------------------------------- equivalence (torchrun)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [(), ("--fsdp",)], ids=["ddp", "fsdp"])
def test_two_processes_with_micro_batches_and_checkpointing_equal_one_whole_batch(assets, extra):  # noqa: F811
    params = write_params(assets, "micro_torchrun", max_steps=3)
    name = "micro_torchrun_" + ("fsdp" if extra else "ddp")
    single = train(params, assets["hf"], assets["root"] / f"{name}_single", "cpu", progress=False)
    multi = torchrun(params, assets["hf"], assets["root"] / name, "--micro-batch-size", "1",
                     "--activation-checkpointing", *extra)  # fmt: skip
    torch.testing.assert_close(torch.tensor(losses(multi)), torch.tensor(losses(single)), rtol=1e-5, atol=0)
    a, b = load_file(single / "lora.safetensors"), load_file(multi / "lora.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
    memory = json.loads((multi / "run.json").read_text())["memory"]
    assert memory["micro_batch_size"] == 1 and memory["activation_checkpointing"] is True


# ----------------------------------------------------------------------------- the setting
def flagship(name: str = "llama3p1_8b"):
    return load_run_config(REPO / "model_configs" / f"params_sparse_lora_{name}.yaml")


def test_the_micro_batch_comes_from_the_csx_flag_unless_given(tmp_path):
    cfg = flagship()
    setting = micro_batch_setting(cfg, None)
    assert setting.requested == 8
    assert setting.source == "callbacks.ScopedTrainFlags.csx.performance.micro_batch_size"
    assert micro_batch_setting(cfg, "auto").requested == "auto"
    assert micro_batch_setting(cfg, "2").requested == 2
    assert micro_batch_setting(cfg, "none").requested is None
    raw = yaml.safe_load((REPO / "model_configs" / "params_sparse_lora_llama3p1_8b.yaml").read_text())
    raw["trainer"]["init"]["callbacks"][2]["ScopedTrainFlags"]["csx.performance.micro_batch_size"] = "explore"
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError, match="explore"):
        micro_batch_setting(load_run_config(tmp_path / "p.yaml"), None)
    with pytest.raises(UserError, match="--micro-batch-size"):
        micro_batch_setting(cfg, "0")


def test_the_auto_probe_halves_on_out_of_memory_and_leaves_no_trace(assets, monkeypatch):  # noqa: F811
    """The probe (run on a GPU for `auto`) with accelerate's helper: a forward/backward that runs
    out of memory above 3 samples takes 8 -> 4 -> 2; a real probe leaves no gradient and the RNG
    where it was."""
    import gpu_reference.micro_batch as micro_batch
    from gpu_reference.micro_batch import probe_micro_batch

    masks, _ = load_masks(assets["masks"])
    model = lora_model(assets["hf"], "sparse_to_dense", TARGETS, masks, False)
    seq = SequenceStats(longest=24, most_loss_tokens=2, source="test")
    state = torch.random.get_rng_state()
    assert probe_micro_batch(model, 4, seq, StepConfig(batch_size=4)) == (4, None)  # the CPU: no peak
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(p.grad is None for p in model.parameters())
    tried = []

    def out_of_memory_above_3(model, batch, config):
        tried.append(batch["input_ids"].shape[0])
        if tried[-1] > 3:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(micro_batch, "_forward_backward", out_of_memory_above_3)
    assert probe_micro_batch(model, 8, seq, StepConfig(batch_size=8)) == (2, None)
    assert tried == [8, 4, 2]
    monkeypatch.setattr(
        micro_batch,
        "_forward_backward",
        lambda *a: out_of_memory_above_3(a[0], {"input_ids": torch.zeros(9, 1)}, a[2]),
    )
    with pytest.raises(UserError, match="even a micro-batch of 1"):
        probe_micro_batch(model, 8, seq, StepConfig(batch_size=8))


# ----------------------------------------------------------------------------- the plan's formula
def saved_bytes(model, ids: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for backward (parameters and buffers excluded)."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, logits_to_keep=1, use_cache=False)
    return sum(seen.values())


@pytest.mark.parametrize("family", ["llama", pytest.param("mixtral", marks=needs_per_expert_mixtral)])
@pytest.mark.parametrize("mode", ["sparse_to_sparse", "sparse_to_dense"])
def test_the_activation_formula_counts_what_autograd_saves(family, mode):
    """One decoder layer more adds exactly the formula's bytes per token (float32, CPU, SDPA)."""
    from transformers import AutoModelForCausalLM

    from modelzoo_ext.tiny_models import tiny_config

    targets = MIXTRAL_TARGETS if family == "mixtral" else TARGETS
    counted = []
    for layers in (1, 2):
        config = tiny_config(family)
        config.num_hidden_layers = layers
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        masks = {f"{n}.weight": torch.rand(m.weight.shape) >= 0.5 for n, m in model.named_modules()
                 if n.rsplit(".", 1)[-1] in targets}  # fmt: skip
        apply_sparse_lora_(model, SparseLoRAConfig(mode=mode, r=4, alpha=8.0, target_modules=targets,
                                                   mask_path="m"), masks)  # fmt: skip
        counted.append(saved_bytes(model.train(), torch.randint(3, 32000, (2, 16))))
    shape = model_shape(tiny_config(family).to_dict(), targets, 4)
    path = "s2s" if mode == "sparse_to_sparse" else "lora"
    formula = activation_bytes_per_token(shape, autocast=False, lora_path=path, rank=4)
    measured = (counted[1] - counted[0]) / 32
    if (torch.__version__.startswith("2.4."), transformers_major()) == (True, 4):
        assert measured == formula  # the stack the formula was written from (ModelZoo 2.10's)
    else:  # other torch / transformers save a little less: the plan stays an upper bound, within 10%
        assert measured <= formula <= 1.1 * measured


# ----------------------------------------------------------------------------- plans and refusals
def test_auto_takes_the_largest_micro_batch_that_fits(assets):  # noqa: F811
    from gpu_reference.memory_plan import largest_micro_batch

    cfg = load_run_config(write_params(assets, "plan_auto", batch_size=8))
    hf_config = json.loads((assets["hf"] / "config.json").read_text())
    seq = SequenceStats(longest=32, most_loss_tokens=2, source="test")
    totals = {m: plan_memory(cfg, hf_config, micro_batch_size=m, sequences=seq, device_type="cpu").total
              for m in range(1, 9)}  # fmt: skip
    assert all(totals[m] < totals[m + 1] for m in range(1, 8))  # more samples per pass, more memory
    device = (totals[3] + totals[4]) // 2
    assert largest_micro_batch(cfg, hf_config, device_memory=device, sequences=seq, device_type="cpu") == 3
    assert (
        largest_micro_batch(cfg, hf_config, device_memory=totals[1] - 1, sequences=seq, device_type="cpu")
        is None
    )


def test_a_run_that_does_not_fit_is_refused_before_any_weight_is_read(assets, monkeypatch):  # noqa: F811
    import gpu_reference.train as recipe

    def must_not_run(*args, **kwargs):
        raise AssertionError("weights or masks were read")

    monkeypatch.setattr(recipe, "load_hf_model", must_not_run)
    monkeypatch.setattr(recipe, "load_masks", must_not_run)
    params = write_params(assets, "refused")
    out = assets["root"] / "run_refused"
    with pytest.raises(UserError) as refused:
        train(params, assets["hf"], out, "cpu", progress=False, memory=MemoryOptions(device_memory="900MB"))
    message = str(refused.value)
    assert "does not fit" in message and "GiB" in message and "900MB" in message
    assert "--micro-batch-size 1" in message and "--activation-checkpointing" in message
    assert not out.exists()


def test_refused_run_exits_2_with_one_line(assets):  # noqa: F811
    params = write_params(assets, "refused_cli")
    out = assets["root"] / "run_refused_cli"
    cmd = [sys.executable, "-m", "gpu_reference.train", str(params), "--hf-model", str(assets["hf"]),
           "--out", str(out), "--device", "cpu", "--no-progress", "--device-memory", "900MB"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "does not fit" in proc.stderr
    assert "DOES NOT FIT" in proc.stdout  # the plan's table, term by term
    assert not out.exists()


def config_only_dir(tmp_path: Path, model: str) -> Path:
    directory = tmp_path / model
    directory.mkdir()
    source = REPO / "tests" / "fixtures" / "hf_configs" / f"{model}.config.json"
    (directory / "config.json").write_text(source.read_text())
    return directory


def test_plan_command_reads_config_json_only(tmp_path):
    """`sparse-lora train ... --plan` on a directory holding config.json alone (no weights)."""
    hf = config_only_dir(tmp_path, "Llama-3.1-8B")
    params = REPO / "model_configs" / "params_sparse_lora_llama3p1_8b.yaml"
    cmd = [sys.executable, "-m", "modelzoo_ext.cli", "train", str(params), "--hf-model", str(hf), "--plan",
           "--device-memory", "80GB", "--world-size", "8", "--fsdp", "--activation-checkpointing",
           "--micro-batch-size", "auto"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "fits" in proc.stdout and "8 processes, FSDP" in proc.stdout
    assert "worst case: no prepared data" in proc.stdout  # the data of the file is not here
    assert "micro-batch" in proc.stdout.splitlines()[-1]
    small = subprocess.run(
        [*cmd[:-6], "--device-memory", "20GB"], cwd=tmp_path, capture_output=True, text=True
    )
    assert small.returncode == 2 and "does not fit" in small.stderr


# BoolQ with the Mistral v1 tokenizer (`sequence_stats` of `sparse-lora data prepare --task boolq
# --split all --max-seq-length 2048`): the longest sample after trimming, 2 loss tokens each.
BOOLQ = SequenceStats(longest=1330, most_loss_tokens=2, source="BoolQ, Mistral v1 tokenizer")
FLAGSHIP_MODELS = {
    "llama3p1_8b": "Llama-3.1-8B",
    "mistral_7b": "Mistral-7B-v0.1",
    "llama2_7b": "Llama-2-7B",
    "mixtral_8x7b": "Mixtral-8x7B-v0.1",
}


@pytest.mark.parametrize("name", list(FLAGSHIP_MODELS))
def test_every_flagship_gets_a_plan_that_fits_80gb(name):
    """On 80 GB GPUs (masks at 50% sparsity, BoolQ lengths), in float32, `auto` finds a micro-batch
    that fits: the dense 7-8B files on one GPU as they are; Mixtral-8x7B on 8 GPUs with FSDP and
    activation checkpointing (one GPU is refused, with the levers that fit)."""
    skip_mixtral_on_transformers_5(name)
    from gpu_reference.memory_plan import largest_micro_batch

    cfg = flagship(name)
    fixture = REPO / "tests" / "fixtures" / "hf_configs" / f"{FLAGSHIP_MODELS[name]}.config.json"
    hf_config = json.loads(fixture.read_text())
    shape = model_shape(hf_config, cfg.sparse_lora.target_modules, cfg.sparse_lora.r)
    densities = {f"{n}.weight": 0.5 for n in shape.target_numel}
    common = dict(device_memory=80 * 10**9, sequences=BOOLQ, mask_densities=densities)
    assert plan_memory(cfg, hf_config, **common).term("masks").bytes == -(-shape.target_weights // 8)  # bits
    if name == "mixtral_8x7b":
        one = plan_memory(cfg, hf_config, micro_batch_size=1, **common)
        assert one.fits is False
        assert any("--nproc-per-node 8" in what and total <= 80 * 10**9 for what, total in one.levers())
        common.update(world_size=8, fsdp=True, activation_checkpointing=True)
    micro = largest_micro_batch(cfg, hf_config, **common)
    assert micro is not None and micro >= 2
    plan = plan_memory(cfg, hf_config, micro_batch_size=micro, **common)
    assert plan.fits and plan.options.micro_batch_size == micro and not plan.options.bf16_base


def test_a_planned_sweep_run_is_planned_from_its_data_length_and_mask_sparsity(tmp_path):
    """Before a sweep's data and masks exist, the plan takes every sample at the planned
    --max-seq-length (not the model's 8192 positions) and the s2s index from the planned per-layer
    density: 12 bytes per kept weight at or below the device's limit, none above it."""
    from gpu_reference.memory_plan import SAMPLED_INDEX_BYTES
    from gpu_reference.run_plan import PlannedInputs, check_memory
    from gpu_reference.train_args import MemoryOptions

    cfg = flagship("llama3p1_8b")  # s2s; its data_dir and mask_path do not exist here
    hf_config = json.loads(
        (REPO / "tests" / "fixtures" / "hf_configs" / "Llama-3.1-8B.config.json").read_text()
    )
    targets = model_shape(hf_config, cfg.sparse_lora.target_modules, cfg.sparse_lora.r).target_weights
    options = dict(masks_file=None, world_size=1, device=torch.device("cuda"), fsdp=False,
                   memory=MemoryOptions(micro_batch_size="1", device_memory="80GB"))  # fmt: skip
    worst = check_memory(cfg, hf_config, **options)
    assert worst.sequences.longest == 8192 and "no prepared data" in worst.sequences.source
    for density, index_bytes in ((0.3, int(targets * 0.3) * SAMPLED_INDEX_BYTES), (0.5, 0)):
        planned = check_memory(cfg, hf_config, **options, planned=PlannedInputs(2048, density))
        assert planned.sequences.longest == 2048 and "planned --max-seq-length" in planned.sequences.source
        assert planned.plan.term("s2s sampled-product index").bytes == index_bytes
        assert planned.plan.total < worst.plan.total
    # --sampled-product never: no index whatever the density (the plan honours the option it is given)
    never = dict(
        options, memory=MemoryOptions(micro_batch_size="1", device_memory="80GB", sampled_product="never")
    )
    for planned in (None, PlannedInputs(2048, 0.3)):
        assert (
            check_memory(cfg, hf_config, **never, planned=planned)
            .plan.term("s2s sampled-product index")
            .bytes
            == 0
        )
