"""DP-SGD for synchronous data parallel, through Opacus (Abadi et al. 2016).

``--strategy allreduce --dp-clip C`` runs this instead of DDP:

- The global batch of step ``t`` is drawn by Poisson sampling
  (:func:`shoal.privacy.poisson_rows`, rate ``--batch-size / rows``) and cut
  between the workers like any global batch: the same samples whatever the
  number of workers.
- Opacus's :class:`~opacus.GradSampleModule` gives every sample's gradient;
  Opacus's optimizer clips each to norm ``C`` and sums them, and, with several
  workers, its :class:`~opacus.optimizers.DistributedDPOptimizer` adds the noise
  on rank 0 only, before the sums are added over the workers (one flat bucket here,
  not a collective per tensor): noise is added once per global step, whatever the
  number of workers. The sum is divided by the
  expected batch size, as Opacus does.
- The noise and the Poisson samples come from the run's secret
  (:class:`shoal.privacy.Randomness`: ``os.urandom``, drawn by rank 0 and shared
  with the other ranks), never from the job's seed; the secret, the noise
  generator's state and the accountant's history are checkpointed, so a resumed
  run continues the same streams. Only ``--dp-insecure-seed`` draws them from
  ``--seed`` (then one worker and four draw the same noise).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from shoal import privacy
from shoal.data import GlobalBatchSampler, Task
from shoal.data.sampler import part_slice
from shoal.errors import UserError
from shoal.memory import ActivationMeter
from shoal.metrics import PhaseTimer
from shoal.optim import build_optimizer, build_scheduler
from shoal.strategies.base import Batch, LossFn, Strategy
from shoal.strategies.collectives import sum_over_ranks

# Opacus's per-sample hooks fire on the first layer, whose input needs no gradient
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients")


class PoissonWork:
    """Every step from ``step`` to ``total``: this rank's slice of a Poisson-sampled
    global batch."""

    def __init__(self, randomness: privacy.Randomness, rows: int, rate: float, rank: int,
                 world: int, step: int, total: int, log_every: int) -> None:  # fmt: skip
        self.randomness, self.rows, self.rate = randomness, rows, rate
        self.rank, self.world = rank, world
        self.step, self.total, self.log_every = step, total, log_every

    def _task(self, step: int) -> Task:
        batch = self.randomness.rows(step, self.rows, self.rate)
        mine = batch[part_slice(len(batch), self.rank, self.world)]
        return Task(step, self.rank, self.world, mine, max(1, len(batch)))

    def next(self) -> Task | None:
        if self.step >= self.total:
            return None
        self.step += 1
        return self._task(self.step - 1)

    def peek(self) -> Task | None:
        return self._task(self.step) if self.step < self.total else None

    def log_now(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.total


def _flat_optimizer() -> type:
    """Opacus's :class:`~opacus.optimizers.DistributedDPOptimizer` (noise on rank 0 only,
    then the noisy sums all-reduced) with the sums all-reduced as one flat bucket: Opacus
    all-reduces each parameter's gradient on its own, one blocking collective per tensor
    per step, which cost 2 workers three quarters of their throughput on a small model
    (and a small flat sum is all-gathered: :func:`~shoal.strategies.collectives.sum_over_ranks`).
    ``wire``: the bytes this rank sent in the last step's sum."""
    from opacus.optimizers import DistributedDPOptimizer

    class FlatDPOptimizer(DistributedDPOptimizer):
        def reduce_gradients(self) -> None:
            grads = [p.grad for p in self.params if p.requires_grad]
            flat = torch.cat([g.reshape(-1) for g in grads])
            self.wire = sum_over_ranks(flat, self.world_size)
            if self.loss_reduction == "mean":
                flat /= self.world_size
            for g, part in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(part.view_as(g))

    return FlatDPOptimizer


class DPSGD(Strategy):
    """Synchronous data parallel with per-sample clipping and Gaussian noise."""

    def setup(
        self, model: nn.Module, total_steps: int, example: Batch, activations: ActivationMeter
    ) -> None:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        t = self.job.train
        self.budget = privacy.budget(t)
        self.rate = min(1.0, t.batch_size / self.data.num_train)
        noise = privacy.noise_for(self.budget, self.rate, total_steps)
        self.accountant = privacy.Accountant(noise, self.rate, self.budget.delta, total_steps,
                                             self.budget)  # fmt: skip
        self.randomness = privacy.Randomness.draw(t, self.env)
        self.model = model
        self.sampled = GradSampleModule(model, loss_reduction="sum")
        self.generator = torch.Generator(self.env.device)
        self.generator.manual_seed(self.randomness.seed("noise"))
        world = self.env.world_size
        cls = _flat_optimizer() if world > 1 else DPOptimizer
        self.optimizer = cls(
            build_optimizer(model.parameters(), self.job.optim),
            noise_multiplier=noise,
            max_grad_norm=self.budget.clip,
            expected_batch_size=t.batch_size / world,  # (summed over the workers)
            loss_reduction="mean",
            generator=self.generator,
        )
        self.scheduler = build_scheduler(self.optimizer, self.job.optim, total_steps)

    def work(self, sampler: GlobalBatchSampler, step: int, total_steps: int) -> PoissonWork:
        t = self.job.train
        return PoissonWork(self.randomness, self.data.num_train, self.rate, self.env.rank,
                           self.env.world_size, step, total_steps, t.log_every)  # fmt: skip

    def train_step(
        self, batch: Batch, loss_fn: LossFn, loss_scale: float, timer: PhaseTimer
    ) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        with timer.phase("forward_backward"):
            loss_sum = loss_fn(self.sampled, batch).sum()
            loss_sum.backward()
        with timer.phase("optimizer"):
            self.optimizer.wire = 0
            self.optimizer.step()  # clip, sum, noise (rank 0), all-reduce, scale, step
            self.scheduler.step()
        self.comm.add(sent=self.optimizer.wire, received=self.optimizer.wire)
        self.accountant.step()
        return loss_sum.detach()

    def metrics(self) -> dict[str, float]:
        return {"epsilon": self.accountant.epsilon()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.original_optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "accountant": self.accountant.state_dict(),
            "noise_generator": self.generator.get_state(),
            "randomness": self.randomness.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "accountant" not in state or "randomness" not in state:
            raise UserError("--resume: the checkpoint was not written by DP-SGD (or by an "
                            "older shoal): it has no privacy accountant to continue")  # fmt: skip
        self.model.load_state_dict(state["model"])
        self.optimizer.original_optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.accountant.load_state_dict(state["accountant"])
        self.optimizer.noise_multiplier = self.accountant.noise
        self.randomness.load_state_dict(state["randomness"])
        if self.env.rank == 0 or not dist.is_initialized():
            self.generator.set_state(state["noise_generator"])

    def summarize(self, totals: list[Any]) -> dict[str, Any]:
        return {"privacy": {"level": "sample", **self.accountant.summary(self.budget.clip),
                            **self.randomness.summary()}}  # fmt: skip
