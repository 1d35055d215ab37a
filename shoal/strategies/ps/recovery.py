"""Server checkpoints and restores, as the coordinator runs them.

Shards checkpoint at step boundaries: the task queue holds back the tasks of
step ``c`` (:attr:`~shoal.strategies.ps.tasks.TaskQueue.hold_at`) until every
earlier step has finished, then every shard copies its state and writes it in
the background, and the coordinator keeps its own bookkeeping of that moment.
When a shard dies, every shard, the queue, the sample counts and
``metrics.jsonl`` go back to the newest checkpoint all shards have, under a new
*generation*: work handed out before is refused by the shards and ignored by
the coordinator. The coordinator's bookkeeping of each checkpoint is written
too (:func:`~shoal.strategies.ps.server.coordinator_dir`), so ``--resume``
starts a new job from the newest checkpoint every shard and the coordinator
have, on as many workers as it is given: the parts of a step stay those of the
first run, so the same samples make the same steps.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import zmq

from shoal import checkpoint
from shoal.config import JobConfig
from shoal.errors import UserError
from shoal.metrics import CommCounter
from shoal.net import wire
from shoal.net.peer import Peer, PeerError
from shoal.strategies.ps.server import coordinator_dir, shard_dir
from shoal.strategies.ps.tasks import TaskQueue


@dataclass
class ShardTable:
    """Where the job's server shards are, as they registered."""

    count: int = 0
    """How many the job has (known once every machine registered)."""
    addresses: dict[int, str] = field(default_factory=dict)
    targets: dict[int, str] = field(default_factory=dict)
    """Each shard's name at its door (see ``Server.target``): new for a replacement."""
    node: dict[int, int] = field(default_factory=dict)
    """The machine (node rank) that runs each shard."""

    def all_up(self) -> bool:
        return bool(self.count) and len(self.addresses) >= self.count


class Bookkeeping(Protocol):
    """What the coordinator counts, which a restore rolls back with the shards."""

    def snapshot(self) -> dict[str, Any]:
        """The counts at this moment, in plain types (they are saved)."""
        ...

    def rollback(self, saved: dict[str, Any], step: int) -> None:
        """Back to a :meth:`snapshot` taken at ``step``."""
        ...


class ShardRecovery:
    """Server checkpoints and restores: the coordinator's part, as an object of its own.

    It owns the snapshots of the coordinator's bookkeeping per checkpointed step, the
    *generation* (bumped by every restore: work handed out before is void), the shards
    being replaced, and its connections to the shards. It is told the shards
    (:class:`ShardTable`), the task queue, and what to roll back (:class:`Bookkeeping`).
    """

    def __init__(
        self,
        job: JobConfig,
        out: Path,
        total_steps: int,
        shards: ShardTable,
        books: Bookkeeping,
        ctx: zmq.Context,
        secret: bytes,
    ) -> None:
        self.job, self.out, self.total_steps = job, out, total_steps
        self.shards, self.books, self.ctx, self.secret = shards, books, ctx, secret
        self.generation = 0
        self.snapshots: dict[int, dict[str, Any]] = {}  # step -> bookkeeping at that step
        self.restoring: set[int] = set()  # shards whose replacement has not registered yet
        self.restore_step = 0
        self.restores: list[dict[str, int]] = []
        self.resumed_from: int | None = None  # --resume: the checkpoint's step
        self.peers: dict[int, Peer] = {}
        self.disk_full = False  # a checkpoint write failed for want of space (said once)
        self.on_shard_lost: Callable[[int], None] | None = None
        """Called with a shard that failed a request during a restore (to be killed)."""

    def shard(self, k: int) -> Peer:
        """The connection to shard ``k`` (made once, again after a replacement)."""
        if k not in self.peers:
            self.peers[k] = Peer(
                self.ctx,
                self.shards.addresses[k],
                self.secret,
                "coordinator",
                CommCounter(),
                timeout_s=120,
                target=self.shards.targets[k],
            )
        return self.peers[k]

    def close(self) -> None:
        for peer in self.peers.values():
            peer.close()
        self.peers = {}

    def maybe_checkpoint(self, q: TaskQueue) -> None:
        """Every shard snapshots itself once every step before ``hold_at`` has finished
        (and none after was handed out); the shards write in the background."""
        if q.hold_at is None or q.paused or q.finished_through != q.hold_at - 1:
            return
        step = q.hold_at
        try:
            for k in range(self.shards.count):
                self.shard(k).call({"op": "checkpoint", "step": step}, timeout_s=20)
        except PeerError as e:  # a shard is down: its restore will roll back to an older one
            print(f"shoal: warning: server checkpoint of step {step}: {e}", file=sys.stderr)
            q.hold_at = self.next_hold(step)
            return
        keep = max(1, self.job.train.keep_checkpoints)
        saved = {**self.books.snapshot(), "parts": q.parts, "num_servers": self.shards.count}
        self.snapshots[step] = saved  # restores read it from memory
        try:
            checkpoint.save(coordinator_dir(self.out), step, {"step": step, **saved}, keep)
        except OSError as e:  # a full disk: --resume cannot use this step; serving goes on
            if not self.disk_full:
                print(
                    f"shoal: warning: the coordinator cannot write its checkpoint of step "
                    f"{step} ({e.strerror}); it keeps serving tasks (said once)",
                    file=sys.stderr,
                )
            self.disk_full = True
        for old in sorted(self.snapshots)[:-keep]:
            del self.snapshots[old]
        q.hold_at = self.next_hold(step)

    def next_hold(self, step: int) -> int | None:
        """The checkpoint after ``step``: every ``--checkpoint-every`` steps, and the last
        step (a shard lost between the end and the final pull comes back whole)."""
        if step >= self.total_steps:
            return None
        return min(step + self.job.train.checkpoint_every, self.total_steps)

    def restorable(self, steps: list[int]) -> int:
        """The newest of ``steps`` whose checkpoint every shard has, whole and verified."""
        for step in sorted(steps, reverse=True):
            try:
                for k in range(self.shards.count):
                    checkpoint.load(checkpoint.step_path(shard_dir(self.out, k), step))
            except checkpoint.CheckpointError as e:
                print(f"shoal: warning: skipping server checkpoint: {e}", file=sys.stderr)
                continue
            return step
        raise wire.WireError("malformed", "no server checkpoint to restore from")

    def resume_point(self) -> tuple[int, dict[str, Any]]:
        """``--resume``: the newest checkpoint the coordinator and every shard have."""
        root = coordinator_dir(self.out)
        saved: dict[int, dict[str, Any]] = {}
        for path in checkpoint.list_checkpoints(root):
            try:
                saved[checkpoint.step_of(path)] = checkpoint.load(path)
            except checkpoint.CheckpointError as e:
                print(f"shoal: warning: skipping checkpoint {e}", file=sys.stderr)
        if not saved:
            raise UserError(f"no checkpoint to resume from in {root}")
        servers = {int(s["num_servers"]) for s in saved.values()}
        if servers != {self.shards.count}:
            raise UserError(
                f"the run had {servers.pop()} server shards and this job has "
                f"{self.shards.count}: resume with the same --servers"
            )
        try:
            step = self.restorable(list(saved))
        except wire.WireError:
            raise UserError("no server checkpoint that every shard has whole") from None
        return step, saved[step]

    def resume(self, q: TaskQueue, step: int, saved: dict[str, Any]) -> None:
        """Start from a checkpoint: every shard restores itself when it registers, and
        no task is handed out until all have."""
        self.snapshots = {step: saved}
        self.rollback(q, step)
        self.restore_step = step
        self.restoring = set(range(self.shards.count))
        q.paused = True
        self.resumed_from = step
        print(f"shoal: resuming from the server checkpoints of step {step}", file=sys.stderr)

    def server_died(self, q: TaskQueue | None, shard: int, code: int) -> dict[str, Any]:
        """Roll every shard and the queue back to the newest checkpoint; the shard's
        replacement restores itself when it registers. Until then no task is handed out."""
        if q is None or not self.snapshots:
            raise wire.WireError(
                "malformed", "no server checkpoint to restore from (--checkpoint-every)"
            )
        self.restoring.add(shard)
        self._forget(shard)
        for k in self._live():  # writes in flight on live shards: let them land
            self._ask(k, {"op": "flush"})
        step = self.restorable(list(self.snapshots))
        self.generation += 1
        self.restore_step = step
        q.paused = True
        for k in self._live():
            self._ask(k, {"op": "restore", "step": step, "generation": self.generation})
        self.rollback(q, step)
        self.restores.append({"shard": shard, "exit_code": code, "step": step})
        return {"op": "ok", "address": self.shards.addresses[shard], "step": step}

    def _live(self) -> list[int]:
        return [k for k in range(self.shards.count) if k not in self.restoring]

    def _forget(self, shard: int) -> None:
        old = self.peers.pop(shard, None)
        if old is not None:
            old.close()

    def _ask(self, k: int, request: dict[str, Any]) -> None:
        """A request to a live shard during a restore. One that fails it (it died, or hangs,
        meanwhile) is lost too: its launcher kills and restarts it (``on_shard_lost``), and
        its replacement restores itself like the first one's, instead of the job ending."""
        try:
            self.shard(k).call(request)
        except PeerError as e:
            print(
                f"shoal: error: server shard {k} failed during a restore ({e}): it is "
                "restarted and restored too",
                file=sys.stderr,
                flush=True,
            )
            self.restoring.add(k)
            self._forget(k)
            if self.on_shard_lost is not None:
                self.on_shard_lost(k)

    def registered(self, shard: int) -> bool:
        """A shard registered: whether it replaces a dead one (and restores itself)."""
        replaces = shard in self.restoring
        self.restoring.discard(shard)
        return replaces

    def rollback(self, q: TaskQueue, step: int) -> None:
        q.rollback(step)
        q.hold_at = self.next_hold(step)
        saved = self.snapshots[step]
        for later in [s for s in self.snapshots if s > step]:
            del self.snapshots[later]
        self.books.rollback(saved, step)
