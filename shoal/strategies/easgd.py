"""Elastic Averaging SGD (Zhang, Choromanska and LeCun, 2015), synchronous.

Every worker trains its own replica ``x_i`` on its slice of each global step
and, every ``--sync-every`` steps (the paper's tau), is pulled toward a center
variable ``c`` by an elastic force, while the center moves toward the workers:

    d_i = x_i - c
    x_i <- x_i - alpha * d_i
    c   <- c + alpha * sum_i d_i          (alpha = lr * rho)

so the center is a moving average of the replicas with rate ``W * alpha``,
which must stay below 1. The center is the model that is evaluated and
exported. One exchange is one all-reduce of the differences, through
``--compress`` (with error feedback) like the other periodic strategies.
Checkpoints hold every replica, its optimizer state and the center, so a
resumed run continues exactly (on a resize, new ranks start from the center).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from shoal.compress import COMPRESS_HELP, parse_codec
from shoal.config import JobConfig, option
from shoal.errors import UserError
from shoal.memory import ActivationMeter
from shoal.metrics import PhaseTimer
from shoal.optim import build_optimizer, build_scheduler
from shoal.strategies import plugin
from shoal.strategies.base import Batch, LossFn, Strategy
from shoal.strategies.collectives import average
from shoal.telemetry import Totals


@dataclass
class EASGDConfig:
    """[strategy.easgd]"""

    rho: float = option(
        2.0, "easgd: strength of the elastic force (alpha = lr x rho)", above=0, high=1e6
    )
    sync_every: int = option(8, "local steps between synchronizations (H)", low=1, high=1 << 30)
    compress: str = option("none", COMPRESS_HELP)


class EASGD(Strategy):
    """Replicas tied to a center variable by an elastic force."""

    options: EASGDConfig

    def setup(
        self, model: nn.Module, total_steps: int, example: Batch, activations: ActivationMeter
    ) -> None:
        self.model, self.total_steps = model, total_steps
        self.optimizer = build_optimizer(model.parameters(), self.job.optim)
        self.scheduler = build_scheduler(self.optimizer, self.job.optim, total_steps)
        self.codec = parse_codec(self.options.compress, seed=self.job.train.seed + self.env.rank)
        self.params = dict(model.named_parameters())
        # every worker builds the model from the same seed: the replicas start at the center
        self.center = {n: p.detach().clone() for n, p in self.params.items()}
        self.steps = 0
        self.gap = 0.0  # the replicas' mean distance to the center before the last pull

    def consistent_after(self, step: int) -> bool:
        return step % self.options.sync_every == 0

    def train_step(
        self, batch: Batch, loss_fn: LossFn, loss_scale: float, timer: PhaseTimer
    ) -> torch.Tensor:
        alpha = self.lr * self.options.rho  # this step's learning rate
        loss_sum = self.optimizer_step(self.model, batch, loss_fn, loss_scale, timer)
        self.steps += 1
        if self.steps % self.options.sync_every == 0 or self.steps == self.total_steps:
            with timer.phase("comm"):
                self.pull(alpha)
        return loss_sum

    @torch.no_grad()
    def pull(self, alpha: float) -> None:
        """The elastic exchange: replicas toward the center, the center toward them."""
        diffs = [(n, p.detach() - self.center[n]) for n, p in self.params.items()]
        means = average(diffs, self.codec, self.env.world_size, self.comm)
        world = self.env.world_size
        self.gap = sum(float(d.norm()) ** 2 for _, d in diffs) ** 0.5
        for (n, p), (_, d), mean in zip(self.params.items(), diffs, means):
            p.sub_(alpha * d)
            self.center[n].add_(mean.reshape(p.shape), alpha=alpha * world)

    def eval_model(self) -> nn.Module:
        """The center variable, as a model."""
        if not hasattr(self, "center_model"):
            self.center_model = copy.deepcopy(self.model)
        self.center_model.load_state_dict(self.center, strict=False)
        return self.center_model

    def state_dict(self) -> dict[str, Any]:
        """Every rank's replica and optimizer state (gathered: collective) and the center."""
        mine = {
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
        }
        replicas: list[Any] = [None] * self.env.world_size
        if dist.is_initialized() and self.env.world_size > 1:
            dist.all_gather_object(replicas, mine)
        else:
            replicas = [mine]
        return {
            "center": {n: t.clone() for n, t in self.center.items()},
            "replicas": replicas,
            "scheduler": self.scheduler.state_dict(),
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for n, t in state["center"].items():
            self.center[n].copy_(t)
        replicas = state["replicas"]
        if self.env.rank < len(replicas):
            self.model.load_state_dict(replicas[self.env.rank]["model"])
            self.optimizer.load_state_dict(replicas[self.env.rank]["optimizer"])
        else:  # a rank the checkpointed job did not have starts at the center
            self.model.load_state_dict(self.center, strict=False)
        self.scheduler.load_state_dict(state["scheduler"])
        self.steps = int(state["steps"])

    def totals(self) -> dict[str, float]:
        return {"gap": self.gap}

    def summarize(self, totals: list[Totals]) -> dict[str, Any]:
        return {"easgd": {"replica_gap_at_end": [t.own["gap"] for t in totals]}}


class Plugin(plugin.Plugin):
    name = "easgd"
    description = "elastic averaging SGD: replicas pulled every --sync-every steps to a center"
    Config = EASGDConfig
    runtime = EASGD
    reads = (*plugin.Plugin.reads, *plugin.RESTART_READS)
    restart_only = "each replica's own model and optimizer exist on its rank only"

    def check(self, job: JobConfig) -> None:
        super().check(job)
        opts = self.options(job)
        rate = job.world_size * job.optim.lr * opts.rho
        if rate >= 1:
            raise UserError(
                f"--strategy easgd: the center moves at workers x lr x rho = {rate:g} per "
                "exchange, which must stay below 1; lower --rho"
            )
