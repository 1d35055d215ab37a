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

HEARTBEAT_LOST = -1000
"""The exit code recorded for a worker dropped for missing heartbeats."""


class Membership:
    """The coordinator's heartbeat checks (mixed into it): it works on ``last_seen``,
    ``shard_seen``, ``node_seen``, ``expected``, ``dropped``, ``dropped_shards``,
    ``dead``, ``left``, ``fatal`` and the queue (see
    :class:`~shoal.strategies.ps.coordinator.Coordinator`)."""

    def _check_heartbeats(self) -> None:
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
            self._worker_gone(worker, HEARTBEAT_LOST)
        for shard, seen in list(self.shard_seen.items()):
            if shard in self.restoring or shard in self.dropped_shards or now - seen <= timeout:
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
                self._worker_gone(rank, HEARTBEAT_LOST)
            else:
                self.fatal = self.fatal or f"server shard {rank} {late}"
                print(f"shoal: error: {self.fatal}", file=sys.stderr, flush=True)

    def _shard_silent(self, shard: int, silent_s: float) -> None:
        """A silent shard is killed by its machine's launcher and restored like a dead one;
        if that launcher is silent too, the machine is gone and the job cannot go on."""
        host = self.servers.get(shard, "?").removeprefix("tcp://").rsplit(":", 1)[0]
        node = self.shard_node.get(shard, 0)
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

    def _worker_gone(self, worker: int, exit_code: int) -> None:
        if worker in self.dead:
            return
        self.dead[worker] = exit_code
        self.failures.setdefault(worker, []).append(exit_code)
        if self.queue is not None:
            lost = self.queue.lose(worker)
            if lost:
                steps = ", ".join(f"{t}/{p}" for t, p in lost)
                print(
                    f"shoal: worker {worker}'s tasks (step/part) {steps} handed out again",
                    file=sys.stderr,
                )
            self._answer_tasks()
