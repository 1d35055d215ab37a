"""A real federation: clients on other machines, over shoal's authenticated wire.

``shoal train --strategy fedavg --listen HOST:PORT`` runs the server: one process
that holds the global model and, each round, hands the round's clients to the
client processes that ask for work. ``shoal federate --connect HOST:PORT`` runs
a client process on another machine: it proves it knows the job's secret
(``SHOAL_PS_SECRET``, the same on every machine; see
:mod:`shoal.strategies.ps.gate`), receives the job, builds the data and the
clients' partitions itself (seeded: the same rows as the server's simulation
would give each client), and then, until the job is done: pulls a client and
the global model, trains the client locally, pushes its change.

Every message is shoal's wire (:mod:`shoal.strategies.ps.wire`): a JSON header
and raw tensors, never pickle, parsed only after the peer authenticated. The
server weighs each change by the rows the *server* knows the client holds,
sums the round's changes in client order, and applies the same server step as
the simulation: a federation and a simulation with the same seeds end at the
same model.

Requests (client -> server), each answered:

- ``hello`` (with a nonce) -> ``welcome`` (the server's proof of the secret);
- ``join`` -> ``job`` (the job as TOML);
- ``work`` -> ``train`` (round, client, lr; the global model) | ``wait`` | ``done``;
- ``update`` (round, client, loss sum; its change) -> ``ok`` (a change for a round
  that is over, or a client not handed out, is dropped and counted as stale).

A client process may die, or stall, with clients it was handed. Once every client
of the round has been handed out, a process that asks for work is handed again
the client out longest, if it has been out for more than :func:`patience`
(three times the median time clients took so far, and at least
:data:`PATIENCE_S`). A client's training is a function of the round, the client
and the global model, so whichever copy reports first gives the same change; the
other is stale. A round therefore completes without ``--round-deadline`` as long
as one client process is left; ``re_handed`` in the summary counts these.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import zmq

from shoal.config import JobConfig, dumps_toml, loads_toml
from shoal.errors import PeerLost, UserError
from shoal.metrics import CommCounter
from shoal.strategies.federated.rounds import ClientWork, RoundTask
from shoal.strategies.ps import gate, wire
from shoal.strategies.ps.client import Peer

TARGET = "federation"
"""The listener's name in tokens and proofs."""
WAIT_S = 0.05
"""How long a client with nothing to do waits before asking again."""
FINISH_S = 3.0
"""How long the server, once done, keeps telling clients that ask that it is done."""
PATIENCE_S = 2.0
"""The least time a client is out before it is handed to another process."""


def patience(took: Sequence[float]) -> float:
    """How long a handed-out client may be out before it is handed again: three times
    the median time of the clients that reported so far, at least :data:`PATIENCE_S`."""
    return max(PATIENCE_S, 3 * statistics.median(took)) if took else PATIENCE_S


def max_bytes(numel: int) -> int:
    """The largest message either side accepts: a model in float64, and room."""
    return 8 * numel + (1 << 20)


@dataclass
class Round:
    """What the server knows of the round under way."""

    number: int
    todo: deque[ClientWork]
    given: dict[int, ClientWork] = field(default_factory=dict)
    handed: dict[int, float] = field(default_factory=dict)  # client -> when last handed out
    changes: dict[int, torch.Tensor] = field(default_factory=dict)
    loss_sum: float = 0.0


class FederationServer:
    """The server's listener and its round loop (in the ``fedavg`` strategy's process)."""

    def __init__(self, job: JobConfig, address: str, numel: int) -> None:
        try:
            self.secret = wire.load_secret()
        except RuntimeError:
            raise UserError(
                f"--listen needs the job's secret in {wire.SECRET_ENV} (at least 16 bytes as "
                f"hex, e.g. from `python -c 'import secrets; print(secrets.token_hex(32))'`), "
                "the same on the clients' machines"
            ) from None
        self.job, self.numel = job, numel
        self.config = dumps_toml(job)
        self.ctx = zmq.Context.instance()
        try:
            self.listener = gate.Listener(self.ctx, f"tcp://{address}", self.secret, TARGET,
                                          gate.MAX_CONNECTIONS)  # fmt: skip
        except zmq.ZMQError as e:
            raise UserError(f"--listen {address}: cannot listen there: {e}") from None
        self.comm = CommCounter()
        self.stale = 0
        self.re_handed = 0
        self.took: deque[float] = deque(maxlen=100)  # seconds from hand-out to update
        self.faults: dict[str, int] = {}
        self.round: Round | None = None
        self.finished = False
        print(f"shoal: federation server listening on {self.listener.address}",
              file=sys.stderr, flush=True)  # fmt: skip

    def serve_round(
        self, task: RoundTask, global_x: torch.Tensor, lr: float, deadline_s: float
    ) -> tuple[dict[int, torch.Tensor], float, int]:
        """Hand out the round's clients until every one reported, or the deadline passed.
        Returns each reporting client's change, their loss sum, and the late ones."""
        self.round = Round(task.step, deque(task.clients))
        self.global_x, self.lr = global_x.detach().cpu().contiguous(), lr
        deadline = time.monotonic() + deadline_s if deadline_s else float("inf")
        want = len(task.clients)
        while len(self.round.changes) < want and time.monotonic() < deadline:
            self._serve(min(1.0, max(0.0, deadline - time.monotonic())))
        done, self.round = self.round, None
        return done.changes, done.loss_sum, want - len(done.changes)

    def finish(self) -> None:
        """Tell the clients that ask in the next seconds that the job is done."""
        self.finished = True
        end = time.monotonic() + FINISH_S
        while time.monotonic() < end:
            self._serve(0.2)

    def _serve(self, timeout_s: float) -> None:
        self.listener.watch_connections()
        if not self.listener.sock.poll(int(timeout_s * 1000)):
            return
        frames = self.listener.sock.recv_multipart(copy=False)
        ident, body = frames[0], frames[1:]
        self.comm.add(received=wire.message_bytes(body))
        try:
            header, tensors = wire.decode(body, max_bytes(self.numel))
        except wire.WireError as e:  # answered, counted, and the server goes on
            self.faults[e.kind] = self.faults.get(e.kind, 0) + 1
            self._reply(ident, {"op": "error", "error": str(e), "id": wire.request_id(body)})
            return
        reply, out = self._answer(self.listener.user(body[0]), header, tensors)
        self._reply(ident, {**reply, "id": header.get("id")}, out)

    def _reply(self, ident: Any, header: dict, tensors: list[torch.Tensor] = ()) -> None:
        frames = wire.encode(header, list(tensors))
        self.comm.add(sent=wire.message_bytes(frames))
        self.listener.sock.send_multipart([ident, *frames], copy=False)

    def _answer(
        self, user: str, header: dict, tensors: list[torch.Tensor]
    ) -> tuple[dict, list[torch.Tensor]]:
        op, r = header.get("op"), self.round
        if op == "hello":
            return self.listener.welcome(user, header), []
        if op == "join":
            return {"op": "job", "config": self.config}, []
        if op == "work":
            if self.finished:
                return {"op": "done"}, []
            if r is None:
                return {"op": "wait", "seconds": WAIT_S}, []
            if r.todo:
                client = r.todo.popleft()
            else:  # all handed out: hand again the one out longest, if out too long
                now = time.monotonic()
                out = [c for c in r.handed if c not in r.changes]
                oldest = min(out, key=r.handed.__getitem__, default=None)
                if oldest is None or now - r.handed[oldest] < patience(self.took):
                    return {"op": "wait", "seconds": WAIT_S}, []
                client = r.given[oldest]
                self.re_handed += 1
            r.given[client.client] = client
            r.handed[client.client] = time.monotonic()
            return {"op": "train", "round": r.number, "client": client.client,
                    "lr": self.lr}, [self.global_x]  # fmt: skip
        if op == "update":
            cid = header.get("client")
            shaped = (len(tensors) == 1 and tensors[0].dtype == torch.float64
                      and tensors[0].numel() == self.numel)  # fmt: skip
            fits = (r is not None and header.get("round") == r.number and cid in r.given
                    and cid not in r.changes and shaped)  # fmt: skip
            if not fits:
                self.stale += 1
                return {"op": "ok", "stale": True}, []
            assert r is not None
            r.changes[cid] = tensors[0].clone()
            self.took.append(time.monotonic() - r.handed[cid])
            loss = header.get("loss_sum", 0.0)
            if isinstance(loss, (int, float)) and np.isfinite(loss):
                r.loss_sum += float(loss)
            return {"op": "ok"}, []
        return {"op": "error", "error": f"unknown op {op!r}"}, []

    def refused(self) -> dict[str, int]:
        """What was turned away: at the door (by reason), malformed messages (by kind),
        and stale updates (a round that was over, a client not handed out)."""
        return {**self.listener.refused(), **self.faults,
                **({"stale": self.stale} if self.stale else {})}  # fmt: skip

    def close(self) -> None:
        self.listener.close()


# --- the client process ---------------------------------------------------------------------


def run_client(address: str, name: str, timeout_s: float = 300.0) -> int:
    """One client process: join the federation at ``address`` and train the clients it
    is handed until the server is done. Returns the number of client updates pushed."""
    from shoal.data import build_dataset
    from shoal.models import build_model
    from shoal.models.tasks import per_sample_loss
    from shoal.optim import build_optimizer
    from shoal.strategies import resolve
    from shoal.strategies.federated.local import train_client
    from shoal.strategies.federated.rounds import build_federation

    try:
        secret = wire.load_secret()
    except RuntimeError:
        raise UserError(f"shoal federate needs the job's secret in {wire.SECRET_ENV}, "
                        "the same as the server's") from None  # fmt: skip
    comm = CommCounter()
    ctx = zmq.Context.instance()
    peer = Peer(ctx, f"tcp://{address}", secret, name, comm, timeout_s=timeout_s,
                max_bytes=1 << 31, target=TARGET)  # fmt: skip
    pushed = 0
    try:
        header, _ = peer.call({"op": "join"})
        job = loads_toml(str(header.get("config", "")))
        resolve(job)
        torch.manual_seed(job.train.seed)
        data = build_dataset(job.data)
        model = build_model(job.model, data)
        params = [p for p in model.parameters() if p.requires_grad]
        numel = sum(p.numel() for p in params)
        peer.max_bytes = max_bytes(numel)
        optimizer = build_optimizer(params, job.optim)
        dp = job.train.dp_clip > 0
        federation = build_federation(job, data, dp)
        mu = job.strategy.options.prox_mu

        def loss_fn(m: torch.nn.Module, batch: Any) -> torch.Tensor:
            return per_sample_loss(data.task, m(batch[0]), batch[1])

        while True:
            try:
                header, tensors = peer.call({"op": "work"}, timeout_s=timeout_s)
            except PeerLost:
                if pushed:  # the server finished and left
                    return pushed
                raise
            op = header.get("op")
            if op == "done":
                return pushed
            if op != "train":
                time.sleep(min(1.0, float(header.get("seconds", WAIT_S))))
                continue
            r, cid = int(header["round"]), int(header["client"])
            work = federation.client_work(r, cid)
            for group in optimizer.param_groups:
                group["lr"] = float(header["lr"])
            batches = [data.rows.take(rows) for rows in work.batches]
            global_x = tensors[0].to(torch.float64)
            change, loss_sum, _ = train_client(model, params, optimizer, batches, loss_fn, mu,
                                               global_x)  # fmt: skip
            peer.call({"op": "update", "round": r, "client": cid,
                       "loss_sum": float(loss_sum)}, [change.contiguous()])  # fmt: skip
            pushed += 1
    finally:
        peer.close()


def client_name() -> str:
    """This process's name at the server."""
    return f"client-{os.uname().nodename}-{os.getpid()}"
