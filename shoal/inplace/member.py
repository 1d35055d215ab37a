"""A worker's side of an in-place job: joining a generation, leaving it, and the
boundaries at which the members agree to regroup."""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta

import torch.distributed as dist

from shoal.inplace import protocol as p


class Excluded(Exception):
    """This process is not a member of the job's newest generation (it was judged hung,
    or came back after the others went on without it)."""


class Member:
    """This worker's membership of an in-place job, through the launcher's store.

    ``timeout_s`` bounds every collective of a generation's group (a member that does
    not take part in one for that long is dropped) and the wait for the next
    generation's group to form; ``check_every``: the steps between the boundaries at
    which a waiting newcomer is taken in."""

    def __init__(self, timeout_s: float, check_every: int = 10) -> None:
        host, port = os.environ[p.STORE_ENV].rsplit(":", 1)
        self.uid = os.environ[p.UID_ENV]
        self.timeout_s = timeout_s
        self.check_every = max(1, check_every)
        self.base = dist.TCPStore(
            host, int(port), is_master=False, timeout=timedelta(seconds=timeout_s)
        )
        self.store = dist.PrefixStore(p.PREFIX, self.base)
        self.generation: p.Generation | None = None

    @property
    def rank(self) -> int:
        assert self.generation is not None
        return self.generation.members.index(self.uid)

    @property
    def size(self) -> int:
        assert self.generation is not None
        return len(self.generation.members)

    def join(self) -> p.Generation:
        """Say this process is ready, then wait for the first generation that counts it
        a member and join that generation's process group."""
        self.store.set(p.ready_key(self.uid), "1")
        number = int(self.store.get(p.LATEST)) if self.store.check([p.LATEST]) else 0
        while True:
            gen = self._wait(number)
            if self.uid in gen.members:
                return self._enter(gen)
            number += 1

    def leave(self, step: int, why: str) -> p.Generation:
        """Leave the current generation, every step before ``step`` committed here (its
        group is destroyed at once: the members still waiting in one of its collectives
        see it break), and join the next one. Raises :class:`Excluded` if this process
        is not in it."""
        assert self.generation is not None
        number = self.generation.number
        if dist.is_initialized():
            dist.destroy_process_group()
        record = json.dumps({"step": step, "why": why, "at": time.time()})
        self.store.set(p.stopped_key(number, self.uid), record)
        gen = self._wait(number + 1)
        if self.uid not in gen.members:
            raise Excluded(
                f"generation {gen.number} of the job went on without {self.uid} "
                f"(from step {gen.step})"
            )
        return self._enter(gen)

    def due(self, step: int) -> bool:
        """Whether the members leave their generation after ``step`` because a newcomer
        waits: asked every :attr:`check_every` steps, the same answer on every member
        (the first to ask decides, from what the launcher said)."""
        if step % self.check_every:
            return False
        assert self.generation is not None
        number = self.generation.number
        mine = "1" if self.store.check([p.pending_key(number)]) else "0"
        return self.store.compare_set(p.cut_key(number, step), "", mine) == b"1"

    def _wait(self, number: int) -> p.Generation:
        key = p.generation_key(number)
        self.store.wait([key], timedelta(seconds=max(600.0, self.timeout_s)))
        return p.Generation.from_json(self.store.get(key))

    def _enter(self, gen: p.Generation) -> p.Generation:
        if dist.is_initialized():
            dist.destroy_process_group()
        dist.init_process_group(
            "gloo",
            store=dist.PrefixStore(p.group_prefix(gen.number), self.store),
            rank=gen.members.index(self.uid),
            world_size=len(gen.members),
            timeout=timedelta(seconds=self.timeout_s),
        )
        self.generation = gen
        return gen
