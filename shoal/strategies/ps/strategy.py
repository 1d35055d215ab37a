"""``--strategy ps``: workers pull parameters, push gradients; servers apply them.

Processes: ``--servers K`` shards and ``--workers N`` workers per machine, plus
a coordinator thread inside node 0's ``shoal train`` (discovery, membership,
the task queue, telemetry, the final model and summary). The job walks the same
sequence of global steps as the collective strategies, each cut into N parts;
workers take parts from the coordinator's queue, so a fast worker does more of
them and a dead worker's parts are done by the others. ``bsp`` sums the parts
of a step into one update, so with server-side SGD it reproduces ``allreduce``
with SGD.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
import zmq
from torch import nn

from shoal.compress import COMPRESS_HELP, parse_codec
from shoal.config import option
from shoal.data import GlobalBatchSampler, Task
from shoal.errors import PeerRejected
from shoal.memory import ActivationMeter
from shoal.metrics import CommCounter, PhaseTimer
from shoal.models.sparse import SparseEmbedding
from shoal.net import wire
from shoal.net.peer import Peer, PeerError, PeerTimeout
from shoal.strategies.base import Batch, LossFn, Strategy
from shoal.strategies.ps import peers
from shoal.strategies.ps.client import Client, Heartbeat
from shoal.strategies.ps.optim import ServerOptimizer
from shoal.strategies.ps.placement import dense_plan, row_shard

ALIVE_CHECK_S = 30.0
"""A worker waiting for a task checks this often that the coordinator still answers."""
RESTORE_WAIT_S = 10.0
"""How long a worker that lost a shard waits for the coordinator to start its restore,
beyond the heartbeat timeout that names a silent shard."""


@dataclass
class PSConfig:
    """[strategy.ps]"""

    mode: str = option(
        "bsp",
        "consistency: bsp (lock step), asp (async), ssp (bounded staleness)",
        flag="--ps-mode",
        choices=("bsp", "asp", "ssp"),
    )
    staleness: int = option(
        3,
        "ssp: how many steps a task may run ahead of the oldest unfinished step",
        low=0,
        high=1 << 20,
        when="mode=ssp",
    )
    max_message_mb: float = option(
        1024.0,
        "largest message a server or the coordinator accepts, in MB",
        flag="--ps-max-message-mb",
        above=0,
        high=1 << 20,
    )
    compress: str = option("none", COMPRESS_HELP)


class Restored(PeerError):
    """The servers went back to a checkpoint while this worker waited on them."""


class TaskWork:
    """Tasks from the coordinator's queue (see :mod:`shoal.strategies.ps.tasks`).

    The telemetry of a finished task rides on the request for the next one, so
    a task costs one round trip to the coordinator. With ``lookahead`` the
    worker also holds the task after the current one when the queue can spare
    it at once, so that its rows can be prefetched.
    """

    def __init__(self, coordinator: Peer, worker: int, lookahead: bool) -> None:
        self.coordinator, self.worker, self.lookahead = coordinator, worker, lookahead
        self.sampler: GlobalBatchSampler | None = None  # set by ParameterServer.work
        self.reports: list[tuple[dict[str, Any], torch.Tensor]] = []
        self.ahead: Task | None = None
        self.current: Task | None = None
        self.generation = 0  # of the coordinator's latest answer: see Coordinator.generation
        self.current_generation = self.ahead_generation = 0
        self.finished = False  # the coordinator said the job is done (or this one dropped)

    def report(self, row: torch.Tensor, meta: dict[str, Any]) -> None:
        self.reports.append((meta, row.double()))

    def _ask(self, take: int, wait: bool) -> tuple[list[Task], bool]:
        reports, self.reports = self.reports, []
        header = {
            "op": "task",
            "worker": self.worker,
            "take": take,
            "wait": wait,
            "done": [meta for meta, _ in reports],
        }
        rid = self.coordinator.send(header, [row for _, row in reports])
        while True:
            try:
                reply, _ = self.coordinator.recv(rid, ALIVE_CHECK_S if wait else None)
                break
            except PeerTimeout:
                if not wait:
                    raise
                # parked for as long as the slowest task takes: just check the coordinator lives
                self.coordinator.call({"op": "status"}, timeout_s=ALIVE_CHECK_S)
        assert self.sampler is not None
        self.generation = int(reply.get("generation", 0))
        parts = int(reply["parts"])
        tasks = [self.sampler.task(int(s), int(p), parts) for s, p in reply["tasks"]]
        self.finished = self.finished or bool(reply["finished"])
        return tasks, bool(reply["finished"])

    def next(self) -> Task | None:
        if self.ahead is not None:
            self.current, self.ahead = self.ahead, None
            self.current_generation = self.ahead_generation
            tasks, finished = self._ask(1 if self.lookahead else 0, wait=False)
            if finished:  # the job is done, or this worker was dropped: the task is not ours
                self.current = None
                return None
            self.ahead, self.ahead_generation = (tasks[0] if tasks else None), self.generation
            return self.current
        tasks, finished = self._ask(2 if self.lookahead else 1, wait=True)
        if finished and not tasks:
            if self.reports:  # nothing should be left, but never drop telemetry
                self._ask(0, wait=False)
            self.current = None
            return None
        self.current = tasks[0]
        self.ahead = tasks[1] if len(tasks) > 1 else None
        self.current_generation = self.ahead_generation = self.generation
        return self.current

    def peek(self) -> Task | None:
        return self.ahead

    def log_now(self, step: int) -> bool:
        return True  # every task reports; the coordinator builds the log windows


class RemoteGatherer:
    """Telemetry goes to the coordinator, which writes; workers never write.

    Window rows ride on the next task request; totals are sent at once.
    """

    is_writer = False

    def __init__(self, coordinator: Peer, work: TaskWork, worker: int) -> None:
        self.coordinator = coordinator
        self.work = work
        self.worker = worker

    def gather(self, row: torch.Tensor, tag: str, meta: dict[str, Any] | None = None) -> None:
        if tag == "window":  # a task handed out before a restore is void: the tag says so
            self.work.report(row, {**(meta or {}), "generation": self.work.current_generation})
        return None

    def gather_object(self, obj: dict[str, Any], tag: str) -> None:
        if tag == "totals":
            self.coordinator.call({"op": "totals", "worker": self.worker, "totals": obj})
        return None


class ParameterServer(Strategy):
    """Data parallel through sharded parameter servers (bsp, asp or ssp)."""

    options: PSConfig

    def setup(
        self, model: nn.Module, total_steps: int, example: Batch, activations: ActivationMeter
    ) -> None:
        self.model = model
        self.total_steps = total_steps
        self.worker = self.env.rank
        secret = wire.load_secret()
        ctx = zmq.Context.instance()
        who = f"worker{self.worker}"
        # telemetry to the coordinator is not training traffic: its own counter
        self.coordinator = Peer(ctx, os.environ[peers.COORDINATOR_ENV], secret, who, CommCounter())
        self.heartbeat = Heartbeat(
            os.environ[peers.COORDINATOR_ENV],
            secret,
            f"heartbeat{self.worker}",
            {"op": "heartbeat", "worker": self.worker},
            self.job.strategy.heartbeat_timeout / 5,
        )
        self.secret = secret
        self.client = self._connect()
        self.client_generation = 0  # of the servers these connections reach
        num_shards = len(self.client.shards)
        self.num_shards = num_shards
        # embedding tables stay on the servers: rows are fetched per batch
        self.tables = {n: m for n, m in model.named_modules() if isinstance(m, SparseEmbedding)}
        for module in self.tables.values():
            module.attach(self._rows)
        self.table_names = {id(m): n for n, m in self.tables.items()}
        self.touched: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        self.prefetched: dict[tuple[str, int], tuple[torch.Tensor, list[int]]] = {}
        self.prefetches = any(m.input_ids is not None for m in self.tables.values())
        # under bsp the next step's tasks exist only once this one is done: no task ahead
        lookahead = self.prefetches and self.options.mode != "bsp"
        self.tasks = TaskWork(self.coordinator, self.worker, lookahead=lookahead)
        self.params = dict(model.named_parameters())
        plan = dense_plan([(n, p.numel()) for n, p in self.params.items()], num_shards)
        self.by_shard = [[s for s in plan if s.shard == k] for k in range(num_shards)]
        self.schedule = ServerOptimizer(self.job.optim, total_steps)
        self.codec = parse_codec(self.options.compress, seed=self.job.train.seed + self.worker)
        self.read_through = -1
        tables = [
            {"name": n, "dim": m.dim, "init_std": m.init_std, "seed": m.seed}
            for n, m in self.tables.items()
        ]
        with torch.no_grad():
            requests = [
                (
                    {
                        "op": "init",
                        "parts": self.parts,
                        "total_steps": total_steps,
                        "tables": tables,
                    },
                    [
                        *(
                            self.params[s.name].detach().reshape(-1)[s.start : s.stop]
                            for s in slices
                        ),
                        wire.strings_tensor([s.key for s in slices]),  # (long for big models)
                    ],
                )
                for slices in self.by_shard
            ]
        self.client.call_all(requests)

    def _connect(self) -> Client:
        """Connections to every shard, which give up waiting once a restore voids the task."""
        info, _ = self.coordinator.call({"op": "servers", "worker": self.worker})
        self.parts = int(info["parts"])  # the job's parts per step, however many workers now
        client = Client(
            info["servers"],
            info["targets"],
            self.secret,
            f"worker{self.worker}",
            self.comm,
            max_bytes=peers.max_message_bytes(self.job),
        )
        client.watch(self._check_restored)
        return client

    def _restored(self) -> bool:
        """Whether the servers were restored since the current task was handed out."""
        if self.tasks.current is None:  # setting up: nothing to void
            return False
        status, _ = self.coordinator.call({"op": "status"}, timeout_s=ALIVE_CHECK_S)
        self.tasks.generation = max(self.tasks.generation, int(status.get("generation", 0)))
        return self.tasks.generation != self.tasks.current_generation

    def _check_restored(self) -> None:
        if self._restored():
            raise Restored("the servers were restored from a checkpoint")

    def train_step(
        self, batch: Batch, loss_fn: LossFn, loss_scale: float, timer: PhaseTimer
    ) -> torch.Tensor:
        try:
            if self.tasks.current_generation != self.client_generation:
                self._reconnect()  # restored while this worker waited for its task
            return self._train_step(batch, loss_fn, loss_scale, timer)
        except (PeerError, PeerRejected) as e:
            self._recover(e)
        # A shard died and every shard went back to a checkpoint: this task is void (the
        # coordinator hands it out again).
        if self.tasks.ahead_generation != self.tasks.generation:
            self.tasks.ahead = None  # handed out before the restore: void as well
        return torch.zeros((), dtype=torch.float64)

    def _recover(self, error: Exception) -> None:
        """A shard was lost or refused this worker (it died, was stopped, or is being
        replaced): its launcher restarts it and the coordinator rolls every shard back.
        This worker waits for that restore and connects to the shards it brought back
        (again, should one of them be lost meanwhile) instead of exiting and being
        restarted itself. ``error`` is raised when no restore comes in time."""
        after = self.client_generation  # the connections that failed
        while True:
            if not self._await_restore(after):
                raise error
            after = self.tasks.generation
            try:
                self._reconnect()
                return
            except (PeerError, PeerRejected) as e:
                error = e

    def _await_restore(self, after: int) -> bool:
        """Wait for a restore newer than generation ``after``: a heartbeat timeout for a
        silent shard to be named, then :data:`RESTORE_WAIT_S` for the rollback to begin.
        ``False``: none came."""
        deadline = time.monotonic() + self.job.strategy.heartbeat_timeout + RESTORE_WAIT_S
        while True:
            status, _ = self.coordinator.call({"op": "status"}, timeout_s=ALIVE_CHECK_S)
            self.tasks.generation = max(self.tasks.generation, int(status.get("generation", 0)))
            if self.tasks.generation > after:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)

    def _reconnect(self) -> None:
        """A restarted shard is a new process: the old connections lead nowhere."""
        self.client.close()
        self.prefetched.clear()
        self.touched = []
        self.client = self._connect()
        self.client_generation = self.tasks.generation

    def _train_step(
        self, batch: Batch, loss_fn: LossFn, loss_scale: float, timer: PhaseTimer
    ) -> torch.Tensor:
        with timer.phase("comm"):
            self._pull()
        with timer.phase("forward_backward"):
            for p in self.params.values():
                p.grad = None
            loss_sum = loss_fn(self.model, batch).sum()
            (loss_sum * loss_scale).backward()
        with timer.phase("comm"):
            self._push()
            here = (self.task.step, self.task.part)
            for key in [k for k in self.prefetched if k[1:] == here]:  # fetched, not used
                for peer, rid in zip(self.client.shards, self.prefetched.pop(key)[1]):
                    peer.recv(rid)
        return loss_sum.detach()

    @property
    def task(self) -> Task:
        assert self.tasks.current is not None, "train_step outside a task"
        return self.tasks.current

    @torch.no_grad()
    def _pull(self) -> None:
        header = {
            "op": "pull",
            "step": self.task.step,
            "dense": True,
            "tables": [],
            "gen": self.tasks.current_generation,
        }
        replies = self.client.call_all([(header, [])] * len(self.by_shard))
        self.read_through = min(h["applied_through"] for h, _ in replies)
        for slices, (_, values) in zip(self.by_shard, replies):
            for s, v in zip(slices, values):
                self.params[s.name].view(-1)[s.start : s.stop].copy_(v)

    def _send_row_pulls(
        self, name: str, unique: torch.Tensor, step: int, generation: int
    ) -> list[int]:
        shard_of = row_shard(unique, self.num_shards)
        header = {"op": "pull", "step": step, "dense": False, "tables": [name], "gen": generation}
        return [
            peer.send(header, [unique[shard_of == k]]) for k, peer in enumerate(self.client.shards)
        ]

    def prefetch(self, batch: Batch) -> None:
        """Ask now for the rows the next task will touch.

        The trainer calls this after a step's push, so the rows hold this
        worker's own update, and they arrive while the next task is fetched and
        its dense parameters pulled.

        The queue hands out a task only once its step may read, so the shards
        answer at once, and the rows are never staler than the mode allows.
        """
        ahead = self.tasks.ahead
        if ahead is None:
            return
        for name, module in self.tables.items():
            if module.input_ids is not None:
                unique = torch.unique(module.input_ids(batch[0]))
                key = (name, ahead.step, ahead.part)
                rids = self._send_row_pulls(name, unique, ahead.step, self.tasks.ahead_generation)
                self.prefetched[key] = (unique, rids)

    def _rows(self, module: SparseEmbedding, ids: torch.Tensor) -> torch.Tensor:
        """Row source of the model's tables: this batch's distinct rows, once each."""
        name = self.table_names[id(module)]
        unique, inverse = torch.unique(ids, return_inverse=True)
        shard_of = row_shard(unique, self.num_shards)
        ahead = self.prefetched.pop((name, self.task.step, self.task.part), None)
        if ahead is not None and not torch.equal(ahead[0], unique):
            for peer, rid in zip(self.client.shards, ahead[1]):
                peer.recv(rid)  # not what this forward asked for: drain and pull afresh
            ahead = None
        rids = (
            ahead[1]
            if ahead is not None
            else self._send_row_pulls(name, unique, self.task.step, self.tasks.current_generation)
        )
        replies = [peer.recv(rid) for peer, rid in zip(self.client.shards, rids)]
        values = torch.empty(len(unique), module.dim, device=ids.device)
        for k, (_, (rows,)) in enumerate(replies):
            values[shard_of == k] = rows
        leaf = values.requires_grad_()
        self.touched.append((name, unique, leaf))
        return leaf[inverse]

    def _push(self) -> None:
        """Dense gradients by slice and the touched rows' gradients, one message per shard."""
        names: list[str] = []
        rows: list[list[torch.Tensor]] = [[] for _ in range(self.num_shards)]
        for name, unique, leaf in self.touched:
            grads = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
            shard_of = row_shard(unique, self.num_shards)
            names.append(name)
            for k in range(self.num_shards):
                mask = shard_of == k
                rows[k] += [unique[mask], grads[mask]]
        self.touched = []
        header = {
            "op": "push",
            "worker": self.worker,
            "step": self.task.step,
            "part": self.task.part,
            "read_through": self.read_through,
            "tables": names,
            "gen": self.tasks.current_generation,
        }
        if self.codec.name != "none":
            header["codec"] = self.codec.spec
        requests = []
        for slices, row_tensors in zip(self.by_shard, rows):
            grads = []
            for s in slices:
                g = self.params[s.name].grad
                grad = torch.zeros(s.numel) if g is None else g.reshape(-1)[s.start : s.stop]
                grads += self.codec.encode(s.key, grad).tensors  # error feedback per slice
            requests.append((header, grads + row_tensors))
        self.client.call_all(requests)

    def work(self, sampler: GlobalBatchSampler, step: int, total_steps: int) -> TaskWork:
        self.tasks.sampler = sampler
        return self.tasks

    def gatherer(self) -> RemoteGatherer:
        return RemoteGatherer(self.coordinator, self.tasks, self.worker)

    @property
    def lr(self) -> float:
        current = self.tasks.current
        return self.schedule.lr(current.step if current is not None else 0)

    def state_dict(self) -> dict[str, Any]:
        return {}  # the servers hold the parameters and optimizer state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        """Tell the coordinator this worker is done, if the job is: a worker that fails
        says nothing (its launcher reports it, and restarts it). Safe after a setup that
        failed half-way."""
        tasks = getattr(self, "tasks", None)
        try:
            if tasks is not None and tasks.finished:
                with contextlib.suppress(PeerError):  # (a coordinator that is gone: said before)
                    self.coordinator.call({"op": "leave", "worker": self.worker}, timeout_s=30)
        finally:
            if hasattr(self, "heartbeat"):  # only now: a slow goodbye must not look like a hang
                self.heartbeat.stop()
            if hasattr(self, "client"):
                self.client.close()
            if hasattr(self, "coordinator"):
                self.coordinator.close()
