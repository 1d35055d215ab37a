"""A trainer's side of in-place recovery (``--recovery inplace``, :mod:`shoal.inplace`):
joining a generation, committing steps, and regrouping when a member is lost or a
newcomer waits. :class:`Regrouping` is a part of :class:`shoal.trainer.Trainer`, kept
apart from its training loop: it reads and sets the trainer's environment, strategy,
sampler, balancer and writer."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from shoal import balance
from shoal.data import Task, Work
from shoal.dist import DistEnv
from shoal.inplace import state as inplace_state
from shoal.inplace.protocol import Generation
from shoal.writer import RunWriter


class NewcomerWaits(Exception):
    """The members of an in-place job leave their generation at this step boundary: a
    newcomer is ready to join."""

    def __init__(self, step: int) -> None:
        super().__init__(f"a newcomer joins after step {step}")


class Regrouping:
    """The in-place part of a trainer (see the module). What it uses of the trainer:"""

    job: Any
    env: DistEnv
    member: Any  # (a shoal.inplace.member.Member in an in-place job, else None)
    strategy: Any
    sampler: Any
    balancer: Any
    balancing: bool
    gatherer: Any
    writer: RunWriter | None
    total_steps: int
    step: int
    taken: list[Task]
    ledger: inplace_state.Ledger
    regroups: list[dict[str, Any]]
    sent: int
    state_s: float
    prior_samples: dict[int, int]
    prior_digests: dict[int, int]
    wall_offset: float
    resumed_from: int | None

    def wall_time(self) -> float:
        raise NotImplementedError

    def join(self) -> DistEnv:
        """An in-place job's worker, its job built: wait to be taken into a generation
        and take its place there. Returns this process's place in the group."""
        assert self.member is not None
        self._adopt(self.member.join())
        return self.env

    def _committed(self, task: Task) -> None:
        """``task`` is done here; if the strategy's state after it is one every member
        agrees on (:meth:`~shoal.strategies.base.Strategy.consistent_after`), its step and
        every step before it are committed: their whole batches count (in-place jobs)."""
        if self.member is not None and self.strategy.draws_global_batches:
            epoch, at = divmod(task.step, self.sampler.steps_per_epoch)
            # (its batch is in the sampler's cache now)
            self.ledger.trained(task.step, epoch, self.sampler.global_indices(epoch, at))
        if not self.strategy.consistent_after(task.step + 1):
            return
        self.taken = [t for t in self.taken if t.step > task.step]
        self.ledger.commit(task.step)

    def _regroup(self, why: str) -> Work:
        """The generation ended (a member is lost, or a newcomer waits): leave it with
        the steps committed here, take this process's place in the next one and go on
        from its first step."""
        assert self.member is not None
        began = time.perf_counter()
        self.strategy.release()  # (its hold on the group would keep the group's sockets open)
        committed = min((t.step for t in self.taken), default=self.step)
        gen = self.member.leave(committed, why)
        grouped = time.perf_counter()
        self._adopt(gen)
        self.regroups.append({
            "generation": gen.number, "step": gen.step, "members": len(gen.members),
            "why": why, "stall_s": time.perf_counter() - began, "state_bytes": self.sent,
            "group_s": grouped - began, "state_s": self.state_s,
        })  # fmt: skip
        return self.strategy.work(self.sampler, self.step, self.total_steps)

    def _adopt(self, gen: Generation) -> None:
        """Take this process's place in ``gen``: its group, the state where this process
        lacks it, the data it trains from ``gen.step`` on and the counts of lost members."""
        assert self.member is not None
        self.env = dataclasses.replace(self.env, rank=self.member.rank, world_size=self.member.size)
        self.state_s = 0.0
        if gen.step >= 0:
            self._pass_state(gen)
        self.strategy.regroup(self.env)
        self.gatherer = self.strategy.gatherer()
        dp_rank, dp_size = self.strategy.data_rank
        self.sampler.rank, self.sampler.world_size = dp_rank, dp_size
        self.balancer = balance.Balancer(
            self.balancer.spec, dp_size, dp_rank, self.job.train.balance_every
        )
        if self.balancing:
            self.sampler.cut = self.balancer.sizes
        if gen.step >= 0 and gen.lost:  # (else the lost samples are as they were: see
            self._fold()  # Ledger.load)
        if self.gatherer.is_writer and self.writer is None and gen.number > 0:
            self.writer = RunWriter(self.job, self.total_steps, self.step)  # (the writer was lost)
            self.writer.start(f"{self.job.strategy.name} x{self.env.world_size}", self.step)

    def _pass_state(self, gen: Generation) -> None:
        """The source sends the model, optimizer, RNG and data position to the members
        that need them (newcomers, members a step behind); the others untake the tasks
        of steps from ``gen.step`` on (they are trained again)."""
        assert self.member is not None
        uid, source = self.member.uid, gen.members.index(gen.source)
        self.sent, began = 0, time.perf_counter()
        if uid not in gen.needs_state:  # back to its newest committed step, gen.step
            for task in self.taken:  # begun, never committed: not trained
                if self.strategy.draws_global_batches:
                    self.sampler.untake(task)
            self._at(gen.step)
            self.strategy.rollback()
        # (a member lost meanwhile breaks what follows: this process is at a committed
        # step whatever it raises, and leaves for the next generation from there)
        if uid == gen.source and gen.needs_state:
            to = [gen.members.index(u) for u in gen.needs_state]
            lent = self.strategy.lent_state()
            if lent is None:  # (the live state: sent while this process waits)
                self.sent = inplace_state.send(self._live_state(), to)
            else:  # (copies that stay as they are: sent while this process trains on)
                posted = inplace_state.post(self._live_state(lent), to)
                self.sent = posted.bytes
                self.strategy.lend(posted)
        if uid in gen.needs_state:
            self._take_live_state(inplace_state.receive(source))
            self._at(gen.step)
        self.state_s = time.perf_counter() - began

    def _at(self, step: int) -> None:
        """This process's state is that after ``step`` committed steps."""
        self.taken = []
        self.ledger.drop()
        self.step = step
        self.sampler.seek(step)

    def _live_state(self, strategy: dict[str, Any] | None = None) -> dict[str, Any]:
        return {
            "strategy": self.strategy.state_dict() if strategy is None else strategy,
            "rng": torch.get_rng_state(),
            "whole": self.ledger.state(),
            "prior": [list(self.prior_samples.items()), list(self.prior_digests.items())],
            "wall_time": self.wall_time(),  # (only a member in run() is a source)
            "resumed_from": -1 if self.resumed_from is None else self.resumed_from,
        }

    def _take_live_state(self, state: dict[str, Any]) -> None:
        self.strategy.load_state_dict(state["strategy"])
        torch.set_rng_state(state["rng"])
        self.ledger.load(state["whole"])
        self.prior_samples, self.prior_digests = (
            {int(k): int(v) for k, v in pairs} for pairs in state["prior"]
        )
        self.wall_offset = float(state["wall_time"])
        self.resumed_from = None if state["resumed_from"] < 0 else int(state["resumed_from"])

    def _fold(self) -> None:
        """Count the samples lost members trained in committed steps: the committed
        batches less what the members trained (collective)."""
        own = (self.sampler.samples_seen, self.sampler.digests)
        self.ledger.fold(own)
