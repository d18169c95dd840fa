"""The trainer's parts against the real ModelZoo / cerebras-pytorch definitions they reproduce.

Schedules, optimizers and the sample order are compared bit for bit with cerebras-pytorch
(`cs` marker); the loss with ModelZoo's `GPTLMHeadModelLoss` (`modelzoo` marker). The run
config parser is checked for what users rely on: unknown or unsupported keys fail with the key.
"""

from __future__ import annotations

import copy

import pytest
import torch
import yaml

from gpu_reference.data import global_batches, rank_slice
from gpu_reference.optim import SGD, AdamW
from gpu_reference.schedulers import build_lr_schedule
from modelzoo_ext.errors import UserError
from modelzoo_ext.run_config import load_run_config

SCHEDULE_CASES = {
    "linear": [{"LinearLR": {"initial_learning_rate": 0.02, "end_learning_rate": 0.001, "total_iters": 7}}],
    "cosine": [
        {"CosineDecayLR": {"initial_learning_rate": 0.02, "end_learning_rate": 0.001, "total_iters": 6}}
    ],
    "warmup_cosine": [
        {
            "SequentialLR": {
                "schedulers": [
                    {"LinearLR": {"initial_learning_rate": 0.0, "end_learning_rate": 0.01, "total_iters": 3}},
                    {
                        "CosineDecayLR": {
                            "initial_learning_rate": 0.01,
                            "end_learning_rate": 0.001,
                            "total_iters": 5,
                        }
                    },
                ]
            }
        }
    ],
    "three_phase": [
        {
            "SequentialLR": {
                "schedulers": [
                    {"LinearLR": {"initial_learning_rate": 0.0, "end_learning_rate": 0.01, "total_iters": 2}},
                    {"ConstantLR": {"learning_rate": 0.01, "total_iters": 3}},
                    {"LinearLR": {"initial_learning_rate": 0.01, "end_learning_rate": 0.0, "total_iters": 4}},
                ]
            }
        }
    ],
}


def _cstorch_scheduler(cstorch, optimizer, spec):
    ((name, args),) = spec.items()
    args = dict(args)
    if name == "SequentialLR":
        subs = [_cstorch_scheduler(cstorch, optimizer, s) for s in args["schedulers"]]
        milestones, total = [], 0
        for s in args["schedulers"][:-1]:
            total += next(iter(s.values()))["total_iters"]
            milestones.append(total)
        return cstorch.optim.lr_scheduler.SequentialLR(optimizer, schedulers=subs, milestones=milestones)
    return getattr(cstorch.optim.lr_scheduler, name)(optimizer, **args)


@pytest.fixture
def cstorch(cstorch_cpu_backend):
    import cerebras.pytorch as cstorch

    return cstorch


@pytest.mark.cs
@pytest.mark.parametrize("case", sorted(SCHEDULE_CASES))
def test_schedules_equal_cstorch_bit_for_bit(cstorch, case):
    """The lr of every optimizer step equals cstorch's (same float32 ops), past the end of the schedule."""
    spec = SCHEDULE_CASES[case]
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = cstorch.optim.SGD([param], lr=0.5)
    scheduler = _cstorch_scheduler(cstorch, optimizer, spec[0])
    ours = build_lr_schedule(copy.deepcopy(spec), base_lr=0.5)
    for step in range(14):
        expected = torch.as_tensor(optimizer.param_groups[0]["lr"])
        assert torch.equal(ours(step).float(), expected.float()), (case, step, ours(step), expected)
        param.grad = torch.ones(2)
        optimizer.step()
        scheduler.step()


OPTIMIZER_CASES = {
    "adamw": ("AdamW", dict(lr=0.01, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.1, correct_bias=True)),
    "adamw_no_correction": (
        "AdamW",
        dict(lr=0.01, betas=(0.8, 0.99), eps=1e-5, weight_decay=0.0, correct_bias=False),
    ),
    "sgd_momentum": ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    "sgd_nesterov": ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True)),
}


@pytest.mark.cs
@pytest.mark.parametrize("case", sorted(OPTIMIZER_CASES))
def test_optimizers_equal_cstorch_bit_for_bit(cstorch, case):
    """Five steps with the same gradients and a float32 lr tensor give identical parameters and state."""
    name, kwargs = OPTIMIZER_CASES[case]
    g = torch.Generator().manual_seed(0)
    start = torch.randn(5, 3, generator=g)
    grads = [torch.randn(5, 3, generator=g) for _ in range(5)]
    theirs_p, ours_p = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    theirs = getattr(cstorch.optim, name)([theirs_p], **kwargs)
    ours = {"AdamW": AdamW, "SGD": SGD}[name]([ours_p], **kwargs)
    if hasattr(theirs, "preinitialize"):
        theirs.preinitialize()
    for step, grad in enumerate(grads):
        lr = torch.tensor(kwargs["lr"] * (step + 1) / 5, dtype=torch.float32)
        for opt in (theirs, ours):
            opt.param_groups[0]["lr"] = lr
        theirs_p.grad, ours_p.grad = grad.clone(), grad.clone()
        theirs.step()
        ours.step()
        assert torch.equal(theirs_p.data, ours_p.data), (case, step, (theirs_p - ours_p).abs().max())


class _Sized(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


@pytest.mark.cs
@pytest.mark.parametrize(
    "num_samples,batch_size,shuffle,seed,drop_last",
    [
        (10, 4, True, 3, True),
        (10, 4, False, 0, True),
        (7, 3, True, 11, False),
        (5, 8, True, 1, True),
        (12, 4, True, 0, True),
    ],
)
def test_batch_order_equals_cstorch_sampler(cstorch, num_samples, batch_size, shuffle, seed, drop_last):
    """Our global batches equal cstorch's DistributedSampler (what GptHDF5MapDataProcessor uses) over several epochs."""
    sampler = cstorch.utils.data.DistributedSampler(
        _Sized(num_samples),
        shuffle=shuffle,
        seed=seed,
        shard=True,
        batch_size=batch_size,
        drop_last=drop_last,
    )
    expected = []
    while len(expected) < 9:  # several epochs: the trainer iterates the loader again at each epoch
        expected.extend(list(b) for b in sampler)
    ours = global_batches(num_samples, batch_size, shuffle, seed, drop_last)
    assert [next(ours) for _ in range(9)] == expected[:9]


def test_rank_slices_partition_the_global_batch():
    batch = list(range(12))
    slices = [rank_slice(batch, r, 3) for r in range(3)]
    assert sum(slices, []) == batch


@pytest.mark.modelzoo
def test_loss_equals_modelzoo_gpt_loss():
    """Our masked token-mean loss equals ModelZoo's GPTLMHeadModelLoss (num_tokens and batch_size scaling)."""
    from cerebras.modelzoo.losses.GPTLMHeadModelLoss import GPTLMHeadModelLoss

    from gpu_reference.loss import normalise as _normalise

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=g)
    labels = torch.randint(0, 11, (3, 6), generator=g, dtype=torch.int32)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1]], dtype=torch.int32)
    token_loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, 11), labels.reshape(-1).long(), reduction="none"
    )
    loss_sum, count = (token_loss * mask.reshape(-1)).sum(), mask.sum().float()
    for scaling in ("num_tokens", "batch_size"):
        expected = GPTLMHeadModelLoss(11, scaling, 1.0)(logits, labels, mask)
        torch.testing.assert_close(_normalise(loss_sum, count, scaling, 3, 1.0), expected, rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------- run config
BASE_CONFIG = {
    "trainer": {
        "init": {
            "backend": {"backend_type": "CPU"},
            "seed": 1,
            "model": {
                "name": "sparse_lora_llama",
                "hidden_size": 64,
                "sparse_lora": {"mode": "sparse_to_sparse", "r": 4, "alpha": 8, "mask_path": "m.safetensors"},
            },
            "optimizer": {"AdamW": {"learning_rate": 0.001}},
            "loop": {"max_steps": 4},
            "callbacks": [{"SparseLoRAMasks": {}}, {"ComputeNorm": {}}],
        },
        "fit": {
            "train_dataloader": {
                "data_processor": "GptHDF5MapDataProcessor",
                "data_dir": "d",
                "batch_size": 2,
            },
        },
    }
}


def _write(tmp_path, config):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_run_config_reads_the_modelzoo_layout(tmp_path):
    cfg = load_run_config(_write(tmp_path, BASE_CONFIG))
    assert cfg.max_steps == 4
    assert cfg.sparse_lora.mode == "sparse_to_sparse" and cfg.sparse_lora.scaling == 2.0
    assert cfg.init.model.architecture == {"hidden_size": 64}
    assert "backend" in cfg.ignored and any("SparseLoRAMasks" in k for k in cfg.ignored)


@pytest.mark.parametrize(
    "edit,key",
    [
        (lambda c: c["trainer"]["init"]["loop"].update(typo_steps=3), "typo_steps"),
        (lambda c: c["trainer"]["init"]["model"]["sparse_lora"].update(rank=3), "rank"),
        (lambda c: c["trainer"]["init"].update(sparsity={"type": "static"}), "sparsity"),
        (lambda c: c["trainer"]["init"]["callbacks"].append({"Lora": {}}), "Lora"),
        (lambda c: c["trainer"]["init"].update(optimizer={"Lamb": {}}), "Lamb"),
        (
            lambda c: c["trainer"]["init"]["optimizer"]["AdamW"].update(adjust_learning_rate={"x": 1}),
            "adjust_learning_rate",
        ),
        (lambda c: c["trainer"]["init"].update(schedulers=[{"CyclicLR": {}}]), "CyclicLR"),
        (lambda c: c["trainer"]["fit"]["train_dataloader"].update(data_subset="0.0-0.5"), "data_subset"),
        (lambda c: c["trainer"]["init"]["model"].update(dropout_rate=0.1), "dropout_rate"),
        (
            lambda c: c["trainer"]["init"].update(precision={"enabled": True, "fp16_type": "float16"}),
            "fp16_type",
        ),
    ],
)
def test_run_config_refuses_what_it_cannot_honour(tmp_path, edit, key):
    """Each unsupported or misspelled key is a UserError that names it (nothing silently ignored)."""
    config = copy.deepcopy(BASE_CONFIG)
    edit(config)
    path = _write(tmp_path, config)
    with pytest.raises(UserError, match=key):
        cfg = load_run_config(path)
        # optimizer and scheduler specs are checked when built
        from gpu_reference.optim import build_optimizer

        build_lr_schedule(cfg.init.schedulers, 0.1)
        build_optimizer(torch.nn.Linear(2, 2), cfg.init.optimizer)
