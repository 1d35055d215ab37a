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

With ``--secure-agg`` the server never sees a change (Bonawitz et al. 2017, as
:mod:`shoal.secagg` runs it in the simulation). A client's ``update`` carries its
two public keys instead, and the process keeps the client's secrets and its
contribution (weighted, clipped where client-level DP is on). Once the round's
clients reported, the server asks the process holding each client, through
``work``, for the protocol's next steps, and routes what they send:

- ``share`` (peers, every client's public keys) -> ``shares`` (the client's
  secret shares, encrypted for each peer);
- ``mask`` (the shares sent to it) -> ``masked`` (its contribution in fixed point,
  masked: uniformly random alone);
- ``unmask`` (who sent a masked input) -> ``answers`` (the shares the server may
  have: of a self mask where the peer sent its input, of a mask key where not).

The server unmasks only the sum. A client that misses a step (its process died,
or ``--round-deadline`` passed; without a deadline a step waits
:data:`STEP_S`) drops out, and its masks are taken out with its peers' shares.

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

from shoal import secagg
from shoal.config import JobConfig, dumps_toml
from shoal.errors import UserError
from shoal.metrics import CommCounter
from shoal.strategies.federated.rounds import ClientWork, RoundTask
from shoal.strategies.ps import gate, wire

TARGET = "federation"
"""The listener's name in tokens and proofs."""
WAIT_S = 0.05
"""How long a client with nothing to do waits before asking again."""
FINISH_S = 3.0
"""How long the server, once done, keeps telling clients that ask that it is done."""
STEP_S = 30.0
"""Without --round-deadline, how long a step of secure aggregation waits for a client."""
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
class Secure:
    """A round's secure aggregation at the server: the public part of each client's."""

    holder: dict[int, str] = field(default_factory=dict)  # client -> the process with it
    keys: dict[int, secagg.Keys] = field(default_factory=dict)
    peers: dict[int, list[int]] = field(default_factory=dict)
    mail: dict[int, dict[int, bytes]] = field(default_factory=dict)  # from -> to -> blob
    masked: dict[int, np.ndarray] = field(default_factory=dict)
    answers: dict[int, dict[int, tuple[str, int]]] = field(default_factory=dict)
    sent: list[int] = field(default_factory=list)  # the clients whose masked input came
    step: str = "keys"  # the step under way: keys (while training), share, mask, unmask
    pending: set[int] = field(default_factory=set)  # clients yet to take it
    asked: set[int] = field(default_factory=set)  # clients whose process was asked to


@dataclass
class Round:
    """What the server knows of the round under way."""

    number: int
    todo: deque[ClientWork]
    given: dict[int, ClientWork] = field(default_factory=dict)
    handed: dict[int, float] = field(default_factory=dict)  # client -> when last handed out
    changes: dict[int, torch.Tensor] = field(default_factory=dict)
    loss_sum: float = 0.0
    secure: Secure | None = None

    @property
    def reported(self) -> dict[int, Any]:
        """The clients that reported: their changes, or with secure aggregation their keys."""
        return self.secure.keys if self.secure is not None else self.changes


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
        done, _ = self._train(task, global_x, lr, deadline_s, None)
        return done.changes, done.loss_sum, len(task.clients) - len(done.changes)

    def serve_secure_round(
        self, task: RoundTask, global_x: torch.Tensor, lr: float, deadline_s: float
    ) -> tuple[np.ndarray | None, float, int]:
        """A round under secure aggregation. Returns the sum of the reporting clients'
        contributions (fixed point; ``None`` where none reported), their loss sum, and
        the late ones. Raises :class:`~shoal.secagg.SecAggError` where too many dropped
        out to unmask the sum."""
        secure = Secure()
        done, deadline = self._train(task, global_x, lr, deadline_s, secure)
        late = len(task.clients) - len(secure.keys)
        ids = sorted(secure.keys)
        if not ids:
            return None, done.loss_sum, late
        self.round = done
        try:
            secure.peers = secagg.neighbours(ids, seed=(self.job.train.seed << 20) ^ done.number)
            self._step(secure, "share", ids, deadline)
            shared = set(secure.mail)
            self._step(secure, "mask", sorted(shared), deadline)
            secure.sent = sorted(secure.masked)
            self._step(secure, "unmask", secure.sent, deadline)
        finally:
            self.round = None
        late = len(task.clients) - len(secure.masked)
        if not secure.masked:
            return None, done.loss_sum, late
        summed = secagg.unmask_sum(secure.masked, secure.keys, secure.peers, shared,
                                   secure.answers)  # fmt: skip
        return summed, done.loss_sum, late

    def _train(
        self,
        task: RoundTask,
        global_x: torch.Tensor,
        lr: float,
        deadline_s: float,
        secure: Secure | None,
    ) -> tuple[Round, float]:
        """The round's training: until every client reported, or the deadline passed.
        Returns the round and its deadline (``monotonic`` time)."""
        self.round = Round(task.step, deque(task.clients), secure=secure)
        self.global_x, self.lr = global_x.detach().cpu().contiguous(), lr
        deadline = time.monotonic() + deadline_s if deadline_s else float("inf")
        want = len(task.clients)
        while len(self.round.reported) < want and time.monotonic() < deadline:
            self._serve(min(1.0, max(0.0, deadline - time.monotonic())))
        done, self.round = self.round, None
        return done, deadline

    def _step(self, secure: Secure, step: str, clients: list[int], deadline: float) -> None:
        """Run one step of secure aggregation: until each of ``clients`` took it, or the
        deadline (or :data:`STEP_S`, where the round has none) passed."""
        secure.step, secure.pending, secure.asked = step, set(clients), set()
        end = min(deadline, time.monotonic() + STEP_S)
        while secure.pending and time.monotonic() < end:
            self._serve(min(1.0, max(0.0, end - time.monotonic())))

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
        for key in ("round", "client"):  # ids are integers (a list would not even hash)
            if key in header and (type(header[key]) is not int):
                self.faults["malformed"] = self.faults.get("malformed", 0) + 1
                return {"op": "error", "error": f"{key} must be an integer"}, []
        if op == "hello":
            return self.listener.welcome(user, header), []
        if op == "join":
            return {"op": "job", "config": self.config}, []
        if op == "work":
            if self.finished:
                return {"op": "done"}, []
            if r is None:
                return {"op": "wait", "seconds": WAIT_S}, []
            if r.secure is not None and r.secure.step != "keys":
                return self._secure_task(user, r.number, r.secure), []
            if r.todo:
                client = r.todo.popleft()
            else:  # all handed out: hand again the one out longest, if out too long
                now = time.monotonic()
                out = [c for c in r.handed if c not in r.reported]
                oldest = min(out, key=r.handed.__getitem__, default=None)
                if oldest is None or now - r.handed[oldest] < patience(self.took):
                    return {"op": "wait", "seconds": WAIT_S}, []
                client = r.given[oldest]
                self.re_handed += 1
            r.given[client.client] = client
            r.handed[client.client] = time.monotonic()
            return {"op": "train", "round": r.number, "client": client.client,
                    "lr": self.lr}, [self.global_x]  # fmt: skip
        if op == "update" and r is not None and r.secure is not None:
            return self._secure_update(user, header, r), []
        if op in ("shares", "masked", "answers"):
            took = r is not None and r.secure is not None and self._secure_reply(
                user, op, header, tensors, r.number, r.secure)  # fmt: skip
            self.stale += not took
            return {"op": "ok", **({} if took else {"stale": True})}, []
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
            self._reported(r, cid, header)
            return {"op": "ok"}, []
        return {"op": "error", "error": f"unknown op {op!r}"}, []

    def _secure_update(self, user: str, header: dict, r: Round) -> dict:
        """A client's report under secure aggregation: its public keys, not its change."""
        s, cid = r.secure, header.get("client")
        assert s is not None
        keys = header.get("keys")
        fits = (header.get("round") == r.number and cid in r.given and cid not in s.keys
                and s.step == "keys" and isinstance(keys, list) and len(keys) == 2
                and all(_hex(k, 32) for k in keys))  # fmt: skip
        if not fits:
            self.stale += 1
            return {"op": "ok", "stale": True}
        s.keys[cid] = secagg.Keys(bytes.fromhex(keys[0]), bytes.fromhex(keys[1]))
        s.holder[cid] = user
        self._reported(r, cid, header)
        return {"op": "ok"}

    def _reported(self, r: Round, cid: int, header: dict) -> None:
        """A client reported: how long it was out, and its loss sum (where a number)."""
        self.took.append(time.monotonic() - r.handed[cid])
        loss = header.get("loss_sum", 0.0)
        if isinstance(loss, (int, float)) and np.isfinite(loss):
            r.loss_sum += float(loss)

    def _secure_task(self, user: str, number: int, s: Secure) -> dict:
        """The next step of secure aggregation for a client this process holds, if any."""
        cid = next((c for c in sorted(s.pending - s.asked) if s.holder.get(c) == user), None)
        if cid is None:
            return {"op": "wait", "seconds": WAIT_S}
        s.asked.add(cid)
        head = {"op": s.step, "round": number, "client": cid}
        if s.step == "share":
            keys = {str(u): [k.c.hex(), k.s.hex()] for u, k in s.keys.items()}
            return {**head, "peers": s.peers[cid], "keys": keys}
        if s.step == "mask":
            return {**head, "inbox": {str(u): m[cid].hex() for u, m in s.mail.items() if cid in m}}
        return {**head, "sent": s.sent}

    def _secure_reply(
        self, user: str, op: str, header: dict, tensors: list[torch.Tensor], number: int,
        s: Secure,
    ) -> bool:  # fmt: skip
        """Take a client's step of secure aggregation; whether it fit (the step under way,
        a client that process holds and was asked for, well formed)."""
        cid = header.get("client")
        want = {"share": "shares", "mask": "masked", "unmask": "answers"}.get(s.step)
        if (op != want or header.get("round") != number or cid not in s.pending
                or cid not in s.asked or s.holder.get(cid) != user):  # fmt: skip
            return False
        if op == "shares":
            mail = header.get("mail")
            peers = s.peers[cid]
            if not isinstance(mail, dict) or not all(
                _int(v) in peers and _hex(b, 512, exact=False) for v, b in mail.items()
            ):
                return False
            s.mail[cid] = {int(v): bytes.fromhex(b) for v, b in mail.items()}
        elif op == "masked":
            if not (len(tensors) == 1 and tensors[0].dtype == torch.int64
                    and tensors[0].numel() == self.numel + 2):  # fmt: skip
                return False
            s.masked[cid] = tensors[0].numpy().view(np.uint64).copy()
        else:
            answers = header.get("answers")
            if not (isinstance(answers, dict) and all(
                    _int(u) in s.keys and isinstance(a, list) and len(a) == 2
                    and a[0] in ("b", "s") and _hex(a[1], 70, exact=False)
                    for u, a in answers.items())):  # fmt: skip
                return False
            s.answers[cid] = {int(u): (a[0], int(a[1], 16)) for u, a in answers.items()}
        s.pending.discard(cid)
        return True

    def refused(self) -> dict[str, int]:
        """What was turned away: at the door (by reason), malformed messages (by kind),
        and stale updates (a round that was over, a client not handed out)."""
        return {**self.listener.refused(), **self.faults,
                **({"stale": self.stale} if self.stale else {})}  # fmt: skip

    def close(self) -> None:
        self.listener.close()


def _hex(value: Any, size: int, exact: bool = True) -> bool:
    """Whether ``value`` is a hex string of ``size`` bytes (at most, unless ``exact``)."""
    if not isinstance(value, str) or not value or len(value) > 2 * size:
        return False
    if exact and len(value) != 2 * size:
        return False
    try:
        int(value, 16)
    except ValueError:
        return False
    return True


def _int(value: Any) -> int | None:
    """``value`` (a JSON key) as a client id, or ``None``."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
