"""The coordinator: discovery, membership, the task queue, telemetry, the final model.

Runs as a thread inside node 0's ``shoal train`` process (the launcher), so it
outlives any worker or server. Servers register their addresses; workers ask
for them, then take tasks (parts of global steps) from the
:class:`~shoal.strategies.ps.tasks.TaskQueue`, reporting each finished task's
telemetry with the request for the next. The coordinator writes
``metrics.jsonl`` as steps finish and counts every sample of every epoch once.
When a worker dies or goes silent, its tasks go back to the queue. At the end
it pulls the final parameters, evaluates them and writes ``model.safetensors``
and ``summary.json``.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import zmq

from shoal.config import JobConfig
from shoal.data.order import MASK64
from shoal.data.sampler import GlobalBatchSampler
from shoal.errors import UserError
from shoal.layout import ENDPOINTS_FILE, write_atomic
from shoal.models.sparse import count_parameters
from shoal.net import gate, wire
from shoal.strategies.ps.finish import pull_final_model
from shoal.strategies.ps.membership import HEARTBEAT_LOST, Membership
from shoal.strategies.ps.recovery import ShardRecovery, ShardTable
from shoal.strategies.ps.tasks import TaskQueue
from shoal.strategies.ps.telemetry import StepTelemetry
from shoal.strategies.ps.watchdog import HUNG_FACTOR, StallWatch
from shoal.telemetry import Totals, Window
from shoal.writer import RunWriter

MAX_MESSAGE_BYTES = 1 << 22
"""The coordinator only ever receives small telemetry rows and control messages."""


def _hex(value: Any) -> int:
    """A worker's digest (hex); 0 for anything else, which then shows as inexact."""
    try:
        return int(str(value), 16) & MASK64
    except ValueError:
        return 0


class Coordinator(threading.Thread):
    """Bookkeeping for one parameter-server job; see the module docstring."""

    def __init__(
        self,
        job: JobConfig,
        secret: bytes,
        bind: str,
        num_nodes: int,
        total_steps: int,
        steps_per_epoch: int,
        max_nodes: int = 0,
        sampler: GlobalBatchSampler | None = None,
    ) -> None:
        super().__init__(name="shoal-ps-coordinator", daemon=True)
        self.sampler = sampler  # the job's order: what each epoch's digest must be
        self.job = job
        self.secret = secret
        self.num_nodes = num_nodes  # the job starts once this many machines registered
        self.max_nodes = max(max_nodes, num_nodes)  # more may join later, with workers
        self.nodes: dict[int, tuple[int, int]] = {}  # node rank -> (workers, servers)
        self.node_waiting: list[tuple[bytes, Any, int]] = []
        self.num_workers = 0
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self.queue: TaskQueue | None = None  # once every node has registered
        self.task_waiting: list[tuple[bytes, Any, int, int]] = []  # peer, id, worker, take
        self.ctx = zmq.Context.instance()
        self.listener = gate.Listener(
            self.ctx, bind, secret, "coordinator", gate.max_connections(job)
        )
        self.sock, self.address = self.listener.sock, self.listener.address
        self.shards = ShardTable()
        self.shards_up = False
        self.waiting: list[tuple[bytes, Any]] = []
        self.counts: Counter = Counter()  # samples per epoch, each task counted once
        self.digests: dict[int, int] = {}  # digest of those samples' ids, per epoch
        self.tasks_done: Counter = Counter()  # per worker
        self.samples_done: Counter = Counter()  # per worker
        self.totals: dict[int, Totals] = {}  # what each worker sent when it finished
        self.stopped = threading.Event()
        self.out = Path(job.output.out)
        self.writer = RunWriter(job, total_steps, resume_step=None)
        self.start_time = time.perf_counter()
        self.telemetry = StepTelemetry(
            self.writer, self.wall_time, job.train.log_every, total_steps, steps_per_epoch
        )
        self.rejected: Counter = Counter()
        self.joined: list[dict[str, int]] = []  # machines that joined the running job
        self.recovery = ShardRecovery(
            job, self.out, total_steps, self.shards, self, self.ctx, secret
        )  # server checkpoints and restores
        self.members = Membership(job, self.shards, self._restoring, self._lost)
        self.recovery.on_shard_lost = self.members.dropped_shards.add
        self.stall = StallWatch(job.strategy.heartbeat_timeout)  # names a wait nobody named

    # --- thread -----------------------------------------------------------------------

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.members.check()
            except Exception as e:  # telling the shards failed: say so, keep coordinating
                print(f"shoal: warning: coordinator: {type(e).__name__}: {e}", file=sys.stderr)
            self._watch_progress()
            self.listener.watch_connections()
            if not self.sock.poll(100):
                continue
            frames = self.sock.recv_multipart(copy=False)
            peer = frames[0].bytes
            try:
                header, tensors = wire.decode(
                    frames[1:], MAX_MESSAGE_BYTES, frame_cap=self.listener.frame_bytes
                )
                if header["op"] == "hello":  # the peer proved itself at the door (gate)
                    reply = self.listener.welcome(self.listener.user(frames[1]), header)
                else:
                    reply = self.dispatch(peer, header, tensors)
                if reply is not None:
                    self._send(peer, {**reply, "id": header.get("id")})
            except Exception as e:  # a bad message is refused; the coordinator keeps running
                self.rejected[getattr(e, "kind", "malformed")] += 1
                self._send(
                    peer, {"op": "error", "id": wire.request_id(frames[1:]), "error": str(e)[:200]}
                )
        self.listener.close()

    def _send(self, peer: bytes, header: dict[str, Any]) -> None:
        frames = wire.encode(header, frame_bytes=self.listener.frame_bytes)
        self.sock.send_multipart([peer, *frames], copy=False)

    def dispatch(
        self, peer: bytes, header: dict[str, Any], tensors: list[torch.Tensor]
    ) -> dict[str, Any] | None:
        op = header["op"]
        if op == "node":
            return self._node(peer, header)
        members, recovery = self.members, self.recovery
        if op == "heartbeat":
            if "shard" in header:
                members.shard_seen[int(header["shard"])] = time.monotonic()
            else:
                members.worker_seen(int(header["worker"]))
            return {"op": "ok"}
        if op == "status":
            if "node" in header:
                members.node_seen[int(header["node"])] = time.monotonic()
            return {
                "op": "status",
                "dropped": sorted(members.dropped),
                "dropped_shards": sorted(members.dropped_shards),
                "generation": recovery.generation,
                "done": self.job_done(),
                "fatal": members.fatal,
            }
        if op == "fatal":  # a machine cannot go on (its shard's restarts ran out, say)
            members.fatal = members.fatal or str(header.get("error", "a machine failed"))[:300]
            return {"op": "ok"}
        if op == "server_died":
            shard = int(header["shard"])
            members.dropped_shards.discard(shard)  # killed for its silence: being replaced
            return recovery.server_died(self.queue, shard, int(header["code"]))
        if op == "worker_died":
            members.worker_died(int(header["worker"]), int(header["code"]))
            return {"op": "ok"}
        if op == "register_server":
            shard = int(header["shard"])
            self.shards.addresses[shard] = str(header["address"])
            self.shards.targets[shard] = str(header["target"])
            members.shard_registered(shard)
            replaces = recovery.registered(shard)  # a replacement restores itself, then serves
            self._answer_waiting()
            if not replaces:
                return {"op": "ok"}
            if not recovery.restoring and self.queue is not None:
                self.queue.paused = False
                self._answer_tasks()
            return {
                "op": "ok",
                "restore": recovery.restore_step,
                "generation": recovery.generation,
                "total_steps": self.total_steps,
            }
        if op == "servers":
            if "worker" in header:  # watched for heartbeats from now on (a restart rejoins)
                members.worker_seen(int(header["worker"]), starting=True)
            self.waiting.append((peer, header.get("id")))
            self._answer_waiting()
            return None
        if op == "task":
            return self._task(peer, header, tensors)
        if op == "totals":
            try:
                self.totals[int(header["worker"])] = Totals.from_dict(header["totals"])
            except (KeyError, TypeError, ValueError) as e:
                raise wire.WireError("malformed", f"totals: {e}") from None
            return {"op": "ok"}
        if op == "leave":
            self.members.left.add(int(header["worker"]))
            return {"op": "ok"}
        raise wire.WireError("malformed", f"unknown op {op[:32]!r}")

    def _node(self, peer: bytes, header: dict[str, Any]) -> dict[str, Any] | None:
        """A machine registers its workers and servers. Before the job starts its
        answer waits for the others; a machine joining later adds workers at once."""
        rank, workers, servers = (int(header[k]) for k in ("node_rank", "workers", "servers"))
        if rank in self.nodes:
            raise wire.WireError("malformed", f"node rank {rank} registered twice")
        if self.queue is None:
            self.nodes[rank] = (workers, servers)
            self.node_waiting.append((peer, header.get("id"), rank))
            self._answer_nodes()
            return None
        refused = ""
        if self.queue.done:
            refused = "the job has finished"
        elif len(self.nodes) >= self.max_nodes:
            refused = f"the job already has its {self.max_nodes} machines (--nnodes)"
        elif servers:
            refused = "a machine joining a running job brings workers only (--servers 0)"
        if refused:
            return {"op": "layout", "refused": f"node {rank} cannot join: {refused}"}
        self.nodes[rank] = (workers, 0)
        base, self.num_workers = self.num_workers, self.num_workers + workers
        self.joined.append(
            {"node": rank, "workers": workers, "step": self.telemetry.logged_through}
        )
        print(
            f"shoal: node {rank} joined the running job: workers {base}..{self.num_workers - 1}",
            file=sys.stderr,
        )
        return {
            "op": "layout",
            "worker_base": base,
            "server_base": self.shards.count,
            "num_workers": self.num_workers,
            "num_servers": self.shards.count,
        }

    def _answer_nodes(self) -> None:
        """Once every machine has registered, tell each where its ids start."""
        if len(self.nodes) < self.num_nodes:
            return
        self.num_workers = sum(w for w, _ in self.nodes.values())
        self.shards.count = sum(k for _, k in self.nodes.values())
        opts, parts, resumed = self.job.strategy.options, max(1, self.num_workers), None
        if self.job.output.resume:
            try:
                resumed = self.recovery.resume_point()
            except UserError as e:
                refused = f"--resume {self.out}: {e}"
                for peer, rid, _ in self.node_waiting:
                    self._send(peer, {"op": "layout", "id": rid, "refused": refused})
                self.node_waiting = []
                return
            parts = int(resumed[1]["parts"])  # the same samples make the same steps
        self.queue = TaskQueue(self.total_steps, parts, opts.mode, opts.staleness)
        self.stall.restart()
        if resumed is not None:
            self.recovery.resume(self.queue, *resumed)
            self.start_time -= float(resumed[1]["wall_time"])
        elif self.job.train.checkpoint_every:  # the first checkpoint: the initial parameters
            self.queue.hold_at = 0
        title = f"ps/{self.job.strategy.options.mode} x{self.num_workers}"
        self.writer.start(title, 0)
        bases, worker_base, server_base = {}, 0, 0
        for rank in sorted(self.nodes):
            bases[rank] = (worker_base, server_base)
            for k in range(server_base, server_base + self.nodes[rank][1]):
                self.shards.node[k] = rank
            worker_base += self.nodes[rank][0]
            server_base += self.nodes[rank][1]
        self.members.expect(self.num_workers, self.shards.count)
        layout = {"num_workers": self.num_workers, "num_servers": self.shards.count}
        for peer, rid, rank in self.node_waiting:
            w, k = bases[rank]
            self._send(
                peer, {"op": "layout", "id": rid, "worker_base": w, "server_base": k, **layout}
            )
        self.node_waiting = []

    def all_workers_done(self) -> bool:
        """Every worker of the job has finished or died (called from the launcher)."""
        return self.members.all_workers_done(self.num_workers)

    def _answer_waiting(self) -> None:
        """Tell waiting workers every shard's address and name at its door, once every
        shard is there (a replaced one: once its replacement registered, with its name)."""
        if not self.shards.all_up() or self.recovery.restoring:
            return
        addresses = [self.shards.addresses[k] for k in range(self.shards.count)]
        if not self.shards_up:  # the first time every shard is registered
            self.shards_up = True
            endpoints = {"coordinator": self.address, "servers": addresses}
            try:
                write_atomic(self.out / ENDPOINTS_FILE, json.dumps(endpoints, indent=2) + "\n")
            except OSError as e:  # a full disk: only tools read it; serving goes on
                print(f"shoal: warning: {ENDPOINTS_FILE}: {e.strerror}", file=sys.stderr)
        assert self.queue is not None
        targets = [self.shards.targets[k] for k in range(self.shards.count)]
        reply = {
            "op": "servers",
            "servers": addresses,
            "targets": targets,
            "parts": self.queue.parts,
        }
        for peer, rid in self.waiting:
            self._send(peer, {**reply, "id": rid})
        self.waiting = []

    # --- the task queue -----------------------------------------------------------------

    def _task(
        self, peer: bytes, header: dict[str, Any], tensors: list[torch.Tensor]
    ) -> dict[str, Any] | None:
        """Take a worker's finished tasks, then hand it up to ``take`` new ones.

        With ``wait`` the request is parked until a task can be handed out (or
        the job is done), otherwise it is answered at once, possibly empty.
        """
        if self.queue is None:
            raise wire.WireError("malformed", "task: the job has not started")
        worker, take = int(header["worker"]), int(header.get("take", 1))
        done = header.get("done") or []
        if not isinstance(done, list) or len(done) != len(tensors):
            raise wire.WireError("malformed", "task: reports and rows differ in number")
        before = self.queue.finished_through
        for meta, row in zip(done, tensors):
            self._finished(worker, meta, row)
        if self.queue.finished_through > before:
            self.stall.progressed()
        self.telemetry.flush(self.queue.finished_through, self.queue.parts)
        self.recovery.maybe_checkpoint(self.queue)
        if header.get("wait"):
            self.task_waiting.append((peer, header.get("id"), worker, take))
        self._answer_tasks()  # finished steps may let parked requests go, oldest first
        return None if header.get("wait") else self._hand_out(worker, take)

    def _hand_out(self, worker: int, take: int) -> dict[str, Any]:
        assert self.queue is not None
        tasks = []
        dead = worker in self.members.dead
        if not dead:  # a dropped worker gets nothing more
            while len(tasks) < take and (task := self.queue.take(worker)) is not None:
                tasks.append(list(task))
        finished = self.queue.done or dead
        return {
            "op": "tasks",
            "tasks": tasks,
            "parts": self.queue.parts,
            "finished": finished,
            "generation": self.recovery.generation,
        }

    def _answer_tasks(self) -> None:
        """Answer parked task requests that can be answered now, oldest first.

        Each gets one task first; a task ahead (for prefetch) only goes to a
        worker when nobody is left waiting for a first one.
        """
        assert self.queue is not None
        still, answered = [], []
        for peer, rid, worker, take in self.task_waiting:
            reply = self._hand_out(worker, 1)
            if reply["tasks"] or reply["finished"]:
                answered.append((peer, rid, worker, take, reply))
            else:
                still.append((peer, rid, worker, take))
        for peer, rid, worker, take, reply in answered:
            if take > 1 and reply["tasks"] and not still:
                reply["tasks"] += self._hand_out(worker, take - 1)["tasks"]
            self._send(peer, {**reply, "id": rid})
        self.task_waiting = still

    def _finished(self, worker: int, meta: dict[str, Any], row: torch.Tensor) -> None:
        assert self.queue is not None
        step, part = (int(v) for v in meta["task"])
        window = Window.from_tensor(row)
        self.telemetry.seen(worker, window)
        if int(meta.get("generation", 0)) != self.recovery.generation:
            return  # handed out before a restore: done again since, counted then
        if not self.queue.finish(worker, (step, part)):
            return  # done before by someone else: counted once
        epoch = step // self.steps_per_epoch
        self.counts[epoch] += int(window.samples)
        self.digests[epoch] = (self.digests.get(epoch, 0) + _hex(meta.get("digest"))) & MASK64
        self.tasks_done[worker] += 1
        self.samples_done[worker] += int(window.samples)
        self.telemetry.task_done(worker, step, float(meta.get("lr", 0.0)), window)

    def _watch_progress(self) -> None:
        """No step finished for the watch's bound: say what the job waits for (again every
        bound). A task held for :data:`HUNG_FACTOR` bounds by a worker that still beats:
        the worker is hung in its work, and is dropped (killed and restarted by its
        launcher; its tasks go to the others)."""
        q = self.queue
        if q is None or q.done:
            return
        quiet = self.stall.due()
        if quiet is not None:
            print(
                f"shoal: warning: no step finished for {quiet:.0f} s; {self._waiting_for()}",
                file=sys.stderr,
                flush=True,
            )
        oldest = q.oldest()
        if oldest is None or oldest[2] < HUNG_FACTOR * self.stall.bound:
            return
        worker, (step, part), held = oldest
        if worker in self.members.dead:
            return
        print(
            f"shoal: warning: worker {worker} has held step/part {step}/{part} for {held:.0f} s "
            "while its heartbeat goes on: it is hung in its work; dropped",
            file=sys.stderr,
            flush=True,
        )
        self.members.dropped.add(worker)
        self.members.worker_gone(worker, HEARTBEAT_LOST)

    def _waiting_for(self) -> str:
        """What the job waits for, in words: the next step's parts and who holds them, a
        shard being restored, a checkpoint, or workers that do not ask."""
        assert self.queue is not None
        q, now = self.queue, time.monotonic()
        if self.recovery.restoring:
            shards = ", ".join(str(k) for k in sorted(self.recovery.restoring))
            return (
                f"waiting for server shard {shards} to come back (every shard goes back to "
                f"the checkpoint of step {self.recovery.restore_step})"
            )
        step = q.finished_through + 1
        done = q.finished_parts.get(step, set())
        why = []
        for worker, tasks in sorted(q.held.items()):
            parts = sorted(p for s, p in tasks if s == step and p not in done)
            if parts:
                seen = self.members.last_seen.get(worker)
                beat = f"last heartbeat {now - seen:.1f} s ago" if seen else "never heard from"
                held = "part" + "s" * (len(parts) > 1) + " " + ", ".join(map(str, parts))
                why.append(f"worker {worker} holds {held} ({beat})")
        if q.hold_at is not None and q.hold_at <= step:  # (its tasks are held back)
            why.append(f"tasks from step {q.hold_at} wait for the checkpoint of step {q.hold_at}")
        if not why:
            asking = sorted({w for _, _, w, _ in self.task_waiting})
            gone = sorted(self.members.dead)
            why.append(
                f"no worker holds a part of it; waiting for tasks: workers "
                f"{', '.join(map(str, asking)) or 'none'}; out of the job: "
                f"{', '.join(map(str, gone)) or 'none'}"
            )
        return f"step {step} waits: " + "; ".join(why)

    def job_done(self) -> bool:
        """Every task of every step has finished."""
        return self.queue is not None and self.queue.done

    # --- the end ----------------------------------------------------------------------

    def _restoring(self, shard: int) -> bool:
        return shard in self.recovery.restoring

    def _lost(self, worker: int, exit_code: int) -> None:
        """A worker left the job badly: its tasks go back to the queue."""
        if self.queue is None:
            return
        lost = self.queue.lose(worker)
        if lost:
            steps = ", ".join(f"{t}/{p}" for t, p in lost)
            print(
                f"shoal: worker {worker}'s tasks (step/part) {steps} handed out again",
                file=sys.stderr,
            )
        self._answer_tasks()

    # --- the bookkeeping a restore rolls back (see ShardRecovery) -----------------------

    def snapshot(self) -> dict[str, Any]:
        return {
            "counts": dict(self.counts),
            "digests": dict(self.digests),
            "tasks_done": dict(self.tasks_done),
            "samples_done": dict(self.samples_done),
            **self.telemetry.snapshot(),
            "wall_time": self.wall_time(),
        }

    def rollback(self, saved: dict[str, Any], step: int) -> None:
        self.counts = Counter(saved["counts"])
        self.digests = {int(k): int(v) for k, v in saved.get("digests", {}).items()}
        self.tasks_done = Counter(saved["tasks_done"])
        self.samples_done = Counter(saved["samples_done"])
        self.telemetry.rollback(saved, step)

    # --- the end ----------------------------------------------------------------------

    def finish(self) -> dict[str, Any]:
        """Stop the thread, pull and evaluate the final model, write the summary."""
        self.stopped.set()
        self.join(timeout=10)
        self.recovery.close()
        model, data, exported, stats = pull_final_model(
            self.job, self.shards, self.secret, self.recovery.generation
        )
        self.writer.evaluation(model, data, torch.device("cpu"), self.total_steps, self.wall_time())
        return self._summary(data, model, exported, stats)

    def wall_time(self) -> float:
        return time.perf_counter() - self.start_time

    def _summary(
        self,
        data: Any,
        model: torch.nn.Module,
        exported: dict[str, torch.Tensor],
        stats: list[dict],
    ) -> dict[str, Any]:
        per_worker: dict[int, dict[str, Any]] = {}
        for w in range(max(self.num_workers, max(self.tasks_done, default=-1) + 1)):
            entry: dict[str, Any] = {
                "tasks": self.tasks_done[w],
                "samples": self.samples_done[w],
                "samples_per_s": self.samples_done[w] / max(self.wall_time(), 1e-9),
            }
            if w not in self.totals:  # (it never finished: what the coordinator saw)
                sent, received = self.telemetry.bytes.get(w, (0.0, 0.0))
                entry.update(bytes_sent=int(sent), bytes_received=int(received))
                entry["time"] = self.telemetry.time.get(w, {})
            failures = self.members.failures.get(w)
            if failures:
                entry["failed_exit_code"] = failures[-1]
                entry["failures"] = len(failures)
            per_worker[w] = entry
        staleness: Counter = Counter()
        for s in stats:
            staleness.update({int(k): v for k, v in s["staleness"].items()})
        opts = self.job.strategy.options
        return self.writer.finish(
            model,
            dataset=data,
            world_size=self.num_workers,
            steps=self.total_steps,
            num_parameters=count_parameters(model),
            wall_time=self.wall_time(),
            counts=dict(sorted(self.counts.items())),
            epochs=self.sampler.digest_report(self.counts, self.digests) if self.sampler else None,
            totals=[self.totals[w] for w in sorted(self.totals)],
            extra_tensors=exported,
            per_worker=per_worker,
            resumed_from_step=self.recovery.resumed_from,
            ps={
                "mode": opts.mode,
                "staleness_bound": opts.staleness if opts.mode == "ssp" else None,
                "num_servers": self.shards.count,
                "staleness_histogram": {str(k): v for k, v in sorted(staleness.items())},
                "max_staleness": max(staleness, default=0),
                "failed_workers": sorted(self.members.failures),
                "server_restores": self.recovery.restores,
                "joined": self.joined,
                "servers": stats,
                "coordinator_rejected": dict(self.rejected),
                "coordinator_refused_at_door": self.listener.refused(),
            },
        )
