"""The server's side of a round: the weighted mean of the clients' updates, and the
server optimizer that applies it (Reddi et al. 2021, "Adaptive Federated
Optimization", Algorithm 2, as Flower's FedAdam, FedYogi and FedAdagrad).

With the weighted mean change ``d`` of the round's clients, on flat float64
vectors:

- ``avg`` (FedAvg, FedProx): ``x += lr * d`` (``--server-lr`` 1: the mean model).
- ``adagrad``: ``m = b1 m + (1-b1) d``, ``v += d^2``, ``x += lr m / (sqrt(v) + tau)``.
- ``adam``: as adagrad with ``v = b2 v + (1-b2) d^2``.
- ``yogi``: as adagrad with ``v -= (1-b2) d^2 sign(v - d^2)``.

No bias correction, as in the paper; every process holds the server state and
applies the same update, so the replicas stay one model.
"""

from __future__ import annotations

from typing import Any

import torch

SERVER_OPTS = ("avg", "adam", "yogi", "adagrad")


class ServerOptimizer:
    """One of :data:`SERVER_OPTS` over a flat vector of parameters."""

    def __init__(self, name: str, lr: float, beta1: float, beta2: float, tau: float) -> None:
        if name not in SERVER_OPTS:
            raise ValueError(f"unknown server optimizer {name!r}")
        self.name, self.lr, self.beta1, self.beta2, self.tau = name, lr, beta1, beta2, tau
        self.m: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def step(self, x: torch.Tensor, delta: torch.Tensor) -> None:
        """Move ``x`` (in place) by the round's weighted mean change ``delta``."""
        if self.name == "avg":
            x.add_(delta, alpha=self.lr)
            return
        if self.m is None or self.v is None:
            self.m, self.v = torch.zeros_like(x), torch.zeros_like(x)
        self.m.mul_(self.beta1).add_(delta, alpha=1 - self.beta1)
        square = delta * delta
        if self.name == "adagrad":
            self.v.add_(square)
        elif self.name == "adam":
            self.v.mul_(self.beta2).add_(square, alpha=1 - self.beta2)
        else:  # yogi
            self.v.sub_((1 - self.beta2) * square * torch.sign(self.v - square))
        x.addcdiv_(self.m, self.v.sqrt().add_(self.tau), value=self.lr)

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "m": self.m, "v": self.v}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") == self.name:
            self.m, self.v = state["m"], state["v"]
