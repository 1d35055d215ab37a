"""Secure aggregation against a server that deviates: each client checks what the
protocol requires of the server (Bonawitz et al. 2017), so the attacks that would
reveal one client's update are refused.

Units play the server with :class:`shoal.secagg.Client` objects; the end-to-end test
runs honest ``shoal federate`` client processes against a malicious server built on
shoal's own authenticated listener.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import time
from collections import defaultdict, deque
from typing import Any

import numpy as np
import pytest
import torch
import zmq

from shoal import secagg
from shoal.net import gate, wire
from shoal.strategies.federated.remote import TARGET, max_bytes
from tests.conftest import shoal_env

# --- units: one round between Client objects, the server routing ------------------------


def _round(n: int = 4, seed: int = 3) -> tuple[dict, dict, dict]:
    """Clients through step 2 (keys shared, inboxes delivered), and their inputs."""
    clients = {u: secagg.Client(u) for u in range(n)}
    keys = {u: c.advertise() for u, c in clients.items()}
    peers = secagg.neighbours(list(clients), seed)
    mail = {u: c.share_keys(keys, peers[u], seed) for u, c in clients.items()}
    for v, c in clients.items():
        c.receive({u: out[v] for u, out in mail.items() if v in out})
    rng = np.random.default_rng(seed)
    inputs = {u: secagg.encode(rng.normal(0, 1, 50)) for u in clients}
    return clients, keys, inputs


def test_a_client_answers_the_unmasking_once_a_round():
    """Asked twice (every input sent, then the target's "dropped"), a client gives the
    target's self-mask share once and never its key share: the server gets fewer than
    t key shares and cannot take the target's pairwise masks off."""
    clients, _, inputs = _round()
    masked = {u: c.masked_input(inputs[u]) for u, c in clients.items()}
    first = {v: c.unmask(list(masked)) for v, c in clients.items()}
    assert all(first[v][0][0] == "b" for v in clients)
    for c in clients.values():
        with pytest.raises(secagg.SecAggError, match="twice"):
            c.unmask([u for u in masked if u != 0])


def test_a_client_whose_inbox_is_withheld_sends_no_input():
    """Without its peers' shares a client would mask with its self mask alone, which the
    unmasking removes: it refuses below the threshold of holders."""
    clients = {u: secagg.Client(u) for u in range(4)}
    keys = {u: c.advertise() for u, c in clients.items()}
    peers = secagg.neighbours(list(clients), 0)
    for u, c in clients.items():
        c.share_keys(keys, peers[u], 0)
    with pytest.raises(secagg.SecAggError, match="are needed"):
        clients[0].masked_input(secagg.encode(np.ones(5)))


def test_withholding_one_peer_and_calling_another_dropped_reveals_nothing():
    """Three clients: the server keeps w's shares from u (u still has t - 1 = 1 peer's),
    then tells u and w that only they sent inputs, r "dropped". It gets u's self-mask
    seed and r's mask key; u's input still carries its mask with w, so what is left is
    not u's update."""
    u, w, r = 0, 1, 2
    clients = {c: secagg.Client(c) for c in (u, w, r)}
    keys = {c: x.advertise() for c, x in clients.items()}
    peers = secagg.neighbours(list(clients), 0)
    mail = {c: x.share_keys(keys, peers[c], 0) for c, x in clients.items()}
    for v, x in clients.items():
        x.receive({c: out[v] for c, out in mail.items() if v in out and (c, v) != (w, u)})
    x_u = secagg.encode(np.array([0.5, -1.25, 3.0]))
    y_u = clients[u].masked_input(x_u)
    clients[w].masked_input(secagg.encode(np.zeros(3)))
    answers = {c: clients[c].unmask([u, w]) for c in (u, w)}
    b_u = secagg.rebuild({c: a[u][1] for c, a in answers.items() if a[u][0] == "b"}, 2)
    s_r = secagg.rebuild({c: a[r][1] for c, a in answers.items() if r in a}, 2)
    left = y_u - secagg.prg(b_u, 3)  # the server's best: both masks it can rebuild off
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    left -= secagg.prg(secagg.pair_seed(X25519PrivateKey.from_private_bytes(s_r),
                                        keys[u].s), 3)  # fmt: skip
    assert not np.array_equal(left, x_u)  # its mask with w is still on
    assert np.abs(secagg.decode(left) - secagg.decode(x_u)).max() > 1e3


def test_a_peer_s_garbage_shares_leave_only_that_peer_out():
    """A malicious client sends one peer bytes that do not open: that peer keeps the
    others' shares and still sends its input."""
    clients = {c: secagg.Client(c) for c in range(4)}
    keys = {c: x.advertise() for c, x in clients.items()}
    peers = secagg.neighbours(list(clients), 0)
    mail = {c: x.share_keys(keys, peers[c], 0) for c, x in clients.items()}
    mail[3][0] = bytes(12) + b"x" * (len(mail[3][0]) - 12)
    clients[0].receive({c: out[0] for c, out in mail.items() if 0 in out})
    assert clients[0].rejected == {3} and set(clients[0].held) == {0, 1, 2}
    clients[0].masked_input(secagg.encode(np.ones(4)))


def test_a_client_refuses_to_unmask_a_lone_input_or_a_list_without_itself():
    clients, _, inputs = _round()
    for c in clients.values():
        c.masked_input(inputs[c.id])
    with pytest.raises(secagg.SecAggError, match="at least"):
        clients[1].unmask([0, 1])  # two of four: below t = 3
    with pytest.raises(secagg.SecAggError, match="says it did not"):
        clients[2].unmask([0, 1, 3])  # it sent its input: the server lies about it


def test_a_client_refuses_bad_keys_and_peers_not_of_the_graph():
    """An all-zero (small-order) key, a key given twice, or peers other than the round's
    public graph: refused before any share leaves the client."""
    base = {u: secagg.Client(u) for u in range(4)}
    keys = {u: c.advertise() for u, c in base.items()}
    zero = {**keys, 3: secagg.Keys(bytes(32), keys[3].s)}
    with pytest.raises(secagg.SecAggError, match="small order"):
        base[0].share_keys(zero, [1, 2, 3], 0)
    twice = {**keys, 3: secagg.Keys(keys[2].c, keys[3].s)}
    with pytest.raises(secagg.SecAggError, match="twice"):
        base[0].share_keys(twice, [1, 2, 3], 0)
    with pytest.raises(secagg.SecAggError, match="neighbours"):
        base[1].share_keys(keys, [0], 0)  # one peer: t would be 2, its own share and one
    alone = secagg.Client(5)
    with pytest.raises(secagg.SecAggError, match="no peer"):
        alone.share_keys({5: alone.advertise()}, [], 0)


# --- end to end: a malicious server against honest client processes -----------------------


def _job() -> Any:
    """A secure federation of four clients, as ``shoal train --strategy fedavg
    --secure-agg --clients 4 --model linear ...`` resolves it."""
    from shoal.config import JobConfig
    from shoal.strategies import resolve

    job = JobConfig()
    job.strategy.name = "fedavg"
    resolve(job)
    opts = job.strategy.options
    opts.secure_agg, opts.clients, opts.local_steps = True, 4, 1
    job.model.name, job.data.name, job.data.num_samples = "linear", "synthetic-linear", 400
    job.train.batch_size, job.train.seed, job.train.steps = 16, 5, 3
    return job


class EvilServer:
    """A federation server that follows the wire, authenticates as the real one does,
    and deviates from the protocol where the test says."""

    def __init__(self, secret: bytes, config: str, numel: int) -> None:
        self.ctx = zmq.Context.instance()
        self.listener = gate.Listener(self.ctx, "tcp://127.0.0.1:0", secret, TARGET, 64)
        self.config, self.numel = config, numel
        self.global_x = torch.zeros(numel, dtype=torch.float64)
        self.train: deque[tuple[int, int]] = deque()  # (round, client) to hand out
        self.tasks: dict[str, deque[dict]] = defaultdict(deque)  # by holder: secure steps
        self.holder: dict[int, str] = {}
        self.replies: dict[tuple[str, int, int], list[tuple[dict, list]]] = defaultdict(list)
        self.done = False

    def serve(self, until: Any, timeout_s: float = 60.0) -> None:
        end = time.monotonic() + timeout_s
        while not until():
            assert time.monotonic() < end, "the clients did not answer in time"
            self.listener.watch_connections()
            if not self.listener.sock.poll(100):
                continue
            frames = self.listener.sock.recv_multipart(copy=False)
            ident, body = frames[0], frames[1:]
            header, tensors = wire.decode(body, max_bytes(self.numel))
            user = self.listener.user(body[0])
            reply, out = self._answer(user, header, tensors)
            frames = wire.encode({**reply, "id": header.get("id")}, out)
            self.listener.sock.send_multipart([ident, *frames], copy=False)

    def _answer(self, user: str, h: dict, tensors: list) -> tuple[dict, list]:
        op = h.get("op")
        if op == "hello":
            return self.listener.welcome(user, h), []
        if op == "join":
            return {"op": "job", "config": self.config}, []
        if op == "work":
            if self.done:
                return {"op": "done"}, []
            if self.tasks[user]:
                return self.tasks[user].popleft(), []
            if self.train:
                r, c = self.train.popleft()
                return {"op": "train", "round": r, "client": c, "lr": 0.05}, [self.global_x]
            return {"op": "wait", "seconds": 0.02}, []
        if op == "update":
            self.holder[h["client"]] = user
        self.replies[(op, h.get("round"), h.get("client"))].append((h, tensors))
        return {"op": "ok"}, []

    def ask(self, step: dict) -> None:
        self.tasks[self.holder[step["client"]]].append(step)

    def got(self, op: str, r: int, clients: list[int], n: int = 1) -> Any:
        return lambda: all(len(self.replies[(op, r, c)]) >= n for c in clients)

    def run_to_mask(self, r: int, withheld: int | None = None) -> dict[int, secagg.Keys]:
        """Train round ``r``'s four clients and run the share and mask steps (with
        ``withheld``'s inbox left empty)."""
        ids = [0, 1, 2, 3]
        self.train.extend((r, c) for c in ids)
        self.serve(self.got("update", r, ids))
        keys = {c: self.replies[("update", r, c)][0][0]["keys"] for c in ids}
        for c in ids:
            self.ask({"op": "share", "round": r, "client": c,
                      "peers": [p for p in ids if p != c],
                      "keys": {str(u): k for u, k in keys.items()}})  # fmt: skip
        self.serve(self.got("shares", r, ids))
        mail = {c: self.replies[("shares", r, c)][0][0]["mail"] for c in ids}
        for c in ids:
            inbox = {} if c == withheld else {str(u): m[str(c)] for u, m in mail.items()
                                               if str(c) in m}  # fmt: skip
            self.ask({"op": "mask", "round": r, "client": c, "inbox": inbox})
        self.serve(self.got("masked", r, ids))
        return {c: secagg.Keys(bytes.fromhex(k[0]), bytes.fromhex(k[1])) for c, k in keys.items()}

    def close(self) -> None:
        self.listener.close()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_honest_client_processes_defeat_a_malicious_server(tmp_path):
    """Three attacks by the server, each against target client 0, with two honest
    ``shoal federate`` processes: (1) its inbox withheld, so it would mask with its self
    mask alone: it sends no input; (2) every client asked to unmask twice, first with
    every input, then with the target "dropped", for both its self-mask and key shares:
    the second request is refused everywhere, and its key cannot be rebuilt; (3) a
    round whose only input is the target's: nobody helps unmask it."""
    from shoal.data import build_dataset
    from shoal.jobfile import dumps_toml
    from shoal.models import build_model

    job = _job()
    torch.manual_seed(job.train.seed)
    numel = sum(p.numel() for p in build_model(job.model, build_dataset(job.data)).parameters())
    secret = secrets.token_bytes(32)
    server = EvilServer(secret, dumps_toml(job), numel)
    env = shoal_env({wire.SECRET_ENV: secret.hex()})
    address = server.listener.address.removeprefix("tcp://")
    cmd = [sys.executable, "-m", "shoal", "federate", "--connect", address, "--timeout", "60"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]  # fmt: skip
    try:
        # (1) the target's inbox withheld: it refuses to send a masked input
        server.run_to_mask(0, withheld=0)
        target, _ = server.replies[("masked", 0, 0)][0]
        assert "refused" in target and not server.replies[("masked", 0, 0)][0][1]
        assert all(len(server.replies[("masked", 0, c)][0][1]) == 1 for c in (1, 2, 3))

        # (2) unmask asked twice: once with every input, then with the target dropped
        keys = server.run_to_mask(1)
        for c in range(4):
            server.ask({"op": "unmask", "round": 1, "client": c, "sent": [0, 1, 2, 3]})
        server.serve(server.got("answers", 1, [0, 1, 2, 3]))
        for c in range(4):
            server.ask({"op": "unmask", "round": 1, "client": c, "sent": [1, 2, 3]})
        server.serve(server.got("answers", 1, [0, 1, 2, 3], n=2))
        kinds: dict[str, dict[int, int]] = {"b": {}, "s": {}}
        for c in range(4):
            for h, _ in server.replies[("answers", 1, c)]:
                for kind, value in [h["answers"]["0"]] if "answers" in h else []:
                    kinds[kind][c] = int(value, 16)
            assert "refused" in server.replies[("answers", 1, c)][1][0]
        assert len(kinds["b"]) == 4 and not kinds["s"]  # only the self-mask shares left
        secagg.rebuild(kinds["b"], secagg.threshold(4))  # (what an honest round gives)
        with pytest.raises(secagg.SecAggError, match="needed"):
            secagg.rebuild(kinds["s"], secagg.threshold(4))  # its key: out of reach
        assert keys[0].s  # (the target's pairwise masks stay on its input)

        # (3) the target's input alone: nobody answers
        server.run_to_mask(2)
        for c in range(4):
            server.ask({"op": "unmask", "round": 2, "client": c, "sent": [0]})
        server.serve(server.got("answers", 2, [0, 1, 2, 3]))
        for c in range(4):
            h, _ = server.replies[("answers", 2, c)][0]
            assert "refused" in h and "answers" not in h, h
        server.done = True
        server.serve(lambda: all(p.poll() is not None for p in procs), timeout_s=30)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                print(p.stderr.read() if p.stderr else "", file=sys.stderr)
        server.close()
    errs = [p.stderr.read() if p.stderr else "" for p in procs]
    for p, err in zip(procs, errs):
        assert p.returncode == 0 and "Traceback" not in err, err
    assert "refused the server's" in "".join(errs)  # (said, and the processes went on)
