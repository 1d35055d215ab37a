"""A strategy of your own: Elastic Averaging SGD, as a shoal plugin.

Zhang, Choromanska and LeCun (2015). Each worker trains its own replica and,
every ``--tau`` steps, it and a shared center variable pull on each other:

    d_i = x_i - center
    x_i    <- x_i - alpha * d_i
    center <- center + alpha * sum_i d_i        (alpha = lr * rho)

Train with it from the repository root (``examples`` is importable there)::

    shoal train --strategy examples.easgd:Plugin --rho 2 --tau 4 --workers 3

``--rho`` and ``--tau`` are flags because they are fields of ``Config``; in a
TOML job file they go in ``[strategy.easgd-example]``. shoal ships a fuller
version as ``--strategy easgd`` (compression, byte counts, the summary).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from shoal.config import JobConfig, option
from shoal.errors import UserError
from shoal.optim import build_optimizer, build_scheduler
from shoal.strategies import Plugin as BasePlugin
from shoal.strategies import Strategy


@dataclass
class Config:
    """[strategy.easgd-example]: one field per option."""

    rho: float = option(2.0, "elastic force: alpha = lr x rho", above=0)
    tau: int = option(4, "local steps between elastic exchanges", low=1)


class ElasticAveraging(Strategy):
    """The runtime: one replica per worker, and every worker's copy of the center."""

    options: Config

    def setup(self, model, total_steps, example, activations) -> None:
        self.model, self.total_steps, self.steps = model, total_steps, 0
        self.optimizer = build_optimizer(model.parameters(), self.job.optim)
        self.scheduler = build_scheduler(self.optimizer, self.job.optim, total_steps)
        # every worker builds the model from the same seed: replicas start at the center
        self.center = [p.detach().clone() for p in model.parameters()]
        self.eval_copy = None

    def train_step(self, batch, loss_fn, loss_scale, timer) -> torch.Tensor:
        alpha = self.lr * self.options.rho  # with this step's learning rate
        # zero grad, forward, scaled backward, optimizer and schedule step
        loss_sum = self.optimizer_step(self.model, batch, loss_fn, loss_scale, timer)
        self.steps += 1
        if self.steps % self.options.tau == 0 or self.steps == self.total_steps:
            with timer.phase("comm"):
                self.exchange(alpha)
        return loss_sum

    @torch.no_grad()
    def exchange(self, alpha: float) -> None:
        diffs = [p - c for p, c in zip(self.model.parameters(), self.center)]
        flat = torch.cat([d.reshape(-1) for d in diffs])
        dist.all_reduce(flat)  # sum over workers of x_i - center
        wire = 2 * flat.numel() * flat.element_size()  # about what a ring moves per rank
        self.comm.add(sent=wire, received=wire)
        offset = 0
        for p, c, d in zip(self.model.parameters(), self.center, diffs):
            p.sub_(alpha * d)
            c.add_(alpha * flat[offset : offset + d.numel()].view_as(d))
            offset += d.numel()

    def eval_model(self) -> torch.nn.Module:
        """The center is the trained model."""
        import copy

        if self.eval_copy is None:
            self.eval_copy = copy.deepcopy(self.model)
        with torch.no_grad():
            for p, c in zip(self.eval_copy.parameters(), self.center):
                p.copy_(c)
        return self.eval_copy

    def state_dict(self) -> dict[str, Any]:
        """Called on every rank: the replicas differ, so each is gathered."""
        mine = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
        replicas: list[Any] = [None] * self.env.world_size
        dist.all_gather_object(replicas, mine)
        return {
            "replicas": replicas,
            "center": [c.clone() for c in self.center],
            "scheduler": self.scheduler.state_dict(),
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.env.rank >= len(state["replicas"]):
            raise UserError("the easgd example resumes on as many workers as it had")
        mine = state["replicas"][self.env.rank]
        self.model.load_state_dict(mine["model"])
        self.optimizer.load_state_dict(mine["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for c, saved in zip(self.center, state["center"]):
            c.copy_(saved)
        self.steps = state["steps"]


class Plugin(BasePlugin):
    """The declaration: name, options, checks; torchrun's agent launches it."""

    name = "easgd-example"
    description = "elastic averaging SGD (the docs/STRATEGIES.md example)"
    Config = Config
    runtime = ElasticAveraging

    def check(self, job: JobConfig) -> None:
        super().check(job)  # the options' ranges, at least one worker
        rate = job.world_size * job.optim.lr * self.options(job).rho
        if rate >= 1:
            raise UserError(f"workers x lr x rho = {rate:g} must stay below 1: lower --rho")
