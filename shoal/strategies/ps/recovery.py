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
from collections import Counter
from typing import Any

from shoal import checkpoint
from shoal.errors import UserError
from shoal.metrics import CommCounter
from shoal.strategies.ps import wire
from shoal.strategies.ps.client import Peer, PeerError
from shoal.strategies.ps.server import coordinator_dir, shard_dir


class ShardRecovery:
    """The coordinator's part in server checkpoints and restores (mixed into it).

    It works on the coordinator's state: ``queue``, ``servers``, ``num_servers``,
    ``snapshots``, ``restoring``, ``generation``, the counters it rolls back and
    ``telemetry`` (see :class:`~shoal.strategies.ps.coordinator.Coordinator`).
    """

    def _shard(self, k: int) -> Peer:
        if k not in self.shard_peers:
            self.shard_peers[k] = Peer(
                self.ctx,
                self.servers[k],
                self.secret,
                "coordinator",
                CommCounter(),
                timeout_s=120,
                target=self.targets[k],
            )
        return self.shard_peers[k]

    def _bookkeeping(self) -> dict[str, Any]:
        """What the coordinator knows at a checkpoint (plain types: it is saved too)."""
        return {
            "counts": dict(self.counts),
            "tasks_done": dict(self.tasks_done),
            "samples_done": dict(self.samples_done),
            **self.telemetry.snapshot(),
            "parts": self.queue.parts,
            "num_servers": self.num_servers,
            "wall_time": self.wall_time(),
        }

    def _maybe_checkpoint(self) -> None:
        """Every shard snapshots itself once every step before ``hold_at`` has finished
        (and none after was handed out); the shards write in the background."""
        q = self.queue
        if q is None or q.hold_at is None or q.paused or q.finished_through != q.hold_at - 1:
            return
        step = q.hold_at
        try:
            for k in range(self.num_servers):
                self._shard(k).call({"op": "checkpoint", "step": step}, timeout_s=20)
        except PeerError as e:  # a shard is down: its restore will roll back to an older one
            print(f"shoal: warning: server checkpoint of step {step}: {e}", file=sys.stderr)
            q.hold_at = self._next_hold(step)
            return
        keep = max(1, self.job.train.keep_checkpoints)
        self.snapshots[step] = saved = self._bookkeeping()  # restores read it from memory
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
        q.hold_at = self._next_hold(step)

    def _next_hold(self, step: int) -> int | None:
        """The checkpoint after ``step``: every ``--checkpoint-every`` steps, and the last
        step (a shard lost between the end and the final pull comes back whole)."""
        if step >= self.total_steps:
            return None
        return min(step + self.job.train.checkpoint_every, self.total_steps)

    def _restorable(self, steps: list[int]) -> int:
        """The newest of ``steps`` whose checkpoint every shard has, whole and verified."""
        for step in sorted(steps, reverse=True):
            try:
                for k in range(self.num_servers):
                    checkpoint.load(checkpoint.step_path(shard_dir(self.out, k), step))
            except checkpoint.CheckpointError as e:
                print(f"shoal: warning: skipping server checkpoint: {e}", file=sys.stderr)
                continue
            return step
        raise wire.WireError("malformed", "no server checkpoint to restore from")

    def _resume_point(self) -> tuple[int, dict[str, Any]]:
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
        if servers != {self.num_servers}:
            raise UserError(
                f"the run had {servers.pop()} server shards and this job has "
                f"{self.num_servers}: resume with the same --servers"
            )
        try:
            step = self._restorable(list(saved))
        except wire.WireError:
            raise UserError("no server checkpoint that every shard has whole") from None
        return step, saved[step]

    def _resume(self, step: int, saved: dict[str, Any]) -> None:
        """Start from a checkpoint: every shard restores itself when it registers, and
        no task is handed out until all have."""
        assert self.queue is not None
        self.snapshots = {step: saved}
        self._rollback(step)
        self.restore_step = step
        self.restoring = set(range(self.num_servers))
        self.queue.paused = True
        self.start_time -= float(saved["wall_time"])
        self.resumed_from = step
        print(f"shoal: resuming from the server checkpoints of step {step}", file=sys.stderr)

    def _server_died(self, shard: int, code: int) -> dict[str, Any]:
        """Roll every shard and the queue back to the newest checkpoint; the shard's
        replacement restores itself when it registers. Until then no task is handed out."""
        if self.queue is None or not self.snapshots:
            raise wire.WireError(
                "malformed", "no server checkpoint to restore from (--checkpoint-every)"
            )
        for k in range(self.num_servers):  # writes in flight on live shards: let them land
            if k != shard and k not in self.restoring:
                self._shard(k).call({"op": "flush"})
        step = self._restorable(list(self.snapshots))
        self.dropped_shards.discard(shard)  # killed for its silence: it is being replaced
        self.generation += 1
        self.restore_step = step
        self.restoring.add(shard)
        self.queue.paused = True
        self.shard_peers.pop(shard, None)
        for k in range(self.num_servers):
            if k not in self.restoring:
                self._shard(k).call({"op": "restore", "step": step, "generation": self.generation})
        self._rollback(step)
        self.restores.append({"shard": shard, "exit_code": code, "step": step})
        return {"op": "ok", "address": self.servers[shard], "step": step}

    def _rollback(self, step: int) -> None:
        assert self.queue is not None
        self.queue.rollback(step)
        self.queue.hold_at = self._next_hold(step)
        saved = self.snapshots[step]
        for later in [s for s in self.snapshots if s > step]:
            del self.snapshots[later]
        self.counts = Counter(saved["counts"])
        self.tasks_done = Counter(saved["tasks_done"])
        self.samples_done = Counter(saved["samples_done"])
        self.telemetry.rollback(saved, step)
