"""A client's local training: the same code for the simulation and for client
processes on other machines."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parameters_to_vector

from shoal.metrics import PhaseTimer
from shoal.strategies.base import Batch, LossFn


def train_client(
    model: nn.Module,
    params: list[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    batches: list[Batch],
    loss_fn: LossFn,
    mu: float,
    global_x: torch.Tensor,
    timer: PhaseTimer | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One client's local training from the global model ``global_x`` (flat, float64)
    with a fresh ``optimizer`` state: a step per batch on the batch's mean loss, plus
    FedProx's ``mu/2 |w - w_global|^2``. Returns its change (flat, float64), its loss
    sum, and the seconds of forward and backward."""
    timer = timer or PhaseTimer()
    with torch.no_grad():
        load_flat(params, global_x)
    anchor = [p.detach().clone() for p in params] if mu else []
    optimizer.state.clear()  # a fresh local optimizer per client
    loss_sum = torch.zeros((), dtype=torch.float64, device=global_x.device)
    computed = 0.0
    for piece in batches:
        optimizer.zero_grad(set_to_none=True)
        start = timer.totals["forward_backward"]
        with timer.phase("forward_backward"):
            losses = loss_fn(model, piece)
            losses.mean().backward()
        computed += timer.totals["forward_backward"] - start
        with timer.phase("optimizer"), torch.no_grad():
            for p, a in zip(params, anchor):  # FedProx: mu (w - w_global)
                if p.grad is not None:
                    p.grad.add_(p - a, alpha=mu)
            optimizer.step()
        loss_sum += losses.detach().sum()
    with torch.no_grad():
        change = parameters_to_vector(params).detach().double() - global_x
    return change, loss_sum, computed


def load_flat(params: list[nn.Parameter], flat: torch.Tensor) -> None:
    """Copy ``flat`` into ``params`` (torch's ``vector_to_parameters`` would make the
    parameters views of ``flat``, which local steps would then change)."""
    offset = 0
    for p in params:
        p.copy_(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()


def contribution(change: torch.Tensor, examples: int, clip: float = 0.0) -> torch.Tensor:
    """What one client sends to the sum: its change weighted by its rows (with
    client-level DP, ``clip`` > 0: clipped to norm ``clip`` and unweighted), its weight,
    and 1 (it reported)."""
    if clip > 0:
        change = change * min(1.0, clip / (float(change.norm()) + 1e-12))
        examples = 1
    return torch.cat([change * examples, change.new_tensor([examples, 1.0])])
