"""AdamW and SGD with cerebras-pytorch's update rules, in plain torch.

`cstorch.optim.AdamW` differs from `torch.optim.AdamW`: eps is added to sqrt(v) *before* the
bias correction, the correction uses running float32 powers beta^t, and weight decay is added to
the update before it is scaled by the learning rate:

    m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
    u = m / (sqrt(v) + eps) * sqrt(1 - b2^t) / (1 - b1^t)      (correct_bias)
    p -= lr * (u + weight_decay * p)

`cstorch.optim.SGD`: g' = g + weight_decay * p; buf = momentum * buf + (1 - dampening) g'
(buf starts at zero); p -= lr * (g' + momentum * buf if nesterov else buf) (momentum > 0).

Parameter groups follow ModelZoo's `configure_param_groups`: weight decay on every trainable
parameter except biases and norm weights. The learning rate lives in `group["lr"]` as a
float32 0-d tensor, as the cerebras schedulers leave it.
"""

from __future__ import annotations

from typing import Any

import torch

from modelzoo_ext.errors import UserError

ADAMW_KEYS = {"lr", "learning_rate", "betas", "eps", "weight_decay", "correct_bias", "amsgrad"}
SGD_KEYS = {"lr", "learning_rate", "momentum", "dampening", "weight_decay", "nesterov", "maximize"}


class AdamW(torch.optim.Optimizer):
    """`cstorch.optim.AdamW`'s arithmetic (see the module docstring)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, correct_bias=True):
        super().__init__(
            params,
            dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, correct_bias=correct_bias),
        )

    def _state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
            if group["correct_bias"]:
                beta1, beta2 = group["betas"]
                state["beta1_power"] = torch.tensor(beta1).to(p.device)
                state["beta2_power"] = torch.tensor(beta2).to(p.device)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self._state(p, group)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                beta1, beta2 = group["betas"]
                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                update = exp_avg / exp_avg_sq.sqrt().add_(group["eps"])
                if group["correct_bias"]:
                    one = torch.tensor(1.0, dtype=torch.float32, device=p.device)
                    step_size = torch.sqrt(one - state["beta2_power"]) / (one - state["beta1_power"])
                    update *= step_size
                    state["beta1_power"] *= beta1
                    state["beta2_power"] *= beta2
                update.add_(p * group["weight_decay"])
                update *= _on(group["lr"], p)
                p.sub_(update)


class SGD(torch.optim.Optimizer):
    """`cstorch.optim.SGD`'s arithmetic (see the module docstring)."""

    def __init__(
        self, params, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False
    ):
        if nesterov and (momentum <= 0 or dampening != 0):
            raise UserError(
                "SGD nesterov needs momentum > 0 and dampening 0", where="trainer.init.optimizer.SGD"
            )
        super().__init__(
            params,
            dict(
                lr=lr,
                momentum=momentum,
                dampening=dampening,
                weight_decay=weight_decay,
                nesterov=nesterov,
                maximize=maximize,
            ),
        )

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = -p.grad if group["maximize"] else p.grad
                grad = grad + p * group["weight_decay"]
                if group["momentum"] != 0:
                    buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                    buf.mul_(group["momentum"]).add_(grad, alpha=1.0 - group["dampening"])
                    grad = grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                p.add_(-_on(group["lr"], p) * grad)


def _on(lr: Any, p: torch.Tensor) -> Any:
    return lr.to(p.device) if isinstance(lr, torch.Tensor) else lr


def _no_weight_decay(model: torch.nn.Module) -> set[str]:
    """Trainable parameters ModelZoo exempts from weight decay: biases and norm-module weights."""
    norm_names = [name for name, m in model.named_modules() if "norm" in type(m).__name__.lower() and name]
    out = set()
    for name, p in model.named_parameters():
        if p.requires_grad and ("bias" in name or any(n in name for n in norm_names)):
            out.add(name)
    return out


def build_optimizer(model: torch.nn.Module, spec: dict[str, Any]) -> torch.optim.Optimizer:
    """The optimizer from the YAML `optimizer: {AdamW|SGD: {...}}` over the trainable parameters."""
    if not isinstance(spec, dict) or len(spec) != 1:
        raise UserError(
            f"optimizer must be a one-key mapping {{AdamW: {{...}}}}, got {spec!r}",
            where="trainer.init.optimizer",
        )
    ((name, args),) = spec.items()
    args = dict(args or {})
    allowed = {"AdamW": ADAMW_KEYS, "SGD": SGD_KEYS}.get(name)
    if allowed is None:
        raise UserError(
            f"optimizer {name!r} is not supported by gpu_reference",
            where="trainer.init.optimizer",
            fix="use AdamW or SGD",
        )
    unknown = set(args) - allowed
    if unknown:
        raise UserError(
            f"{name}: keys gpu_reference cannot honour: {sorted(unknown)}",
            where=f"trainer.init.optimizer.{name}",
            fix="remove them (parameter tags and learning-rate adjustment groups are not supported)",
        )
    if args.get("amsgrad"):
        raise UserError(
            "AdamW amsgrad: true is not supported by gpu_reference", where="trainer.init.optimizer.AdamW"
        )
    args.pop("amsgrad", None)
    lr = float(args.pop("learning_rate", args.pop("lr", 0.1)))  # ModelZoo's default lr is 0.1
    weight_decay = float(args.pop("weight_decay", 0.0))
    exempt = _no_weight_decay(model)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise UserError("the model has no trainable parameters", fix="check sparse_lora.target_modules")
    groups = [
        {"params": [p for n, p in trainable if n not in exempt], "weight_decay": weight_decay},
        {"params": [p for n, p in trainable if n in exempt], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    cls = AdamW if name == "AdamW" else SGD
    return cls(groups, lr=lr, **args)
