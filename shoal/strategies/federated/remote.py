"""A real federation: clients on other machines, over shoal's authenticated wire.

``shoal train --strategy fedavg --listen HOST:PORT`` runs the server: one process
that holds the global model and, each round, hands the round's clients to the
client processes that ask for work. ``shoal federate --connect HOST:PORT`` runs
a client process on another machine: it proves it knows the job's secret
(``SHOAL_SECRET``, the same on every machine; see
:mod:`shoal.net.gate`), receives the job, builds the data and the
clients' partitions itself (seeded: the same rows as the server's simulation
would give each client), and then, until the job is done: pulls a client and
the global model, trains the client locally, pushes its change.

Every message is shoal's wire (:mod:`shoal.net.wire`): a JSON header
and raw tensors, never pickle, parsed only after the peer authenticated. The
server weighs each change by the rows the *server* knows the client holds,
sums the round's changes in client order, and applies the same server step as
the simulation: a federation and a simulation with the same seeds end at the
same model.

Requests (client -> server), each answered:

- ``hello`` (with a nonce) -> ``welcome`` (the server's proof of the secret);
- ``join`` -> ``job`` (the job as TOML);
- ``work`` (with ``holds``: the one client whose own rows the process has) ->
  ``train`` (round, client, lr; the global model) | ``wait`` | ``done``;
- ``update`` (round, client, loss sum; its change) -> ``ok`` (a change for a round
  that is over, or a client that already reported, is dropped and counted as stale).

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
or stalled) drops out, and its masks are taken out with its peers' shares. Each
step waits up to its own window from when it starts: :data:`STEP_S` without
``--round-deadline``, else the deadline (at least :data:`STEP_MIN_S`). So a
client held back past the training deadline only drops out, and the others'
sum is unmasked, as the simulation keeps its on-time clients.

Authenticated is not trusted. Every field of every message is checked before it
is used (:mod:`~.checks`: exact fields, types, hex, sizes, finite numbers, the
tensors' dtype and shape, valid X25519 keys), and every report is bound to the
connection its client was handed to: an ``update`` (or a step's reply) for client
C is taken only from a connection C was handed to (from the one that reported
C's keys, for the steps). Whatever does not fit is answered with an error and
counted by kind in :meth:`FederationServer.refused` (``summary.json``'s
``federated.refused``): ``malformed`` (and the wire's ``truncated`` and
``oversized``), ``not-holder``, ``bad-key`` (a public key of small order, or one
the round already has: that client is left out of the round, as a late one is),
``stale`` (a report that came too late, from a connection that was handed the
client; answered ``ok``), ``declined`` (a client whose own checks refused a step
of secure aggregation: it drops out) and ``internal`` (a message that made the
server fail: a bug, logged with its traceback). No message ends the round or the
job.

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
import traceback
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import zmq

from shoal import secagg
from shoal.config import JobConfig
from shoal.data import partition
from shoal.errors import UserError
from shoal.jobfile import dumps_toml
from shoal.metrics import CommCounter
from shoal.net import gate, wire
from shoal.strategies.federated import checks
from shoal.strategies.federated.checks import Message, Refused
from shoal.strategies.federated.rounds import ClientWork, RoundTask
from shoal.strategies.federated.secure_rounds import WAIT_S, Secure, SecureRounds

TARGET = "federation"
"""The listener's name in tokens and proofs."""
FINISH_S = 3.0
"""How long the server, once done, keeps telling clients that ask that it is done."""
MAX_EXAMPLES = 1 << 40
"""The most rows a client bringing its own data may say it has (its update's weight)."""
PATIENCE_S = 2.0
"""The least time a client is out before it is handed to another process."""
KEEP_ROUNDS = 64
"""Rounds whose hand-outs the server remembers, to tell a late report (stale) from one
by a connection that was never handed that client (refused). Reports for older rounds
are stale."""
LOGGED_INTERNAL = 3
"""Tracebacks of messages that made the server fail, printed (the rest are counted)."""


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
    holders: dict[int, set[str]] = field(default_factory=dict)  # client -> connections
    changes: dict[int, torch.Tensor] = field(default_factory=dict)
    examples: dict[int, int] = field(default_factory=dict)  # rows a client says it has
    loss_sum: float = 0.0
    secure: Secure | None = None
    faulty: set[int] = field(default_factory=set)  # left out: they advertised bad keys

    @property
    def reported(self) -> dict[int, Any]:
        """The clients that reported: their changes, or with secure aggregation their keys."""
        return self.secure.keys if self.secure is not None else self.changes


class FederationServer(SecureRounds):
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
        self.secure = bool(job.strategy.options.secure_agg)
        # --partition files: the clients' rows are their own; each says how many it has
        self.own_data = partition.parse(job.strategy.options.partition).kind == "files"
        # what a client may send: one tensor of the model's size (a masked input: + 3)
        self.limit = 8 * (numel + 3)
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
        self.faults: Counter[str] = Counter()  # refused messages, by kind
        self.offenders: Counter[str] = Counter()  # refused messages, by connection
        self.handouts: dict[int, dict[int, set[str]]] = {}  # round -> client -> connections
        self.forgotten = -1  # the last round whose hand-outs were let go
        self.round: Round | None = None
        self.finished = False
        print(f"shoal: federation server listening on {self.listener.address}",
              file=sys.stderr, flush=True)  # fmt: skip

    # --- rounds -------------------------------------------------------------------------

    def serve_round(
        self, task: RoundTask, global_x: torch.Tensor, lr: float, deadline_s: float
    ) -> tuple[dict[int, tuple[torch.Tensor, int]], float, int]:
        """Hand out the round's clients until every one reported, or the deadline passed.
        Returns each reporting client's change and weight (its rows: as the server's
        federation deals them, or, where the clients bring their own data, as each
        reported), their loss sum, and the late ones."""
        done = self._train(task, global_x, lr, deadline_s, None)
        weights = {c.client: c.examples for c in task.clients}
        if self.own_data:
            weights = done.examples
        out = {cid: (change, weights[cid]) for cid, change in done.changes.items()}
        return out, done.loss_sum, len(task.clients) - len(done.changes)

    def _train(
        self,
        task: RoundTask,
        global_x: torch.Tensor,
        lr: float,
        deadline_s: float,
        secure: Secure | None,
    ) -> Round:
        """The round's training: until every client reported (or was left out for bad
        keys), or the deadline passed."""
        self.round = Round(task.step, deque(task.clients), holders=self._remember(task.step),
                           secure=secure)  # fmt: skip
        self.global_x, self.lr = global_x.detach().cpu().contiguous(), lr
        deadline = time.monotonic() + deadline_s if deadline_s else float("inf")
        want = len(task.clients)
        while (len(self.round.reported) + len(self.round.faulty) < want
               and time.monotonic() < deadline):  # fmt: skip
            self._serve(min(1.0, max(0.0, deadline - time.monotonic())))
        done, self.round = self.round, None
        return done

    def _remember(self, number: int) -> dict[int, set[str]]:
        """The record of round ``number``'s hand-outs (the oldest beyond
        :data:`KEEP_ROUNDS` let go)."""
        holders = self.handouts.setdefault(number, {})
        while len(self.handouts) > KEEP_ROUNDS:
            oldest = min(self.handouts)
            del self.handouts[oldest]
            self.forgotten = max(self.forgotten, oldest)
        return holders

    def finish(self) -> None:
        """Tell the clients that ask in the next seconds that the job is done."""
        self.finished = True
        end = time.monotonic() + FINISH_S
        while time.monotonic() < end:
            self._serve(0.2)
        if self.offenders:
            worst = ", ".join(f"{name} ({n})" for name, n in self.offenders.most_common(3))
            print(f"shoal: federation: refused {self.offenders.total()} messages from "
                  f"{len(self.offenders)} connections, most from {worst}",
                  file=sys.stderr, flush=True)  # fmt: skip

    # --- messages -----------------------------------------------------------------------

    def _serve(self, timeout_s: float) -> None:
        """Take one message, if one comes within ``timeout_s``, and answer it. Whatever
        the message, the server goes on: a refusal or a failure is counted and answered."""
        self.listener.watch_connections()
        if not self.listener.sock.poll(int(timeout_s * 1000)):
            return
        frames = self.listener.sock.recv_multipart(copy=False)
        ident, body = frames[0], frames[1:]
        self.comm.add(received=wire.message_bytes(body))
        rid = wire.request_id(body)
        if rid is not None and not 0 <= rid < 2**63:  # (echoed in the reply)
            rid = None
        user = "?"
        try:
            user = self.listener.user(body[0])
            reply, out = self._handle(user, body)
        except Refused as e:
            reply, out = self._refuse(user, e.kind, str(e)), []
        except Exception:  # a bug, not the client's fault: counted, logged, answered
            reply, out = self._failed(user), []
        self._reply(ident, {**reply, "id": rid}, out)

    def _handle(self, user: str, body: list[Any]) -> tuple[dict, list[torch.Tensor]]:
        """The answer to one message from connection ``user``; raises :class:`Refused`."""
        if len(body) > 1 + wire.num_frames(self.limit):  # more than one tensor's worth
            raise Refused("oversized", f"{len(body)} frames")
        try:
            header, tensors = wire.decode(body, self.limit, frame_cap=self.listener.frame_bytes)
        except wire.WireError as e:
            raise Refused(e.kind, str(e)) from None
        msg = checks.parse(header, tensors, self.numel, self.secure)
        if msg.op == "hello":
            return self.listener.welcome(user, {"nonce": msg.nonce}), []
        if msg.op == "join":
            return {"op": "job", "config": self.config}, []
        if msg.op == "work":
            if self.own_data and msg.holds is None:
                raise Refused("malformed", "this federation's clients bring their own rows: "
                              "a process says which client it holds")  # fmt: skip
            return self._work(user, msg.holds)
        if msg.op == "update":
            return self._update(user, msg), []
        return self._step_reply(user, msg), []

    def _reply(self, ident: Any, header: dict, tensors: list[torch.Tensor] = ()) -> None:
        try:
            frames = wire.encode(header, list(tensors), self.listener.frame_bytes)
        except ValueError:  # a reply over the frame limit: the server's fault
            frames = wire.encode({**self._failed("?"), "id": header.get("id")})
        self.comm.add(sent=wire.message_bytes(frames))
        self.listener.sock.send_multipart([ident, *frames], copy=False)

    def _refuse(self, user: str, kind: str, detail: str) -> dict:
        """Count a refused message against its kind and its connection; the answer."""
        self.faults[kind] += 1
        name = user.split("|")[0]
        if not self.offenders[name]:  # once per connection: its later ones are counted
            print(f"shoal: federation: refusing a message from {name} ({kind}: {detail[:120]})",
                  file=sys.stderr, flush=True)  # fmt: skip
        self.offenders[name] += 1
        return {"op": "error", "kind": kind, "error": f"{kind}: {detail}"[:200]}

    def _failed(self, user: str) -> dict:
        """A message that made the server fail: counted as ``internal``, its traceback
        logged (a few), and answered with an error; the round goes on."""
        reply = self._refuse(user, "internal", "the server failed on this message")
        if self.faults["internal"] <= LOGGED_INTERNAL:
            print(f"shoal: federation: internal error on a message (a bug; the server goes "
                  f"on):\n{traceback.format_exc()}", file=sys.stderr, flush=True)  # fmt: skip
        return reply

    def _stale(self) -> dict:
        self.stale += 1
        return {"op": "ok", "stale": True}

    def _handed(self, user: str, number: int, cid: int) -> None:
        """Raise :class:`Refused` unless client ``cid`` of round ``number`` was handed to
        connection ``user`` (or the round is too old to tell: its reports are stale)."""
        if number <= self.forgotten:
            return
        if user not in self.handouts.get(number, {}).get(cid, ()):
            raise Refused("not-holder", f"client {cid} of round {number} is not this "
                          "connection's")  # fmt: skip

    def _work(self, user: str, holds: int | None) -> tuple[dict, list[torch.Tensor]]:
        """A client process asks for work: a client to train, a step of secure
        aggregation, or to wait. A process that ``holds`` a client's own rows is handed
        that client only."""
        r = self.round
        if self.finished:
            return {"op": "done"}, []
        if r is None:
            return {"op": "wait", "seconds": WAIT_S}, []
        if r.secure is not None and r.secure.step != "keys":
            return self._secure_task(user, r.number, r.secure), []
        client = self._next_client(r, holds)
        if client is None:
            return {"op": "wait", "seconds": WAIT_S}, []
        r.given[client.client] = client
        r.handed[client.client] = time.monotonic()
        r.holders.setdefault(client.client, set()).add(user)
        return {"op": "train", "round": r.number, "client": client.client,
                "lr": self.lr}, [self.global_x]  # fmt: skip

    def _next_client(self, r: Round, only: int | None) -> ClientWork | None:
        """The client to hand out (``only`` that one, if given): the next not yet handed
        out, else the one out longest if it has been out too long (:func:`patience`)."""
        fresh = [c for c in r.todo if only is None or c.client == only][:1]
        if fresh:
            r.todo.remove(fresh[0])
            return fresh[0]
        out = [c for c in r.handed if c not in r.reported and c not in r.faulty
               and only in (None, c)]  # fmt: skip
        oldest = min(out, key=r.handed.__getitem__, default=None)
        if oldest is None or time.monotonic() - r.handed[oldest] < patience(self.took):
            return None
        self.re_handed += 1
        return r.given[oldest]

    def _update(self, user: str, msg: Message) -> dict:
        """A client's report: its change, or with secure aggregation its public keys."""
        r, cid = self.round, msg.client
        on_time = (r is not None and msg.round == r.number and cid not in r.reported
                   and cid not in r.faulty
                   and (r.secure is None or r.secure.step == "keys"))  # fmt: skip
        if msg.keys is not None and (why := self._bad_keys(cid, msg.keys)):
            if on_time and user in r.holders.get(cid, ()):  # a faulty client: left out
                r.faulty.add(cid)
            raise Refused("bad-key", f"client {cid} advertised {why}")
        self._handed(user, msg.round, cid)
        if not on_time:
            return self._stale()
        assert r is not None
        if msg.keys is not None:
            assert r.secure is not None
            r.secure.keys[cid] = secagg.Keys(*msg.keys)
            r.secure.holder[cid] = user
        else:
            assert msg.change is not None
            if self.own_data and not (msg.examples and 0 < msg.examples <= MAX_EXAMPLES):
                raise Refused("malformed", f"client {cid} must say how many rows it has "
                              f"(1 to {MAX_EXAMPLES})")  # fmt: skip
            r.changes[cid] = msg.change.clone()
            r.examples[cid] = msg.examples or 0
        self.took.append(time.monotonic() - r.handed[cid])
        r.loss_sum += msg.loss_sum
        return {"op": "ok"}

    def refused(self) -> dict[str, int]:
        """What was turned away: at the door (by reason), refused messages (by kind: see
        the module's docstring), and stale reports."""
        total = Counter(self.listener.refused())  # (the door's kinds may be the same)
        total.update(self.faults)
        if self.stale:
            total["stale"] += self.stale
        return dict(total)

    def close(self) -> None:
        self.listener.close()
