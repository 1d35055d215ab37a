"""Periodic data parallel: local SGD (model averaging) and DiLoCo.

Each worker trains its own replica on its slice of every global step, with its
own optimizer, and talks only every ``--sync-every H`` steps (and after the
last step, so the final model is one model):

- ``local-sgd``: the replicas' parameters are averaged (Stich 2019; Lin et al.
  2020). What travels is each replica's change since the last average, so a
  codec compresses the update, with error feedback, not the weights.
- ``diloco``: the replicas' average change is a pseudo-gradient for an outer
  optimizer, Nesterov momentum SGD (``--outer-lr``, ``--outer-momentum``), on
  the shared parameters; the inner optimizer is the job's ``--optimizer``
  (AdamW unless told otherwise, as in Douillard et al. 2023).

With no compression one average moves every parameter once in a ring
all-reduce: 1/H of what ``allreduce`` moves in the same steps.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from shoal import balance
from shoal.compress import COMPRESS_HELP, parse_codec
from shoal.config import JobConfig, option
from shoal.dist import DistEnv
from shoal.errors import UserError
from shoal.memory import ActivationMeter
from shoal.metrics import PhaseTimer
from shoal.optim import build_optimizer, build_scheduler
from shoal.strategies import plugin
from shoal.strategies.base import Batch, LossFn, Strategy
from shoal.strategies.collectives import average


@dataclass
class LocalSGDConfig:
    """[strategy.local-sgd]"""

    sync_every: int = option(8, "local steps between synchronizations (H)", low=1, high=1 << 30)
    compress: str = option("none", COMPRESS_HELP)


@dataclass
class DiLoCoConfig(LocalSGDConfig):
    """[strategy.diloco]"""

    outer_lr: float = option(0.7, "learning rate of the outer Nesterov SGD", above=0, high=1e4)
    outer_momentum: float = option(0.9, "momentum of the outer Nesterov SGD", low=0, below=1)


class LocalSGD(Strategy):
    """Local steps, parameters averaged every H steps."""

    options: LocalSGDConfig

    def setup(
        self, model: nn.Module, total_steps: int, example: Batch, activations: ActivationMeter
    ) -> None:
        self.model = model
        self.total_steps = total_steps
        self.sync_every = self.options.sync_every
        self.optimizer = build_optimizer(model.parameters(), self.job.optim)
        self.scheduler = build_scheduler(self.optimizer, self.job.optim, total_steps)
        self.codec = parse_codec(self.options.compress, seed=self.job.train.seed + self.env.rank)
        # the replicas start equal: every worker builds the model from the same seed
        self.params = dict(model.named_parameters())
        self.anchor = {n: p.detach().clone() for n, p in self.params.items()}
        self.steps = 0
        # uneven slices (--balance): each replica steps on its slice's mean, and the
        # average weighs each replica's change by the samples it trained on
        self.weighted = balance.parse(self.job.train.balance).mode != "equal"
        self.samples = 0  # this replica's, since the last synchronization
        self.synced: dict[str, Any] = {}  # what rollback() goes back to (in-place jobs)
        self._mark()

    def regroup(self, env: DistEnv) -> None:
        self.env = env  # (nothing holds the group between synchronizations)

    def _mark(self) -> None:
        """Keep this replica's inner optimizer at a synchronization (in-place jobs: the
        model is the anchor then), for :meth:`rollback`."""
        if self.in_place:
            self.synced = {
                "optimizer": copy.deepcopy(self.optimizer.state_dict()),
                "scheduler": self.scheduler.state_dict(),
                "steps": self.steps,
            }

    @torch.no_grad()
    def rollback(self) -> None:
        """Back to the last synchronization: the anchor, and this replica's inner
        optimizer as it was then."""
        for n, p in self.params.items():
            p.copy_(self.anchor[n])
        # (a copy: load_state_dict keeps tensors of the right dtype and device as they are,
        # so the live state would be the kept one, and a second rollback would see it moved)
        self.optimizer.load_state_dict(copy.deepcopy(self.synced["optimizer"]))
        self.scheduler.load_state_dict(self.synced["scheduler"])
        self.steps = self.synced["steps"]
        self.samples = 0

    def train_step(
        self, batch: Batch, loss_fn: LossFn, loss_scale: float, timer: PhaseTimer
    ) -> torch.Tensor:
        # loss_scale W/B: the mean over this replica's slice of the step (B/W samples)
        if self.weighted:
            loss_scale = 1.0 / len(batch[1])
            self.samples += len(batch[1])
        loss_sum = self.optimizer_step(self.model, batch, loss_fn, loss_scale, timer)
        self.steps += 1
        if self.steps % self.sync_every == 0 or self.steps == self.total_steps:
            before = timer.totals["comm"]
            with timer.phase("comm"):
                self.synchronize()
            self.wait_time += timer.totals["comm"] - before
        return loss_sum

    def consistent_after(self, step: int) -> bool:
        return step % self.sync_every == 0 or step == self.total_steps

    @torch.no_grad()
    def synchronize(self) -> None:
        """Average the replicas' changes since the last synchronization, through the codec."""
        deltas = [(n, p.detach() - self.anchor[n]) for n, p in self.params.items()]
        if self.weighted:
            total = torch.tensor([float(self.samples)], device=self.env.device)
            dist.all_reduce(total)
            weight = self.env.world_size * self.samples / float(total)
            deltas = [(n, d * weight) for n, d in deltas]
            self.samples = 0
        means = average(deltas, self.codec, self.env.world_size, self.comm)
        self._apply_average(means)
        for n, p in self.params.items():
            self.anchor[n].copy_(p)
        self._mark()

    def _apply_average(self, means: list[torch.Tensor]) -> None:
        for (n, p), m in zip(self.params.items(), means):
            p.copy_(self.anchor[n] + m.reshape(p.shape))

    def state_dict(self) -> dict[str, Any]:
        """The model (one model: checkpoints fall on synchronizations, see the plugin's
        check) and rank 0's inner optimizer state, which every replica resumes with."""
        return {
            **super().state_dict(),
            "anchor": {n: t.clone() for n, t in self.anchor.items()},
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for n, t in state["anchor"].items():
            self.anchor[n].copy_(t)
        self.steps = int(state["steps"])
        self._mark()


class DiLoCo(LocalSGD):
    """Inner optimizer for H steps; outer Nesterov momentum on the averaged pseudo-gradient."""

    options: DiLoCoConfig

    def setup(
        self, model: nn.Module, total_steps: int, example: Batch, activations: ActivationMeter
    ) -> None:
        super().setup(model, total_steps, example, activations)
        self.outer_params = [
            nn.Parameter(t.clone(), requires_grad=False) for t in self.anchor.values()
        ]
        s = self.options
        self.outer = torch.optim.SGD(
            self.outer_params,
            lr=s.outer_lr,
            momentum=s.outer_momentum,
            nesterov=s.outer_momentum > 0,  # torch refuses Nesterov without momentum
        )

    def _apply_average(self, means: list[torch.Tensor]) -> None:
        """Outer step: the pseudo-gradient is minus the replicas' mean change."""
        for outer, m in zip(self.outer_params, means):
            outer.grad = -m.reshape(outer.shape)
        self.outer.step()
        for (_, p), outer in zip(self.params.items(), self.outer_params):
            p.copy_(outer)

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "outer_params": [p.detach().clone() for p in self.outer_params],
            "outer": self.outer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        with torch.no_grad():
            for p, t in zip(self.outer_params, state["outer_params"]):
                p.copy_(t)
        self.outer.load_state_dict(state["outer"])


class LocalSGDPlugin(plugin.Plugin):
    name = "local-sgd"
    description = "local SGD: workers step alone, parameters averaged every --sync-every steps"
    Config = LocalSGDConfig
    runtime = LocalSGD
    balance_modes = ("equal", "static", "auto")
    micro_batching = True
    recovers_in_place = True
    reads = (*plugin.Plugin.reads, *plugin.IN_PLACE_READS)

    def commits_every(self, job: JobConfig) -> int:
        return self.options(job).sync_every

    def check(self, job: JobConfig) -> None:
        """Checkpoints fall on synchronizations, where the replicas are one model."""
        super().check(job)
        opts = self.options(job)
        every, h = job.train.checkpoint_every, opts.sync_every
        if every % h:
            raise UserError(
                f"--checkpoint-every {every} must be a multiple of --sync-every {h} with "
                f"--strategy {self.name}: between synchronizations the replicas differ"
            )


class DiLoCoPlugin(LocalSGDPlugin):
    name = "diloco"
    description = (
        "DiLoCo: inner --optimizer (adamw, --lr 0.003) for --sync-every steps, "
        "outer Nesterov SGD on the averaged change"
    )
    Config = DiLoCoConfig
    runtime = DiLoCo
    default_optimizer = "adamw"
    default_lr = 0.003
