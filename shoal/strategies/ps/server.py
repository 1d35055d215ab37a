"""A parameter-server shard: storage, server-side optimizer, consistency, wire.

One process, one ROUTER socket, one thread: requests are handled in arrival
order, and pulls that the consistency mode says must wait are parked and
answered as soon as the applied steps allow. Only peers that proved they know
the job's secret reach the socket (:mod:`~shoal.net.gate`); bad
messages from them are refused and counted; they never stop the loop.
"""

from __future__ import annotations

import os
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import zmq

from shoal import checkpoint
from shoal.compress import Codec, Payload, PowerSGD, parse_codec
from shoal.config import OptimConfig
from shoal.faults import Injector
from shoal.layout import PS_SHARDS_DIR
from shoal.net import gate, wire
from shoal.strategies.ps.consistency import Steps
from shoal.strategies.ps.optim import ServerOptimizer
from shoal.strategies.ps.storage import SparseTable, sum_rows


@dataclass
class _Pending:
    """Gradients of one BSP step, summed until every part has been pushed."""

    dense: list[torch.Tensor] | None = None
    rows: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = field(default_factory=dict)


@dataclass
class ServerStats:
    """What a shard reports: traffic, refusals, staleness, apply time, queue depth."""

    bytes_in: int = 0
    bytes_out: int = 0
    rejected: Counter = field(default_factory=Counter)
    staleness: Counter = field(default_factory=Counter)
    updates: int = 0
    duplicates: int = 0
    apply_s: float = 0.0
    max_queue: int = 0
    rows_pulled: int = 0
    rows_pushed: int = 0
    peer_bytes: dict[str, list[int]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "rejected": dict(self.rejected),
            "staleness": {str(k): v for k, v in sorted(self.staleness.items())},
            "updates": self.updates,
            "duplicates": self.duplicates,
            "apply_s": self.apply_s,
            "max_queue": self.max_queue,
            "rows_pulled": self.rows_pulled,
            "rows_pushed": self.rows_pushed,
            "peer_bytes": self.peer_bytes,
        }


def shard_dir(run_dir: str | os.PathLike, shard: int) -> Path:
    """Where shard ``shard`` keeps its checkpoints (in its own ``checkpoints/``)."""
    return Path(run_dir) / PS_SHARDS_DIR / f"shard-{shard}"


def coordinator_dir(run_dir: str | os.PathLike) -> Path:
    """Where the coordinator keeps its bookkeeping of each server checkpoint (the queue's
    position, the sample counts): what ``--resume`` starts from."""
    return Path(run_dir) / PS_SHARDS_DIR / "coordinator"


class Server:
    """One shard. :meth:`serve` runs until a ``shutdown`` request."""

    def __init__(
        self,
        shard: int,
        secret: bytes,
        optim: OptimConfig,
        mode: str,
        staleness: int,
        bind: str = "tcp://127.0.0.1:0",
        max_message_bytes: int = 1 << 30,
        run_dir: str | os.PathLike | None = None,
        keep_checkpoints: int = 3,
        max_connections: int = gate.SHARD_CONNECTIONS,
    ) -> None:
        self.shard = shard
        self.saver = (
            checkpoint.AsyncSaver(shard_dir(run_dir, shard), keep_checkpoints)
            if run_dir is not None
            else None
        )
        self.faults = Injector(shard, run_dir=run_dir, role="server")
        self.generation = 0
        self.total_steps = 0
        self.optim_cfg = optim
        self.optimizer: ServerOptimizer | None = None
        self.mode, self.staleness_bound = mode, staleness
        self.max_bytes = max_message_bytes
        self.ctx = zmq.Context.instance()
        # this process's name at the door: tokens for a shard that came before it (a
        # restart) or for another shard are refused, even if replayed within their window
        self.target = f"shard-{shard}/{secrets.token_hex(4)}"
        self.listener = gate.Listener(self.ctx, bind, secret, self.target, max_connections)
        self.sock, self.address = self.listener.sock, self.listener.address
        self.stats = ServerStats()
        self.buffers = wire.Buffers()  # what pushes are received into, message after message
        self.names: dict[bytes, str] = {}
        self.steps: Steps | None = None
        self.keys: list[str] = []
        self.dense: list[torch.Tensor] = []
        self.dense_state: list[dict[str, torch.Tensor]] = []
        self.tables: dict[str, SparseTable] = {}
        self.pending: dict[int, _Pending] = {}
        self.parked: list[tuple[bytes, dict[str, Any], list[torch.Tensor]]] = []
        self.codecs: dict[str, Codec] = {}
        self.running = True

    # --- loop ---------------------------------------------------------------------------

    def serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.listener.monitor, zmq.POLLIN)
        while self.running:
            ready = dict(poller.poll(200))
            if self.listener.monitor in ready:
                self.listener.watch_connections()
            if self.sock not in ready:
                continue
            self.handle()
        self.listener.close(linger_ms=2000)  # let the reply to shutdown leave

    def handle(self) -> None:
        """Receive one request (multi-frame tensors straight into reused buffers) and
        answer it; a bad one is refused, counted, and answered with an error."""
        try:
            ident, size, header, tensors = wire.receive(
                self.sock,
                self.max_bytes,
                self.buffers,
                routed=True,
                frame_cap=self.listener.frame_bytes,
            )
            fault: Exception | None = None
            rid = wire.header_id(header)
        except wire.WireError as e:
            assert e.received is not None
            ident, size, head = e.received
            rid, header, tensors, fault = wire.request_id([head] if head else []), {}, [], e
        peer = ident.bytes
        self.stats.bytes_in += size
        user = self.listener.user(ident)  # proven at the door (gate)
        self.names[peer] = name = user.split("|")[0]  # per-peer traffic under that name
        self.stats.peer_bytes.setdefault(name, [0, 0])[0] += size
        try:
            if fault is not None:
                raise fault
            if header["op"] == "hello":
                self.send(peer, {**self.listener.welcome(user, header), "id": rid})
            else:
                self.dispatch(peer, header, tensors)
        except wire.WireError as e:
            self.stats.rejected[e.kind] += 1
            self.send(peer, {"op": "error", "id": rid, "kind": e.kind, "error": str(e)})
        except Exception as e:  # whatever a bad message does, the shard keeps serving
            self.stats.rejected["malformed"] += 1
            error = f"{type(e).__name__}: {e}"[:200]
            self.send(peer, {"op": "error", "id": rid, "kind": "malformed", "error": error})

    def send(self, peer: bytes, header: dict[str, Any], tensors: list[torch.Tensor] = ()) -> None:
        frames = wire.encode(header, list(tensors), self.listener.frame_bytes)
        size = wire.message_bytes(frames)
        self.stats.bytes_out += size
        name = self.names.get(peer)
        if name is not None:
            self.stats.peer_bytes.setdefault(name, [0, 0])[1] += size
        self.sock.send_multipart([peer, *frames], copy=False)

    def dispatch(self, peer: bytes, header: dict[str, Any], tensors: list[torch.Tensor]) -> None:
        op, rid = header["op"], header.get("id")
        if op == "init":
            self.init(header, tensors)
            self.send(peer, {"op": "ok", "id": rid})
        elif op == "pull":
            self._check_generation(header)
            self._check_pull(header, tensors)
            self.parked.append((peer, header, tensors))
        elif op == "push":
            self._check_generation(header)
            self.push(header, tensors)
            self.send(peer, {"op": "ok", "id": rid})
        elif op == "dump":  # every materialised row of a table (for the final model)
            ids, slots = self.tables[header["table"]].ids()
            self.send(
                peer, {"op": "rows", "id": rid}, [ids, self.tables[header["table"]].rows[slots]]
            )
        elif op == "checkpoint":
            self.checkpoint(int(header["step"]))
            self.send(peer, {"op": "ok", "id": rid})
        elif op == "flush":  # the checkpoint being written is on disk when this answers
            if self.saver is not None:
                self.saver.wait()
            self.send(peer, {"op": "ok", "id": rid})
        elif op == "restore":
            self.restore(int(header["step"]), int(header["generation"]), header.get("total_steps"))
            self.send(peer, {"op": "ok", "id": rid})
        elif op == "stats":
            stats = {**self.stats.as_dict(), "refused_at_door": self.listener.refused()}
            self.send(peer, {"op": "stats", "id": rid, "stats": stats})
        elif op == "shutdown":
            self.running = False
            self.send(peer, {"op": "ok", "id": rid})
        elif op == "ping":
            self.send(peer, {"op": "pong", "id": rid})
        else:
            raise wire.WireError("malformed", f"unknown op {op[:32]!r}")
        self._answer_parked()

    def _check_generation(self, header: dict[str, Any]) -> None:
        """Work handed out before the last restore is refused: it is being done again."""
        if int(header.get("gen", 0)) != self.generation:
            raise wire.WireError("stale", f"task of generation {header.get('gen')}: restored since")

    # --- checkpoints --------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything this shard holds, when every step before the next is applied."""
        assert self.steps is not None
        return {
            "keys": list(self.keys),
            "dense": self.dense,
            "dense_state": self.dense_state,
            "tables": {
                name: {
                    "dim": t.dim,
                    "init_std": t.init_std,
                    "seed": t.seed,
                    "keys": torch.from_numpy(t.keys),
                    "key_slots": torch.from_numpy(t.key_slots),
                    "rows": t.rows[: len(t.keys)],
                    "state": {k: v[: len(t.keys)] for k, v in t.state.items()},
                }
                for name, t in self.tables.items()
            },
            "applied_through": self.steps.applied_through,
            "parts": self.steps.parts,
            "total_steps": self.total_steps,
        }

    def checkpoint(self, step: int) -> None:
        """Snapshot the shard as of ``step`` (steps before it applied, none after), then
        write it in the background. The coordinator asks only at such a moment."""
        if self.saver is None or self.steps is None:
            raise wire.WireError("malformed", "checkpoint: no run directory, or not initialised")
        if self.steps.applied_through != step - 1 or self.steps.seen or self.pending:
            raise wire.WireError(
                "malformed", f"checkpoint {step}: applied through {self.steps.applied_through}"
            )
        self.saver.save(step, self.state_dict())

    def restore(self, step: int, generation: int, total_steps: int | None = None) -> None:
        """Go back to the checkpoint of ``step``; pulls parked meanwhile are told so.
        ``total_steps`` is the job's length now (a resumed run may be given more)."""
        if self.saver is None:
            raise wire.WireError("malformed", "restore: no run directory")
        self.saver.wait()
        state = checkpoint.load(checkpoint.step_path(self.saver.run_dir, step))
        self.total_steps = int(total_steps or state["total_steps"])
        self.optimizer = ServerOptimizer(self.optim_cfg, self.total_steps)
        self.keys = list(state["keys"])
        self.dense = state["dense"]
        self.dense_state = state["dense_state"]
        self.tables = {}
        for name, t in state["tables"].items():
            table = SparseTable(int(t["dim"]), float(t["init_std"]), int(t["seed"]), self.optimizer)
            table.set_index(t["keys"].numpy().copy(), t["key_slots"].numpy().copy())
            table.rows = t["rows"].clone()
            table.state = {k: v.clone() for k, v in t["state"].items()}
            self.tables[name] = table
        self.steps = Steps(self.mode, self.staleness_bound, int(state["parts"]))
        self.steps.applied_through = int(state["applied_through"])
        self.pending = {}
        self.generation = generation
        for peer, header, _ in self.parked:
            self.send(
                peer,
                {"op": "error", "id": header.get("id"), "kind": "stale", "error": "restored"},
            )
        self.parked = []

    # --- operations ---------------------------------------------------------------------

    def init(self, header: dict[str, Any], tensors: list[torch.Tensor]) -> None:
        """First ``init`` wins: dense slices, table specs, parts per step."""
        if self.steps is not None:
            return
        self.total_steps = int(header["total_steps"])
        self.optimizer = ServerOptimizer(self.optim_cfg, self.total_steps)
        if not tensors:
            raise wire.WireError("malformed", "init: no keys")
        *tensors, keys = tensors  # the slices' keys travel as the last tensor
        self.keys = wire.tensor_strings(keys)
        if len(self.keys) != len(tensors):
            raise wire.WireError("malformed", "init: keys and tensors differ in number")
        self.dense = [t.detach().clone().float().reshape(1, -1) for t in tensors]
        self.dense_state = [self.optimizer.new_state(1, t.shape[1]) for t in self.dense]
        for spec in header.get("tables", []):
            self.tables[spec["name"]] = SparseTable(
                int(spec["dim"]), float(spec["init_std"]), int(spec["seed"]), self.optimizer
            )
        self.steps = Steps(self.mode, self.staleness_bound, int(header["parts"]))

    def _check_pull(self, header: dict[str, Any], tensors: list[torch.Tensor]) -> None:
        """Refuse a pull now rather than park something that can never be answered."""
        names = header.get("tables", [])
        if "step" not in header:
            raise wire.WireError("malformed", "pull: no step")
        if not isinstance(names, list) or len(names) != len(tensors):
            raise wire.WireError("malformed", "pull: tables and id tensors differ in number")
        for name, ids in zip(names, tensors):
            if self.steps is not None and name not in self.tables:
                raise wire.WireError("malformed", f"pull: no table {str(name)[:32]!r}")
            if ids.dim() != 1 or ids.dtype not in (torch.int64, torch.int32):
                raise wire.WireError("malformed", "pull: ids must be a 1-d integer tensor")

    def _answer_parked(self) -> None:
        if self.steps is None:
            return
        still = []
        for peer, header, tensors in self.parked:
            if not self.steps.can_read(header["step"]):
                still.append((peer, header, tensors))
                continue
            try:
                self._pull(peer, header, tensors)
            except Exception as e:  # e.g. parked before init named a table that never came
                self.stats.rejected["malformed"] += 1
                self.send(
                    peer,
                    {
                        "op": "error",
                        "id": header.get("id"),
                        "kind": "malformed",
                        "error": str(e)[:200],
                    },
                )
        self.parked = still
        queue = len(self.parked) + sum(len(p) for p in self.steps.seen.values())
        self.stats.max_queue = max(self.stats.max_queue, queue)

    def _pull(self, peer: bytes, header: dict[str, Any], tensors: list[torch.Tensor]) -> None:
        assert self.steps is not None
        out: list[torch.Tensor] = (
            [d.reshape(-1) for d in self.dense] if header.get("dense", True) else []
        )
        names = header.get("tables", [])
        if len(names) != len(tensors):
            raise wire.WireError("malformed", "pull: tables and id tensors differ in number")
        for name, ids in zip(names, tensors):
            out.append(self.tables[name].read(ids.to(torch.int64)))
            self.stats.rows_pulled += len(ids)
        self.send(
            peer,
            {"op": "values", "id": header.get("id"), "applied_through": self.steps.applied_through},
            out,
        )

    def push(self, header: dict[str, Any], tensors: list[torch.Tensor]) -> None:
        """Gradients of one task: applied now (asp/ssp) or summed into its step (bsp)."""
        if self.steps is None:
            raise wire.WireError("malformed", "push before init")
        step, part = int(header["step"]), int(header["part"])
        if not 0 <= part < self.steps.parts or step < 0:
            raise wire.WireError("malformed", f"push: no part {part} of step {step}")
        names = header.get("tables", [])
        codec = self._codec(header.get("codec", "none"))
        split = len(tensors) - 2 * len(names)
        encoded, rest = tensors[:split], tensors[split:]
        if split not in (0, codec.num_tensors * len(self.dense)):
            raise wire.WireError("malformed", "push: tensors do not match the declared keys")
        dense = []
        for i, p in enumerate(self.dense if encoded else []):
            k = codec.num_tensors
            try:
                d = codec.decode(Payload(encoded[i * k : (i + 1) * k], torch.Size([p.numel()])))
            except (RuntimeError, IndexError, ValueError):
                d = None  # sizes or dtypes that do not make this slice
            if d is None or d.numel() != p.numel():
                raise wire.WireError("malformed", "push: dense gradient of the wrong size")
            dense.append(d)
        rows: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for i, n in enumerate(names):  # a table may appear more than once: keep every part
            ids, grads = rest[2 * i].to(torch.int64), rest[2 * i + 1].float()
            table = self.tables.get(n)
            if table is None or ids.dim() != 1 or grads.shape != (len(ids), table.dim):
                raise wire.WireError("malformed", f"push: bad rows for table {str(n)[:32]!r}")
            rows.setdefault(n, ([], []))
            self.stats.rows_pushed += len(ids)
            rows[n][0].append(ids)
            rows[n][1].append(grads)
        if not self.steps.is_new(step, part):  # a task handed out twice: it counts once
            self.stats.duplicates += 1
            return
        read = int(header.get("read_through", step - 1))
        self.stats.staleness[max(0, step - 1 - read)] += 1
        whole = self.steps.received(step, part)
        if self.mode != "bsp":
            self._apply(dense, rows, 1, step)
        else:
            p = self.pending.setdefault(step, _Pending())
            if dense:
                p.dense = (
                    [d.float().clone() for d in dense]
                    if p.dense is None
                    else [a.add_(d) for a, d in zip(p.dense, dense)]
                )
            for n, (i, g) in rows.items():
                p.rows.setdefault(n, ([], []))
                p.rows[n][0].extend(i)
                p.rows[n][1].extend(g)
            if whole:
                self._apply(p.dense or [], p.rows, self.steps.parts, step)
                del self.pending[step]
        if whole:
            self.steps.applied(step)
            self.faults.after_step(self.steps.applied_through + 1)

    def _codec(self, spec: Any) -> Codec:
        """The decoder of a push's ``codec`` (stateless here: feedback stays with workers)."""
        if spec not in self.codecs:
            if not isinstance(spec, str) or len(self.codecs) > 16:
                raise wire.WireError("malformed", "push: bad codec")
            try:
                codec = parse_codec(spec)
            except ValueError as e:
                raise wire.WireError("malformed", f"push: {e}") from None
            if isinstance(codec, PowerSGD):
                raise wire.WireError("malformed", "push: powersgd needs whole matrices")
            self.codecs[spec] = codec
        return self.codecs[spec]

    def _apply(
        self, dense: list[torch.Tensor], rows: dict[str, tuple[list, list]], count: int, step: int
    ) -> None:
        assert self.optimizer is not None
        start = time.perf_counter()
        for param, grad, state in zip(self.dense, dense, self.dense_state):
            g = grad.float().reshape(1, -1)
            self.optimizer.apply(param, g / count if count > 1 else g, state, step)
        for name, (ids, grads) in rows.items():
            unique, summed = sum_rows(ids, grads)
            self.tables[name].apply(unique, summed / count if count > 1 else summed, step)
        self.stats.updates += 1
        self.stats.apply_s += time.perf_counter() - start
