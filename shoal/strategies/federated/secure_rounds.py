"""A federation's server under secure aggregation (``--secure-agg``): the steps after
the clients' keys, in which the server learns only the sum of a round's updates.

:class:`SecureRounds` is the part of :class:`~shoal.strategies.federated.remote.
FederationServer` that runs them: each step (share, mask, unmask) is handed to the
connection that reported the client's keys, and each reply is checked against the
round before it is taken (see :mod:`shoal.secagg` for the protocol).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from shoal import secagg
from shoal.strategies.federated import checks
from shoal.strategies.federated.checks import Message, Refused
from shoal.strategies.federated.rounds import RoundTask

if TYPE_CHECKING:
    import torch

STEP_S = 30.0
"""Without --round-deadline, how long a step of secure aggregation waits for a client."""
STEP_MIN_S = 5.0
"""With --round-deadline, the least time a step of secure aggregation waits for a client
(a short deadline is sized for training, not for a process to poll and answer)."""
WAIT_S = 0.05
"""How long a client with nothing to do waits before asking again."""


@dataclass
class Secure:
    """A round's secure aggregation at the server: the public part of each client's."""

    holder: dict[int, str] = field(default_factory=dict)  # client -> the connection with it
    keys: dict[int, secagg.Keys] = field(default_factory=dict)
    peers: dict[int, list[int]] = field(default_factory=dict)
    mail: dict[int, dict[int, bytes]] = field(default_factory=dict)  # from -> to -> blob
    masked: dict[int, np.ndarray] = field(default_factory=dict)
    answers: dict[int, dict[int, tuple[str, int]]] = field(default_factory=dict)
    sent: list[int] = field(default_factory=list)  # the clients whose masked input came
    step: str = "keys"  # the step under way: keys (while training), share, mask, unmask
    pending: set[int] = field(default_factory=set)  # clients yet to take it
    asked: set[int] = field(default_factory=set)  # clients whose process was asked to


REPLY = {"share": "shares", "mask": "masked", "unmask": "answers"}
"""What a client sends back for each step of secure aggregation."""


class SecureRounds:
    """The secure-aggregation steps of a federation's server (a part of it: the round
    loop, the listener and the refusals are :class:`FederationServer`'s)."""

    round: Any  # (the round under way: remote.Round, or None)
    job: Any
    faults: Any
    # (the server's round loop and answers, used by the steps)
    _train: Callable[..., Any]
    _serve: Callable[[float], None]
    _handed: Callable[[str, int, int], None]
    _stale: Callable[[], dict]

    def serve_secure_round(
        self, task: RoundTask, global_x: torch.Tensor, lr: float, deadline_s: float
    ) -> tuple[np.ndarray | None, float, int]:
        """A round under secure aggregation. Returns the sum of the reporting clients'
        contributions (fixed point; ``None`` where none reported), their loss sum, and
        the late ones. Raises :class:`~shoal.secagg.SecAggError` where too many dropped
        out to unmask the sum."""
        secure = Secure()
        done = self._train(task, global_x, lr, deadline_s, secure)
        late = len(task.clients) - len(secure.keys)
        ids = sorted(secure.keys)
        if not ids:
            return None, done.loss_sum, late
        # each step's own window, from when it starts: the training deadline may be past
        window = max(STEP_MIN_S, deadline_s) if deadline_s else STEP_S
        self.round = done
        try:
            secure.peers = secagg.neighbours(ids, secagg.graph_seed(self.job.train.seed,
                                                                    done.number))  # fmt: skip
            self._step(secure, "share", ids, window)
            shared = set(secure.mail)
            self._step(secure, "mask", sorted(shared), window)
            secure.sent = sorted(secure.masked)
            self._step(secure, "unmask", secure.sent, window)
        finally:
            self.round = None
        late = len(task.clients) - len(secure.masked)
        if not secure.masked:
            return None, done.loss_sum, late
        summed = secagg.unmask_sum(secure.masked, secure.keys, secure.peers, shared,
                                   secure.answers)  # fmt: skip
        # the last word is the loss sum (it rides masked: the server learns no client's)
        return summed[:-1], float(secagg.decode(summed[-1:])[0]), late

    def _step(self, secure: Secure, step: str, clients: list[int], window_s: float) -> None:
        """Run one step of secure aggregation: until each of ``clients`` took it, or
        ``window_s`` passed."""
        secure.step, secure.pending, secure.asked = step, set(clients), set()
        end = time.monotonic() + window_s
        while secure.pending and time.monotonic() < end:
            self._serve(min(1.0, max(0.0, end - time.monotonic())))

    def _bad_keys(self, cid: int, keys: tuple[bytes, bytes]) -> str:
        """What is wrong with the public keys client ``cid`` advertises (``""``: nothing).
        A key of small order agrees an all-zero secret; a key that another client of the
        round has (or both the same) would make every peer refuse the round's keys."""
        if not all(map(checks.valid_point, keys)):
            return "a public key of small order"
        s = self.round.secure if self.round is not None else None
        others = [k for u, k in s.keys.items() if u != cid] if s is not None else []
        if keys[0] == keys[1] or any(k in (o.c, o.s) for o in others for k in keys):
            return "a public key that is already the round's"
        return ""

    def _secure_task(self, user: str, number: int, s: Secure) -> dict:
        """The next step of secure aggregation for a client this connection holds, if any."""
        cid = next((c for c in sorted(s.pending - s.asked) if s.holder.get(c) == user), None)
        if cid is None:
            return {"op": "wait", "seconds": WAIT_S}
        s.asked.add(cid)
        head = {"op": s.step, "round": number, "client": cid}
        if s.step == "share":  # every key of the round: the client checks its peers by them
            keys = {str(u): [k.c.hex(), k.s.hex()] for u, k in s.keys.items()}
            return {**head, "peers": s.peers[cid], "keys": keys}
        if s.step == "mask":
            return {**head, "inbox": {str(u): m[cid].hex() for u, m in s.mail.items() if cid in m}}
        return {**head, "sent": s.sent}

    def _step_reply(self, user: str, msg: Message) -> dict:
        """A client's reply to a step of secure aggregation: taken from the connection
        that reported the client's keys, for the step under way, where it fits the round."""
        r, cid = self.round, msg.client
        s = r.secure if r is not None and msg.round == r.number else None
        if s is None:  # not this round's: late, if from a connection that had the client
            self._handed(user, msg.round, cid)
            return self._stale()
        if s.holder.get(cid) != user:
            raise Refused("not-holder", f"client {cid}'s steps are not this connection's")
        if msg.op != REPLY.get(s.step) or cid not in s.pending or cid not in s.asked:
            return self._stale()
        if msg.declined:  # its own checks refused the step: it drops out, as a late one
            self.faults["declined"] += 1
        elif msg.mail is not None:
            if sorted(msg.mail) != s.peers[cid]:
                raise Refused("malformed", f"client {cid}'s shares must go to its peers, "
                              "one to each")  # fmt: skip
            s.mail[cid] = msg.mail
        elif msg.masked is not None:
            s.masked[cid] = msg.masked
        elif msg.answers is not None:
            may = {u: "b" if u in s.sent else "s" for u, m in s.mail.items() if cid in m}
            may[cid] = "b"  # its own share of its own self mask
            if any(may.get(u) != kind for u, (kind, _) in msg.answers.items()):
                raise Refused("malformed", f"client {cid} answered for shares it does not "
                              "hold, or the other kind of share")  # fmt: skip
            s.answers[cid] = msg.answers
        s.pending.discard(cid)
        return {"op": "ok"}
