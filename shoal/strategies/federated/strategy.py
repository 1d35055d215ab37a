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

import sys
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import parameters_to_vector

from shoal import privacy, secagg
from shoal.data import GlobalBatchSampler
from shoal.dist import DistEnv
from shoal.errors import UserError
from shoal.memory import ActivationMeter
from shoal.metrics import PhaseTimer
from shoal.optim import build_optimizer, build_scheduler
from shoal.strategies.base import Batch, LossFn, Strategy
from shoal.strategies.collectives import ring_allreduce_bytes
from shoal.strategies.federated.local import contribution, load_flat, train_client
from shoal.strategies.federated.rounds import RoundTask, RoundWork, build_federation
from shoal.strategies.federated.server import ServerOptimizer


class FedAvg(Strategy):
    """FedAvg, FedProx and FedOpt over simulated clients."""

    draws_global_batches = False

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
        self.budget = privacy.budget(self.job.train)
        self.federation = build_federation(self.job, self.data, self.budget.enabled)
        self.accountant: privacy.Accountant | None = None
        self.randomness: privacy.Randomness | None = None
        if self.budget.enabled:  # client-level: each round samples clients at rate q
            rate = self.federation.per_round / self.federation.clients
            noise = privacy.noise_for(self.budget, rate, total_steps)
            self.accountant = privacy.Accountant(noise, rate, self.budget.delta, total_steps,
                                                 self.budget)  # fmt: skip
            # the sample of clients and the noise: secret, never the job's seed
            self.randomness = privacy.Randomness.draw(self.job.train, self.env)
            self.federation.sample_seed = self.randomness.secret
        self.work_: RoundWork | None = None
        self.remote: Any = None
        if self.options.listen:  # clients on other machines
            from shoal.strategies.federated.remote import FederationServer

            numel = sum(p.numel() for p in self.params)
            self.remote = FederationServer(self.job, self.options.listen, numel)
            self.comm = self.remote.comm
        self.rounds = self.client_updates = self.dropped = self.aborted = 0
        self.begun: torch.Tensor | None = None  # the global model of a round under way

    def regroup(self, env: DistEnv) -> None:
        self.env = env  # (the next round deals its clients over the new group)

    @torch.no_grad()
    def rollback(self) -> None:
        """A round cut short (a process lost): the global model it started from."""
        if self.begun is not None:
            load_flat(self.params, self.begun)
            self.begun = None

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
            global_x = parameters_to_vector(self.params).detach().double()
        self.begun = global_x
        loss_sum = torch.zeros((), dtype=torch.float64, device=global_x.device)
        vectors: dict[int, torch.Tensor] = {}  # by client: its weighted change, weight, 1
        x, y = batch
        offset, began, computed, late = 0, time.perf_counter(), 0.0, 0
        if self.remote is not None:
            return self._finish_round(task, *self._serve(task, global_x), global_x, timer)
        for client in task.clients:
            pieces = []
            for rows in client.batches:
                pieces.append((x[offset : offset + len(rows)], y[offset : offset + len(rows)]))
                offset += len(rows)
            change, losses, seconds = train_client(
                self.model, self.params, self.optimizer, pieces, loss_fn, mu, global_x, timer
            )
            loss_sum += losses
            computed += seconds
            if deadline and time.perf_counter() - began > deadline:
                late += 1  # did not report in time: left out of the round
                continue
            vectors[client.client] = self._contribution(change, client.examples)
        self.compute_time = computed
        start = time.perf_counter()
        with timer.phase("comm"):
            total, late = self._aggregate(task, vectors, global_x.numel(), late)
        self.wait_time = time.perf_counter() - start
        return self._finish_round(task, total, loss_sum, late, global_x, timer)

    def _serve(self, task: RoundTask, global_x: torch.Tensor) -> tuple[torch.Tensor, Any, int]:
        """A round of clients on other machines: their changes, summed in client order
        (with secure aggregation: only their sum, unmasked by the server)."""
        if self.options.secure_agg:
            total = torch.zeros(global_x.numel() + 2, dtype=torch.float64)
            try:
                summed, loss_sum, late = self.remote.serve_secure_round(
                    task, global_x, self.lr, self.options.round_deadline
                )
                if summed is not None:
                    total = torch.from_numpy(secagg.decode(summed))
            except secagg.SecAggError as e:  # too many dropped: the round is lost
                self._lost(task, e)
                loss_sum, late = 0.0, len(task.clients)
            loss = torch.tensor(loss_sum, dtype=torch.float64)
            return total.to(global_x.device), loss, late
        changes, loss_sum, late = self.remote.serve_round(
            task, global_x, self.lr, self.options.round_deadline
        )
        total = torch.zeros(global_x.numel() + 2, dtype=torch.float64, device=global_x.device)
        for cid in sorted(changes):
            change, weight = changes[cid]
            total += self._contribution(change.to(global_x.device), weight)
        return total, torch.tensor(loss_sum, dtype=torch.float64), late

    def _finish_round(
        self,
        task: RoundTask,
        total: torch.Tensor,
        loss_sum: torch.Tensor,
        late: int,
        global_x: torch.Tensor,
        timer: PhaseTimer,
    ) -> torch.Tensor:
        """The server step on the round's sum (weighted changes, weight, reports)."""
        with timer.phase("optimizer"), torch.no_grad():
            if not bool(torch.isfinite(total).all()):  # (a client's huge, finite change)
                self._lost(task, ValueError("the round's sum is not finite"))
                total = torch.zeros_like(total)
            weight, reported = float(total[-2]), round(float(total[-1]))
            change = total[:-2]
            if self.accountant is not None:  # client-level DP: noise, a fixed denominator
                change += self._noise(task.step, change)
                weight = float(self.federation.per_round)
                self.accountant.step()
            if weight > 0:
                self.server.step(global_x, change / weight)
            load_flat(self.params, global_x)
            self.scheduler.step()
        self.rounds += 1
        self.client_updates += reported
        self.dropped += late
        self.begun = None
        return loss_sum

    def _contribution(self, change: torch.Tensor, examples: int) -> torch.Tensor:
        """What one client sends (:func:`~.local.contribution`)."""
        return contribution(change, examples, self.budget.clip if self.accountant else 0.0)

    def _noise(self, round_: int, like: torch.Tensor) -> torch.Tensor:
        """The round's Gaussian noise, std ``sigma * clip``: one draw from the run's secret
        and the round, the same on every process (added once to the round's sum)."""
        assert self.randomness is not None
        gen = torch.Generator().manual_seed(self.randomness.seed("client noise", round_))
        noise = torch.randn(like.shape, generator=gen, dtype=torch.float64)
        return noise.to(like.device) * (self.accountant.noise * self.budget.clip)

    def _aggregate(
        self, task: RoundTask, vectors: dict[int, torch.Tensor], length: int, late: int
    ) -> tuple[torch.Tensor, int]:
        """The round's sum over every process's reporting clients (length + 2: the
        weighted changes, the weight, the clients that reported) and its late clients."""
        if self.options.secure_agg:
            encoded = self._encode(task, vectors)
            late += len(vectors) - len(encoded)
            return self._secure_sum(task, encoded, length), _sum_int(late, self.env)
        total = torch.zeros(length + 3, dtype=torch.float64, device=self.env.device)
        for v in vectors.values():
            total[:-1] += v
        total[-1] = late
        if self.env.world_size > 1:
            dist.all_reduce(total)
            wire = ring_allreduce_bytes(total.numel() * 8, self.env.world_size)
            self.comm.add(sent=wire, received=wire)
        return total[:-1], int(total[-1])

    def _encode(self, task: RoundTask, vectors: dict[int, torch.Tensor]) -> dict[int, Any]:
        """Each client's contribution in fixed point; a client whose contribution cannot
        be (not finite, or too large for the round's sum) drops out, and is said."""
        out = {}
        for u, v in vectors.items():
            try:
                out[u] = secagg.encode(v.cpu().numpy(), summands=max(1, task.sampled))
            except ValueError as e:
                print(f"shoal: round {task.step + 1}: client {u} drops out: {e}",
                      file=sys.stderr, flush=True)  # fmt: skip
        return out

    def _secure_sum(self, task: RoundTask, encoded: dict[int, Any], length: int) -> torch.Tensor:
        """The sum by secure aggregation (:mod:`shoal.secagg`): rank 0 plays the server,
        and sees the clients' masked inputs and the shares it asks for, never an update.
        Clients that were late drop out after sharing their keys: their masks are
        removed with their peers' shares."""
        mine = {c.client: secagg.Client(c.client) for c in task.clients}
        keys = _merge(_all_gather({u: c.advertise() for u, c in mine.items()}, self.env))
        graph = secagg.graph_seed(self.job.train.seed, task.step)
        peers = secagg.neighbours(list(keys), graph)
        shared = {u: _refusable(c.share_keys, keys, peers[u], graph) for u, c in mine.items()}
        mail = _merge(_all_gather({u: m for u, m in shared.items() if m is not None}, self.env))
        for v, c in mine.items():
            c.receive({u: out[v] for u, out in mail.items() if v in out})
        masked = {u: _refusable(mine[u].masked_input, x) for u, x in encoded.items()}
        masked = {u: y for u, y in masked.items() if y is not None}
        self.comm.add(sent=sum(m.nbytes for m in masked.values()))
        inputs = _gather0(masked, self.env)
        sent = _broadcast0(sorted(inputs) if inputs is not None else None, self.env)
        answers = {v: _refusable(c.unmask, sent) for v, c in mine.items() if v in sent}
        answers = _gather0({v: a for v, a in answers.items() if a is not None}, self.env)
        total = torch.zeros(length + 2, dtype=torch.float64)
        if inputs is not None and encoded and not inputs:
            self._lost(task, secagg.SecAggError("every client refused to send a masked input"))
        if inputs is not None and answers is not None and inputs:
            try:
                summed = secagg.unmask_sum(inputs, keys, peers, set(keys), answers)
                total = torch.from_numpy(secagg.decode(summed))
            except secagg.SecAggError as e:  # too many dropped: the round is lost
                self._lost(task, e)
        total = total.to(self.env.device)
        if self.env.world_size > 1:
            dist.broadcast(total, 0)
        return total

    def _lost(self, task: RoundTask, error: Exception) -> None:
        """A round whose sum could not be unmasked, or is not finite: counted, said, the
        model unchanged."""
        self.aborted += 1
        print(f"shoal: round {task.step + 1} leaves the model as it was: {error}",
              file=sys.stderr, flush=True)  # fmt: skip

    def close(self) -> None:
        if self.remote is not None:
            if not self.remote.finished:  # the clients that ask now hear that the job is done
                self.remote.finish()
            self.remote.close()
            self.remote = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "server": self.server.state_dict(),
            "rounds": [self.rounds, self.client_updates, self.dropped],
            **({"accountant": self.accountant.state_dict()} if self.accountant else {}),
            **({"randomness": self.randomness.state_dict()} if self.randomness else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.server.load_state_dict(state["server"])
        self.rounds, self.client_updates, self.dropped = state["rounds"]
        self.begun = None  # (no round under way in a state handed over)
        if self.accountant is not None and self.randomness is not None:
            if "accountant" not in state or "randomness" not in state:
                raise UserError("--resume: the checkpoint has no privacy accountant to "
                                "continue (it was trained without --dp-clip)")  # fmt: skip
            self.accountant.load_state_dict(state["accountant"])
            self.randomness.load_state_dict(state["randomness"])
            self.federation.sample_seed = self.randomness.secret

    def metrics(self) -> dict[str, float]:
        return {"epsilon": self.accountant.epsilon()} if self.accountant is not None else {}

    def totals(self) -> dict[str, float]:
        return {"rounds": self.rounds, "client_updates": self.client_updates,
                "dropped": self.dropped, "aborted": self.aborted}  # fmt: skip

    def summarize(self, totals: list[Any]) -> dict[str, Any]:
        o, own = self.options, totals[0].own  # (every process saw the same counts)
        if self.remote is not None:  # its last seconds' answers first: what it refuses
            self.remote.finish()  # then is in the summary too
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
                "secure_agg": o.secure_agg,
                "rounds_unmasked_failed": int(own.get("aborted", 0)),
                **({"refused": self.remote.refused(), "re_handed": self.remote.re_handed}
                   if self.remote is not None else {}),
            },
            **({"privacy": {"level": "client", **self.accountant.summary(self.budget.clip),
                            **self.randomness.summary()}}
               if self.accountant is not None and self.randomness is not None else {}),
        }  # fmt: skip


def _refusable(step: Any, *args: Any) -> Any:
    """A client's step of secure aggregation, or ``None`` where the client refuses what it
    was asked (:class:`~shoal.secagg.SecAggError`): it drops out of the round."""
    try:
        return step(*args)
    except secagg.SecAggError:
        return None


def _all_gather(obj: Any, env: Any) -> list[Any]:
    if env.world_size == 1:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def _merge(parts: list[dict]) -> dict:
    return {k: v for part in parts for k, v in part.items()}


def _gather0(obj: dict, env: Any) -> dict | None:
    """Every process's ``obj`` merged on rank 0 (``None`` elsewhere)."""
    if env.world_size == 1:
        return dict(obj)
    out: list[Any] | None = [None] * env.world_size if env.rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return _merge(out) if out is not None else None


def _broadcast0(obj: Any, env: Any) -> Any:
    if env.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _sum_int(n: int, env: Any) -> int:
    if env.world_size == 1:
        return n
    t = torch.tensor([float(n)], dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return int(t.item())
