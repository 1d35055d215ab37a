"""Who is alive in a parameter-server job, as the coordinator judges it.

Workers and shards beat (``--heartbeat-timeout / 5``); the launcher of every
machine asks the coordinator for its verdicts every half second. A worker
silent for ``--heartbeat-timeout`` is dropped (its tasks go back to the queue,
its launcher kills it); a silent shard is killed by its launcher and restored
like a dead one, unless that launcher is silent too (the machine is gone: the
job cannot go on). A worker or shard never heard from gets
``--startup-timeout`` to begin.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from shoal.config import JobConfig
from shoal.strategies.ps.recovery import ShardTable

HEARTBEAT_LOST = -1000
"""The exit code recorded for a worker dropped for missing heartbeats."""


class Membership:
    """Who is alive: heartbeats of workers, shards and machines' launchers, and the
    verdicts the launchers ask for. ``on_lost(worker, exit_code)`` is called once for
    every worker that leaves the job badly (dead, dropped for silence or a late start)."""

    def __init__(
        self,
        job: JobConfig,
        shards: ShardTable,
        restoring: Callable[[int], bool],
        on_lost: Callable[[int, int], None],
    ) -> None:
        self.job, self.shards, self.restoring, self.on_lost = job, shards, restoring, on_lost
        self.last_seen: dict[int, float] = {}  # worker -> its last heartbeat
        self.shard_seen: dict[int, float] = {}  # shard -> its last heartbeat
        self.node_seen: dict[int, float] = {}  # node rank -> its launcher's last status call
        self.expected: dict[tuple[str, int], float] = {}  # not heard from yet: since when
        self.dropped: set[int] = set()  # dropped for silence, not yet reported dead
        self.dropped_shards: set[int] = set()  # silent: their node is to kill them
        self.dead: dict[int, int] = {}  # workers out of the job now: exit code
        self.left: set[int] = set()  # workers that finished and said goodbye
        self.failures: dict[int, list[int]] = {}  # every failure of each worker: exit codes
        self.checked_at = time.monotonic()  # of the last heartbeat check
        self.fatal = ""  # why the job cannot go on, once it cannot

    def expect(self, workers: int, shards: int) -> None:
        """From now on every worker and shard has to be heard from."""
        now = time.monotonic()
        for w in range(workers):
            self.expected.setdefault(("worker", w), now)
        for k in range(shards):
            self.expected.setdefault(("shard", k), now)

    def worker_seen(self, worker: int, starting: bool = False) -> None:
        """A heartbeat, or (``starting``) a worker asking for the shards: a restarted
        worker rejoins."""
        self.last_seen[worker] = time.monotonic()
        if starting:  # a new process: watched again, whatever the last one said or did
            self.left.discard(worker)
            if self.dead.pop(worker, None) is not None:
                print(f"shoal: worker {worker} rejoined", file=sys.stderr)

    def shard_registered(self, shard: int) -> None:
        self.shard_seen[shard] = time.monotonic()
        self.dropped_shards.discard(shard)

    def worker_died(self, worker: int, code: int) -> None:
        """Its launcher saw it exit badly."""
        self.dropped.discard(worker)
        if worker in self.dead:  # dropped for silence before: now its exit is known
            self.failures[worker][-1] = code
        self.worker_gone(worker, code)

    def all_workers_done(self, num_workers: int) -> bool:
        """Every worker has finished or died."""
        return num_workers > 0 and len(self.left | set(self.dead)) >= num_workers

    def check(self) -> None:
        """Drop a worker or shard that stopped beating (hung, cut off, or its whole machine
        is gone); one never heard from gets ``--startup-timeout`` to begin.

        Time the coordinator itself spent busy (a checkpoint, a restore) is not held
        against anyone: their beats were waiting in its socket."""
        now, timeout = time.monotonic(), self.job.strategy.heartbeat_timeout
        busy = now - self.checked_at - 1.0  # the loop comes round every 0.1 s when idle
        self.checked_at = now
        if busy > 0:
            for seen in (self.last_seen, self.shard_seen, self.node_seen, self.expected):
                for key in seen:
                    seen[key] += busy
        for worker, seen in list(self.last_seen.items()):
            if worker in self.left or worker in self.dead or now - seen <= timeout:
                continue
            silent = f"worker {worker} sent no heartbeat for {now - seen:.1f} s"
            print(f"shoal: warning: {silent}; dropped", file=sys.stderr)
            self.dropped.add(worker)
            self.worker_gone(worker, HEARTBEAT_LOST)
        for shard, seen in list(self.shard_seen.items()):
            if self.restoring(shard) or shard in self.dropped_shards or now - seen <= timeout:
                continue
            self._shard_silent(shard, now - seen)
        self._check_starts(now)

    def _check_starts(self, now: float) -> None:
        """Workers and shards that never said a word since the job started."""
        startup = self.job.cluster.startup_timeout
        for (role, rank), since in list(self.expected.items()):
            if role == "shard":
                heard = rank in self.shard_seen
            else:
                heard = rank in self.last_seen or rank in self.dead or rank in self.left
            if heard or now - since <= startup:
                if heard:
                    del self.expected[(role, rank)]
                continue
            del self.expected[(role, rank)]
            late = f"did not register within {startup:g} s (--startup-timeout)"
            if role == "worker":
                print(f"shoal: warning: worker {rank} {late}; dropped", file=sys.stderr)
                self.dropped.add(rank)
                self.worker_gone(rank, HEARTBEAT_LOST)
            else:
                self.fatal = self.fatal or f"server shard {rank} {late}"
                print(f"shoal: error: {self.fatal}", file=sys.stderr, flush=True)

    def _shard_silent(self, shard: int, silent_s: float) -> None:
        """A silent shard is killed by its machine's launcher and restored like a dead one;
        if that launcher is silent too, the machine is gone and the job cannot go on."""
        host = self.shards.addresses.get(shard, "?").removeprefix("tcp://").rsplit(":", 1)[0]
        node = self.shards.node.get(shard, 0)
        what = (
            f"server shard {shard} on {host} (node {node}) sent no heartbeat for {silent_s:.1f} s"
        )
        node_silent = time.monotonic() - self.node_seen.get(node, time.monotonic())
        if node_silent > self.job.strategy.heartbeat_timeout:
            self.fatal = self.fatal or f"{what}, and its machine is silent too: it is gone"
            print(f"shoal: error: {self.fatal}", file=sys.stderr, flush=True)
            return
        print(
            f"shoal: error: {what}; it is stopped, hung or cut off: restarting it",
            file=sys.stderr,
            flush=True,
        )
        self.dropped_shards.add(shard)

    def worker_gone(self, worker: int, exit_code: int) -> None:
        if worker in self.dead:
            return
        self.dead[worker] = exit_code
        self.failures.setdefault(worker, []).append(exit_code)
        self.on_lost(worker, exit_code)
