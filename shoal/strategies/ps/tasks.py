"""The coordinator's task queue: who holds which part of which global step.

Work is handed out one task at a time, in step order: part ``p`` of global step
``t``. A free worker takes the oldest task that is waiting, so a fast worker
takes on more of the job and a slow one less, and a task whose worker died goes
back to the front of the queue. A task is only handed out once the consistency
mode lets its parameters be read (:func:`~shoal.strategies.ps.consistency.read_bound`
on the steps *finished* so far), so a worker that holds a task never waits on
the servers, and a worker that waits, waits here, where a task coming back from
a dead worker can still reach it.

Each ``(step, part)`` finishes once: a second report of the same task (from a
worker dropped for silence that was not dead after all) is ignored, which is
what makes the per-epoch sample counts exact.

Checkpoints of the servers are taken at a step boundary: the queue holds back
every task from step ``c`` on (:attr:`TaskQueue.hold_at`) until all steps before
``c`` have finished, so every shard has applied exactly those. Restoring one
rolls the queue back to the same boundary (:meth:`TaskQueue.rollback`).
"""

from __future__ import annotations

import heapq
import time

from shoal.strategies.ps.consistency import read_bound

Task = tuple[int, int]
"""``(global step, part)``."""


class TaskQueue:
    """Tasks of ``total_steps`` global steps of ``parts`` parts each."""

    def __init__(self, total_steps: int, parts: int, mode: str, staleness: int) -> None:
        self.total_steps = total_steps
        self.parts = parts
        self.mode, self.staleness = mode, staleness
        self.fresh = 0  # index (step * parts + part) of the next never-issued task
        self.returned: list[Task] = []  # heap of tasks handed back by lost workers
        self.held: dict[int, set[Task]] = {}  # worker -> tasks it holds
        self.since: dict[Task, float] = {}  # when each held task was handed out (monotonic)
        self.finished_parts: dict[int, set[int]] = {}  # unfinished steps: parts done
        self.finished_through = -1  # every step up to here is finished
        self.hold_at: int | None = None  # no task of this step or later (a checkpoint is due)
        self.paused = False  # nothing at all (a server is being restored)

    @property
    def done(self) -> bool:
        return self.finished_through >= self.total_steps - 1

    def _next(self) -> Task | None:
        if self.returned:
            return self.returned[0]
        if self.fresh < self.total_steps * self.parts:
            return divmod(self.fresh, self.parts)
        return None

    def take(self, worker: int) -> Task | None:
        """The oldest task ``worker`` may start now, or ``None`` (wait, or nothing left)."""
        task = self._next()
        if task is None or self.finished_through < read_bound(self.mode, self.staleness, task[0]):
            return None
        if self.paused or (self.hold_at is not None and task[0] >= self.hold_at):
            return None
        if self.returned:
            heapq.heappop(self.returned)
        else:
            self.fresh += 1
        self.held.setdefault(worker, set()).add(task)
        self.since[task] = time.monotonic()
        return task

    def finish(self, worker: int, task: Task) -> bool:
        """``worker`` finished ``task``; ``True`` the first time that task finishes.

        Returns ``False`` for a task finished before, or never handed out.
        """
        self.held.get(worker, set()).discard(task)
        step, part = task
        if step <= self.finished_through or not 0 <= part < self.parts:
            return False
        if step * self.parts + part >= self.fresh:
            return False
        got = self.finished_parts.setdefault(step, set())
        if part in got:
            return False
        got.add(part)
        self.since.pop(task, None)
        for holder in self.held.values():  # handed out again meanwhile: no longer owed
            holder.discard(task)
        if task in self.returned:
            self.returned.remove(task)
            heapq.heapify(self.returned)
        while len(self.finished_parts.get(self.finished_through + 1, ())) == self.parts:
            self.finished_through += 1
            del self.finished_parts[self.finished_through]
        return True

    def rollback(self, step: int) -> None:
        """Back to the moment every step before ``step`` had finished and none after had
        been handed out (a checkpoint): everything later is to be done again."""
        self.fresh = step * self.parts
        self.returned = []
        self.held = {}
        self.since = {}
        self.finished_parts = {}
        self.finished_through = step - 1

    def oldest(self) -> tuple[int, Task, float] | None:
        """The task held longest: ``(worker, task, seconds held)``."""
        held = [(self.since[t], w, t) for w, ts in self.held.items() for t in ts if t in self.since]
        if not held:
            return None
        since, worker, task = min(held)
        return worker, task, time.monotonic() - since

    def lose(self, worker: int) -> list[Task]:
        """``worker`` is gone: its tasks go back to the front of the queue."""
        tasks = sorted(self.held.pop(worker, set()))
        for task in tasks:
            self.since.pop(task, None)
            heapq.heappush(self.returned, task)
        return tasks
