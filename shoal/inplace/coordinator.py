"""The launcher's side of an in-place job: deciding each generation from what the workers
wrote in the store and which processes are alive."""

from __future__ import annotations

import json
import time

import torch.distributed as dist

from shoal.inplace import protocol as p


class Coordinator:
    """Forms the generations of a job of ``slots`` workers.

    The launcher tells it which processes it started (:meth:`started`) and which
    exited (:meth:`exited`), and calls :meth:`tick` often; ``timeout_s`` is how long
    the living members have, once one of them stopped, to stop too before those
    still silent are judged hung (:meth:`tick` returns them, for the launcher to kill).
    """

    def __init__(
        self,
        store: dist.Store,
        slots: int,
        timeout_s: float,
        replicas: list[list[int]] | None = None,
    ) -> None:
        self.store = dist.PrefixStore(p.PREFIX, store)
        self.slots = slots
        self.replicas = replicas
        """For a job whose state is sharded, the ranks that hold each shard: every
        generation then has every slot filled (after a loss the living wait for a
        replacement), in the same places."""
        self.timeout_s = timeout_s
        self.alive: list[str] = []  # started and not exited, in the order started
        self.ready: list[str] = []  # ready to join, not members (newcomers, spares)
        self.finished: set[str] = set()
        self.current: p.Generation | None = None
        self.history: list[p.Generation] = []
        self._first_stop: float | None = None

    def started(self, uid: str) -> None:
        self.alive.append(uid)

    def exited(self, uid: str, code: int) -> None:
        if uid in self.alive:
            self.alive.remove(uid)
        if uid in self.ready:
            self.ready.remove(uid)
        if code == 0:
            self.finished.add(uid)

    @property
    def done(self) -> bool:
        """Every member of the newest generation finished."""
        g = self.current
        return g is not None and all(u in self.finished for u in g.members)

    @property
    def settled(self) -> bool:
        """No member of the newest generation is lost (none waits for the next one)."""
        g = self.current
        return g is not None and all(u in self.alive or u in self.finished for u in g.members)

    def members(self) -> list[str]:
        return list(self.current.members) if self.current else []

    def tick(self) -> list[str]:
        """Take in what changed; form the next generation when it is due. Returns the
        members judged hung (to be killed)."""
        self._take_ready()
        g = self.current
        if g is None:
            # the first workers' slots, in slot order (the ranks of a run without
            # recovery); spares stand in only for one that is gone before it begins
            first = [u for u in self.ready if _slot(u) < self.slots]
            if len(first) < self.slots and any(_slot(u) < self.slots for u in self.alive
                                               if u not in first):  # fmt: skip
                return []
            if len(self.ready) >= self.slots:
                spares = [u for u in self.ready if u not in first]
                self._form(sorted([*first, *spares][: self.slots], key=_slot), step=-1)
            return []
        if any(u in self.finished for u in g.members):
            return []  # (the job is ending: its members finish)
        living = [u for u in g.members if u in self.alive]
        gone = [u for u in g.members if u not in self.alive and u not in self.finished]
        wanted = bool(gone) or (bool(self.ready) and len(living) < self.slots)
        if not wanted:
            return []
        self.store.set(p.pending_key(g.number), "1")  # (those not in a broken collective)
        stopped = {}
        for u in living:
            if self.store.check([p.stopped_key(g.number, u)]):
                stopped[u] = json.loads(self.store.get(p.stopped_key(g.number, u)))
        if stopped and self._first_stop is None:
            self._first_stop = time.monotonic()
        silent = [u for u in living if u not in stopped]
        if silent:
            late = self._first_stop is not None
            if late and time.monotonic() - self._first_stop > self.timeout_s:
                return silent
            return []
        if not living:  # nobody holds the state: the newcomers restore the checkpoint
            whole = self.replicas is None or len(self.ready) >= self.slots
            if self.ready and whole:  # (in slot order, as the first generation)
                self._form(sorted(self.ready[: self.slots], key=_slot), step=-1, lost=gone)
            return []
        if self.replicas is not None and len(living) + len(self.ready) < self.slots:
            return []  # (a replacement is on its way)
        step = max(s["step"] for s in stopped.values())
        source = next(u for u in living if stopped[u]["step"] == step)
        joiners = self.ready[: self.slots - len(living)]
        behind = [u for u in living if stopped[u]["step"] < step]
        self._form(_fill(g.members, living, joiners), step, source, joiners + behind, gone)
        return []

    def lost_shard(self) -> int | None:
        """A shard of which no living member of the newest generation holds a copy (its
        state is gone: the job starts again from its newest checkpoint), if any."""
        g = self.current
        if g is None or self.replicas is None:
            return None
        held = {r for r, u in enumerate(g.members) if u in self.alive or u in self.finished}
        return next((i for i, ranks in enumerate(self.replicas) if not held & set(ranks)), None)

    def _take_ready(self) -> None:
        members = set(self.current.members) if self.current else set()
        for u in self.alive:
            if u not in self.ready and u not in members and self.store.check([p.ready_key(u)]):
                self.ready.append(u)

    def _form(
        self,
        members: list[str],
        step: int,
        source: str = "",
        needs_state: list[str] | None = None,
        lost: list[str] | None = None,
    ) -> None:
        number = self.current.number + 1 if self.current else 0
        gen = p.Generation(number, list(members), step, source, needs_state or [], lost or [])
        self.store.set(p.generation_key(number), gen.to_json())
        self.store.set(p.LATEST, str(number))
        self.ready = [u for u in self.ready if u not in gen.members]
        self.current, self._first_stop = gen, None
        self.history.append(gen)


def _fill(members: list[str], living: list[str], joiners: list[str]) -> list[str]:
    """The next generation's members: each joiner takes a lost member's place (its rank,
    so the survivors keep theirs and each rank's slice of a step stays where it was), a
    replacement the place of the worker it replaces (its own slot's) first, then the
    living close up."""
    waiting = list(joiners)
    placed = [u if u in living else "" for u in members]
    for i, u in enumerate(members):  # a replacement: its own slot's place
        mine = [j for j in waiting if _slot(j) == _slot(u)]
        if not placed[i] and mine:
            placed[i] = mine[0]
            waiting.remove(mine[0])
    for i in range(len(placed)):  # a spare: any other
        if not placed[i] and waiting:
            placed[i] = waiting.pop(0)
    return [u for u in placed if u] + waiting


def _slot(uid: str) -> int:
    return int(uid.split(".")[0])
