"""Server-side optimizers, applied to blocks of rows with state only where touched.

A dense slice is one block of one row; an embedding table's touched rows are a
block of many. State (momentum, Adam moments and per-row step counts, Adagrad
sums) lives beside the rows it belongs to, so a table of a billion possible
rows costs memory only for the rows ever pushed. The arithmetic follows
``torch.optim`` (SGD with coupled weight decay, Adam, decoupled AdamW, Adagrad),
so the parameter server with ``sgd`` matches all-reduce with ``sgd`` exactly.
"""

from __future__ import annotations

import torch

from shoal.config import OptimConfig
from shoal.optim import lr_factor

STATE_KEYS = {
    "sgd": (),
    "momentum": ("momentum",),
    "adam": ("exp_avg", "exp_avg_sq", "step"),
    "adamw": ("exp_avg", "exp_avg_sq", "step"),
    "adagrad": ("sum",),
}


class ServerOptimizer:
    """Applies gradients to parameter rows in place; keeps per-row state."""

    def __init__(self, cfg: OptimConfig, total_steps: int) -> None:
        self.cfg = cfg
        self.total_steps = total_steps
        self.state_keys = STATE_KEYS[cfg.name]

    def lr(self, step: int) -> float:
        """The learning rate at global step ``step`` (the schedule of torch.optim runs)."""
        return self.cfg.lr * lr_factor(step, self.total_steps, self.cfg)

    def new_state(self, rows: int, dim: int) -> dict[str, torch.Tensor]:
        """Zero state for ``rows`` new rows of width ``dim``."""
        return {k: torch.zeros(rows, 1 if k == "step" else dim) for k in self.state_keys}

    def apply(
        self, param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor], step: int
    ) -> None:
        """``param``, ``grad``: [rows, dim]; ``state`` tensors aligned with the rows."""
        cfg, lr, wd = self.cfg, self.lr(step), self.cfg.weight_decay
        name = cfg.name
        if wd and name != "adamw":
            grad = grad.add(param, alpha=wd)
        if name == "sgd":
            param.add_(grad, alpha=-lr)
        elif name == "momentum":
            buf = state["momentum"]
            buf.mul_(cfg.momentum).add_(grad)
            param.add_(buf, alpha=-lr)
        elif name in ("adam", "adamw"):
            beta1, beta2, eps = 0.9, 0.999, 1e-8
            if name == "adamw" and wd:
                param.mul_(1 - lr * wd)
            step = state["step"].add_(1)
            state["exp_avg"].lerp_(grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            step64 = step.double()  # torch.optim computes bias corrections in double
            bias1 = (1 - beta1**step64).float()
            bias2_sqrt = (1 - beta2**step64).sqrt().float()
            denom = (state["exp_avg_sq"].sqrt() / bias2_sqrt).add_(eps)
            param.sub_(state["exp_avg"] / denom * (lr / bias1))  # torch.optim's order of operations
        elif name == "adagrad":
            state["sum"].addcmul_(grad, grad)
            param.addcdiv_(grad, state["sum"].sqrt().add_(1e-10), value=-lr)
        else:  # pragma: no cover - config validation rejects it
            raise ValueError(f"unknown optimizer {name!r}")
