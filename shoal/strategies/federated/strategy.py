"""Federated averaging, simulated: every worker process trains its share of each
round's clients in turn, as Flower's simulation does, and the processes sum the
weighted updates.

A round (one global step of the job, so ``--steps`` counts rounds):

1. The round's clients are drawn (:func:`~.rounds.sample_clients`) and dealt out
   to the processes.
2. Each client starts from the global model with a fresh local optimizer (the
   job's ``--optimizer`` and ``--lr``), takes its local steps on its own rows
   (mean loss per batch; with FedProx, plus ``mu/2 |w - w_global|^2``), and its
   update is its change, weighted by its number of rows. A client that finishes
   after ``--round-deadline`` seconds of the round is left out, and counted.
3. The processes all-reduce the weighted sum of the changes and the weights; each
   applies the same server step (:mod:`~.server`), so every replica holds the
   global model.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import parameters_to_vector

from shoal.data import GlobalBatchSampler
from shoal.data import partition as partitions
from shoal.memory import ActivationMeter
from shoal.metrics import PhaseTimer
from shoal.optim import build_optimizer, build_scheduler
from shoal.strategies.base import Batch, LossFn, Strategy
from shoal.strategies.collectives import ring_allreduce_bytes
from shoal.strategies.federated.rounds import Federation, RoundWork
from shoal.strategies.federated.server import ServerOptimizer


class FedAvg(Strategy):
    """FedAvg, FedProx and FedOpt over simulated clients."""

    def setup(
        self, model: nn.Module, total_steps: int, example: Batch, activations: ActivationMeter
    ) -> None:
        o = self.options
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, self.job.optim)  # each client's, reset
        self.scheduler = build_scheduler(self.optimizer, self.job.optim, total_steps)
        self.server = ServerOptimizer(o.server_opt, o.server_lr, o.server_beta1, o.server_beta2,
                                      o.server_tau)  # fmt: skip
        self.federation = build_federation(self.job, self.data)
        self.work_: RoundWork | None = None
        self.rounds = self.client_updates = self.dropped = 0

    def work(self, sampler: GlobalBatchSampler, step: int, total_steps: int) -> RoundWork:
        self.work_ = RoundWork(self.federation, self.env.rank, self.env.world_size, step,
                               total_steps, self.job.train.log_every)  # fmt: skip
        return self.work_

    def train_step(
        self, batch: Batch, loss_fn: LossFn, loss_scale: float, timer: PhaseTimer
    ) -> torch.Tensor:
        assert self.work_ is not None and self.work_.current is not None
        task = self.work_.current
        deadline = self.options.round_deadline
        mu = self.options.prox_mu
        with torch.no_grad():
            global_x = parameters_to_vector(self.params).detach().clone()
        total = torch.zeros(global_x.numel() + 3, dtype=torch.float64, device=global_x.device)
        weighted, counts = total[:-3], total[-3:]  # counts: weight, reported, late
        loss_sum = torch.zeros((), dtype=torch.float64, device=global_x.device)
        x, y = batch
        offset, began, computed = 0, time.perf_counter(), 0.0
        for client in task.clients:
            with torch.no_grad():
                _load(self.params, global_x)
            anchor = [p.detach().clone() for p in self.params] if mu else []
            self.optimizer.state.clear()  # a fresh local optimizer per client
            for rows in client.batches:
                piece = (x[offset : offset + len(rows)], y[offset : offset + len(rows)])
                offset += len(rows)
                self.optimizer.zero_grad(set_to_none=True)
                start = timer.totals["forward_backward"]
                with timer.phase("forward_backward"):
                    losses = loss_fn(self.model, piece)
                    losses.mean().backward()
                computed += timer.totals["forward_backward"] - start
                with timer.phase("optimizer"), torch.no_grad():
                    for p, a in zip(self.params, anchor):  # FedProx: mu (w - w_global)
                        if p.grad is not None:
                            p.grad.add_(p - a, alpha=mu)
                    self.optimizer.step()
                loss_sum += losses.detach().sum()
            if deadline and time.perf_counter() - began > deadline:
                counts[2] += 1  # did not report in time: left out of the round
                continue
            with torch.no_grad():
                change = parameters_to_vector(self.params).detach() - global_x
            weighted.add_(change.double(), alpha=float(client.examples))
            counts[0] += client.examples
            counts[1] += 1
        self.compute_time = computed
        start = time.perf_counter()
        with timer.phase("comm"):
            if self.env.world_size > 1:
                dist.all_reduce(total)
                wire = ring_allreduce_bytes(total.numel() * total.element_size(),
                                            self.env.world_size)  # fmt: skip
                self.comm.add(sent=wire, received=wire)
        self.wait_time = time.perf_counter() - start
        with timer.phase("optimizer"), torch.no_grad():
            if counts[0] > 0:
                mean = (weighted / counts[0]).to(global_x.dtype)
                self.server.step(global_x, mean)
            _load(self.params, global_x)
            self.scheduler.step()
        self.rounds += 1
        self.client_updates += int(counts[1])
        self.dropped += int(counts[2])
        return loss_sum

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "server": self.server.state_dict(),
            "rounds": [self.rounds, self.client_updates, self.dropped],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.server.load_state_dict(state["server"])
        self.rounds, self.client_updates, self.dropped = state["rounds"]

    def totals(self) -> dict[str, float]:
        return {"rounds": self.rounds, "client_updates": self.client_updates,
                "dropped": self.dropped}  # fmt: skip

    def summarize(self, totals: list[Any]) -> dict[str, Any]:
        o, own = self.options, totals[0].own  # (every process saw the same counts)
        return {
            "federated": {
                "clients": o.clients,
                "clients_per_round": min(o.clients_per_round or o.clients, o.clients),
                "partition": o.partition,
                "server_opt": o.server_opt,
                "prox_mu": o.prox_mu,
                "rounds": int(own["rounds"]),
                "client_updates": int(own["client_updates"]),
                "dropped_late": int(own["dropped"]),
            }
        }


def _load(params: list[nn.Parameter], flat: torch.Tensor) -> None:
    """Copy ``flat`` into ``params`` (torch's ``vector_to_parameters`` would make the
    parameters views of ``flat``, which local steps would then change)."""
    offset = 0
    for p in params:
        p.copy_(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()


def build_federation(job: Any, data: Any) -> Federation:
    """The clients of ``job`` over the training rows of ``data``."""
    o = job.strategy.options
    spec = partitions.parse(o.partition)
    labels = None
    if spec.kind != "iid":
        labels = np.asarray(data.rows.take(np.arange(data.num_train))[1].cpu())
    parts = partitions.partition(spec, o.clients, data.num_train, labels, job.train.seed)
    per_round = o.clients_per_round or o.clients
    return Federation(parts, min(per_round, o.clients), job.train.batch_size, o.local_steps,
                      o.local_epochs, job.train.seed)  # fmt: skip
