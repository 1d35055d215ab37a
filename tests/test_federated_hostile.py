"""The federation server against clients that know the job's secret and misbehave.

The server (``shoal train --strategy fedavg --listen``) runs as a process, honest
``shoal federate`` processes beside it; the misbehaving client is this test, over
the same authenticated wire. Every message it sends that the server must not take
is checked to be refused (an error, or ``ok`` marked stale), and the federation
must still end at the model the simulation gives.
"""

from __future__ import annotations

import json
import random
import re
import secrets
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import zmq

from shoal import secagg
from shoal.net import wire
from shoal.strategies.federated import checks
from shoal.strategies.federated.checks import Refused
from tests.conftest import (
    free_port,
    max_abs_diff,
    params,
    read_summary,
    shoal_env,
    start_train,
    train,
)

JOB = ["--model", "linear", "--data", "synthetic-linear", "--num-samples", "1000",
       "--optimizer", "sgd", "--lr", "0.05", "--seed", "2", "--strategy", "fedavg",
       "--local-steps", "1", "--batch-size", "16", "--workers", "1"]  # fmt: skip

# --- the checks alone ----------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_checks_take_exact_hex_ids_and_numbers_only():
    key = secagg.Client(0).advertise().c.hex()
    good = {"op": "update", "id": 1, "round": 0, "client": 3, "loss_sum": 2.5, "keys": [key, key]}
    assert checks.parse(good, [], 10, secure=True).keys == (bytes.fromhex(key),) * 2
    assert checks.parse({**good, "keys": [key.upper(), key]}, [], 10, secure=True).client == 3
    bad_hex = ["0x" + key[2:], key[:-1], key[:-2], key + "00", key[:9] + "_" + key[10:],
               " " + key[1:], "+" + key[1:], key[:3] + "\u0663" + key[4:], ""]  # fmt: skip
    bad = [
        *({"keys": [h, key]} for h in bad_hex),
        {"keys": [key]}, {"keys": key}, {"keys": [key, key, key]}, {"extra": 1},
        *({"loss_sum": x} for x in (float("nan"), float("inf"), 10**400, 1e301, True, "1")),
        *({"client": x} for x in (True, -1, 1.0, "3", [3], 2**62)),
        *({"id": x} for x in (None, True, "1", -1, 2**63)),
    ]  # fmt: skip
    for change in bad:
        with pytest.raises(Refused) as e:
            checks.parse({**good, **change}, [], 10, secure=True)
        assert e.value.kind == "malformed", change
    with pytest.raises(Refused):  # a secure update carries no change
        checks.parse(good, [torch.zeros(10, dtype=torch.float64)], 10, secure=True)
    plain = {k: v for k, v in good.items() if k != "keys"}
    assert checks.parse(plain, [torch.zeros(10, dtype=torch.float64)], 10, False).change.numel()
    for t in (torch.zeros(10), torch.zeros(11, dtype=torch.float64),
              torch.zeros(1, 10, dtype=torch.float64), torch.full((10,), float("nan"),
              dtype=torch.float64)):  # fmt: skip
        with pytest.raises(Refused):
            checks.parse(plain, [t], 10, secure=False)
    step = {"op": "masked", "id": 1, "round": 0, "client": 3}  # a client's own checks said no
    assert checks.parse({**step, "refused": "too few peers"}, [], 10, True).declined
    for bad_step in ({**step, "refused": ""}, {**step, "refused": 5}, {**step, "refused": "x",
                     "mail": {}}):  # fmt: skip
        with pytest.raises(Refused):
            checks.parse(bad_step, [], 10, secure=True)
    assert not checks.valid_point(bytes(32)) and checks.valid_point(bytes.fromhex(key))
    assert not checks.valid_point((1).to_bytes(32, "little"))
    answers = {"op": "answers", "id": 1, "round": 0, "client": 3}
    ok = checks.parse({**answers, "answers": {"0": ["b", "1f"], "12": ["s", "0"]}}, [], 1, True)
    assert ok.answers == {0: ("b", 31), 12: ("s", 0)}
    for a in ({"00": ["b", "1"]}, {" 1": ["b", "1"]}, {"+1": ["b", "1"]}, {"1": ["x", "1"]},
              {"1": ["b", "0x1"]}, {"1": ["b", "-1"]}, {"1": ["b", format(secagg.PRIME, "x")]},
              {"1": ["b", "1" * 133]}, {"1": ["b"]}, {"\uff11": ["b", "1"]}, []):  # fmt: skip
        with pytest.raises(Refused):
            checks.parse({**answers, "answers": a}, [], 1, secure=True)


# --- a client that can send anything ---------------------------------------------------------


class Raw(str):
    """A JSON literal Python's json would not write (``1e400``), put in a header as is."""


def pack(header: dict, tensors: list[torch.Tensor] = (), spec: Any = None) -> list[bytes]:
    """``header`` and ``tensors`` as frames, as :func:`wire.encode` makes them, but with
    whatever ``spec`` (the ``t`` list) and :class:`Raw` values one wants."""
    raws: list[str] = []

    def mark(x: Any) -> Any:
        if isinstance(x, Raw):
            raws.append(str(x))
            return f"\x00raw{len(raws) - 1}"
        if isinstance(x, dict):
            return {k: mark(v) for k, v in x.items()}
        if isinstance(x, list):
            return [mark(v) for v in x]
        return x

    if spec is None:
        spec = [[wire.DTYPE_NAMES[t.dtype], list(t.shape)] for t in tensors]
    text = json.dumps(mark({**header, "t": spec}), separators=(",", ":"))
    text = re.sub(r'"\\u0000raw(\d+)"', lambda m: raws[int(m.group(1))], text)
    frames = [text.encode()]
    for t in tensors:
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        frames.extend(raw[i : i + wire.FRAME_BYTES] for i in range(0, len(raw), wire.FRAME_BYTES))
        if not raw:
            frames.append(b"")
    return frames


class Conn:
    """One authenticated connection to the federation server (as a client process has)."""

    def __init__(self, address: str, secret: str, name: str) -> None:
        from shoal.metrics import CommCounter
        from shoal.net.peer import Peer
        from shoal.strategies.federated.remote import TARGET

        self.peer = Peer(zmq.Context.instance(), f"tcp://{address}", bytes.fromhex(secret),
                         name, CommCounter(), timeout_s=60, max_bytes=1 << 26,
                         target=TARGET)  # fmt: skip
        self.ids = iter(range(1 << 30, 1 << 31))

    def call(self, header: dict, tensors: list[torch.Tensor] = ()) -> tuple[dict, list]:
        return self.peer.call(header, tensors, timeout_s=60)

    def raw(self, frames: list[bytes]) -> dict:
        """Send ``frames`` as they are; the header of the answer (every message gets one)."""
        self.peer.sock.send_multipart(frames)
        assert self.peer.sock.poll(60_000), "the server did not answer"
        return json.loads(self.peer.sock.recv_multipart()[0])

    def close(self) -> None:
        self.peer.close()


class Local:
    """What a client process computes, as :func:`~shoal.strategies.federated.client.
    run_client` does: the job's data and model, a client's change, secure aggregation's
    replies (:class:`~shoal.strategies.federated.client.SecureClients`)."""

    def __init__(self, config: str) -> None:
        from shoal import privacy
        from shoal.data import build_dataset
        from shoal.jobfile import loads_toml
        from shoal.models import build_model
        from shoal.models.tasks import per_sample_loss
        from shoal.optim import build_optimizer
        from shoal.strategies import resolve
        from shoal.strategies.federated.client import SecureClients
        from shoal.strategies.federated.rounds import build_federation

        job = loads_toml(config)
        resolve(job)
        torch.manual_seed(job.train.seed)
        self.data = build_dataset(job.data)
        self.model = build_model(job.model, self.data)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.numel = sum(p.numel() for p in self.params)
        self.optimizer = build_optimizer(self.params, job.optim)
        budget = privacy.budget(job.train)
        self.federation = build_federation(job, self.data, budget.enabled)
        self.mu = job.strategy.options.prox_mu
        self.secure = SecureClients(job.strategy.options.secure_agg,
                                    budget.clip if budget.enabled else 0.0, job.train.seed,
                                    self.federation.clients)  # fmt: skip
        self.loss = lambda m, b: per_sample_loss(self.data.task, m(b[0]), b[1])

    def update(self, header: dict, tensors: list[torch.Tensor]) -> tuple[dict, list]:
        """The honest report of the client ``header`` (a ``train``) hands out."""
        from shoal.strategies.federated.local import train_client

        r, cid = header["round"], header["client"]
        work = self.federation.client_work(r, cid)
        for group in self.optimizer.param_groups:
            group["lr"] = float(header["lr"])
        batches = [self.data.rows.take(rows) for rows in work.batches]
        change, loss_sum, _ = train_client(self.model, self.params, self.optimizer, batches,
                                           self.loss, self.mu, tensors[0].double())  # fmt: skip
        update = {"op": "update", "round": r, "client": cid, "loss_sum": float(loss_sum)}
        if self.secure.on:  # (its loss rides in the masked input)
            keys = self.secure.keep(r, cid, change, work.examples, float(loss_sum))
            return {**update, "loss_sum": 0.0, "keys": keys}, []
        return update, [change.contiguous()]


# --- mutations --------------------------------------------------------------------------------

JUNK = [None, True, False, "0", "1", 0.0, 1.5, [], {}, [0], {"0": 0}, -1, 2**62, 2**64,
        10**30, Raw("1e400"), Raw("NaN"), Raw("-0.0"), "\u0661"]  # fmt: skip
JUNK_LOSS = [None, True, "1.0", [], {}, [1.0], Raw("NaN"), Raw("Infinity"), Raw("-Infinity"),
             Raw("1e400"), 10**400, 1e301, -1e301, Raw("1" + "0" * 5000)]  # fmt: skip
JUNK_ID = [None, True, "1", 1.5, [], {}, -1, 2**63, 10**30, Raw("1e3")]
FIELDS = ("foo", "keys", "mail", "answers", "nonce", "lr", "round", "client", "loss_sum",
          "seconds", "step", "worker", "peers", "inbox", "sent", "config", "kind")  # fmt: skip
BAD_KEYS = ["00", " 1", "1 ", "+1", "-1", "1.0", "1e0", "x", "", "\uff11", "999999"]
BAD_HEADERS = [b"", b"\xff\xfe", b"[1,2]", b'{"id":1}', b'{"op":5,"id":1}', b'{"op":"work"',
               b"null", b'"work"', b'{"op":"work","id":1,"t":"x"}',
               b'{"op":"work","id":1,"x":' + b"[" * 30000 + b"]" * 30000 + b"}"]  # fmt: skip


def bad_hex(h: str, rng: random.Random) -> Any:
    """``h`` (hex of a fixed size) mangled so that no exact check may take it."""
    return rng.choice([
        "0x" + h[2:], "0x" + h, h[:-1], h + "0", h[:-2], h + "00", h[:9] + "_" + h[10:],
        " " + h[1:], h[:-1] + "\n", "+" + h[1:], "-" + h[1:], h[:5] + "g" + h[6:],
        h[:3] + "\u0663" + h[4:], "", 5, None, [h], h * 2,
    ])  # fmt: skip


def bad_share(v: str, rng: random.Random) -> Any:
    """A share's hex (of any length) mangled: a sign, a prefix, too large, not hex."""
    return rng.choice([
        "0x" + v, " " + v, v + " ", "+" + v, "-" + v, v[:1] + "_" + v[1:] + "0", "g" + v,
        "\u0663" + v, "", format(secagg.PRIME, "x"), "f" * 131, "1" * 133, 5, None, [v],
    ])  # fmt: skip


class Hostile:
    """Sends mutated variants of a correct message, each of which the server must refuse.
    Counts them by protocol step."""

    def __init__(self, conn: Conn, seed: int, holding: Callable[[], set[int]]) -> None:
        self.conn, self.rng, self.holding = conn, random.Random(seed), holding
        self.sent: Counter[str] = Counter()
        self.round_clients: list[int] = []
        self.numel = 0

    def fuzz(self, step: str, header: dict, tensors: list[torch.Tensor], n: int) -> None:
        """``n`` mutations of the correct ``header`` and ``tensors`` of protocol step
        ``step``; asserts each was refused (``work``, ``join`` and ``hello``: an error;
        reports: an error, or ``ok`` marked stale)."""
        for _ in range(n):
            frames = self.mutate(header, tensors)
            reply = self.conn.raw(frames)
            refused = reply.get("op") == "error" or (
                step not in ("hello", "join", "work") and reply == {**reply, "op": "ok",
                                                                     "stale": True}
            )  # fmt: skip
            assert refused, (step, frames[0][:300], reply)
            self.sent[step] += 1

    def mutate(self, header: dict, tensors: list[torch.Tensor]) -> list[bytes]:
        rng = self.rng
        h = {**header, "id": next(self.conn.ids)}
        family = rng.choice(["field", "field", "field", "drop", "extra", "id", "tensor",
                             "frames", "op"])  # fmt: skip
        if family == "drop":
            h.pop(rng.choice([k for k in h if k != "op"]))
            return pack(h, tensors)
        if family == "extra":
            name = rng.choice([f for f in FIELDS if f not in h])
            h[name] = rng.choice([*JUNK, 1, "x", h.get("client", 0)])
            return pack(h, tensors)
        if family == "id":
            h["id"] = rng.choice(JUNK_ID)
            return pack(h, tensors)
        if family == "tensor":
            return pack(h, self.bad_tensors(h["op"], tensors))
        if family == "frames":
            return self.bad_frames(h, tensors)
        if family == "op":
            ops = ["Update", "update ", "UPDATE", "updat", "", "shares", "masked", "answers",
                   "train", "ok", "hello", "work\x00"]  # fmt: skip
            ops = [o for o in ops if o != h["op"] and not (o == "hello" and "nonce" in h)]
            h["op"] = rng.choice(ops)
            return pack(h, tensors)
        return pack(self.bad_field(h), tensors)

    def bad_field(self, h: dict) -> dict:
        """One of the message's own fields wrong: a type, a value, an id not ours."""
        rng = self.rng
        names = [k for k in h if k not in ("op", "id")] or ["id"]
        name = rng.choice(names)
        if name == "id":
            h["id"] = rng.choice(JUNK_ID)
        elif name == "nonce":
            h["nonce"] = rng.choice([None, 5, "", "x" * 65, ["a"], {"a": 1}])
        elif name == "round":
            h["round"] = rng.choice([*JUNK, h["round"] + 1, h["round"] + 1000])
        elif name == "client":
            others = self.others(h["client"])
            h["client"] = rng.choice([*JUNK, *others, *others, 10**6])
        elif name == "loss_sum":
            h["loss_sum"] = rng.choice(JUNK_LOSS)
        elif name == "keys":
            keys = list(h["keys"])
            pick = rng.random()
            if pick < 0.6:
                keys[rng.randrange(2)] = bad_hex(keys[0], rng)
                h["keys"] = keys
            elif pick < 0.8:
                h["keys"] = rng.choice([None, keys[0], keys[:1], [*keys, keys[0]], {"0": keys[0]},
                                        [1, 2], [keys[0], None]])  # fmt: skip
            else:  # a key of small order, for a client not this connection's (for one
                # of its own, the client would be left out of the round: see the test
                # of the deadline below)
                h["keys"] = [bytes(32).hex(), keys[1]]
                h["client"] = rng.choice([*self.others(h["client"]), 10**6])
        elif name in ("mail", "answers"):
            h[name] = self.bad_dict(name, h[name], h["client"])
        return h

    def others(self, cid: int) -> list[int]:
        """The round's clients this connection did not report (nor is reporting)."""
        return [c for c in self.round_clients if c not in self.holding() and c != cid]

    def bad_dict(self, name: str, d: dict, cid: int) -> Any:
        rng = self.rng
        if not d or rng.random() < 0.15:
            return rng.choice([None, [], "x", 5, [[k, v] for k, v in d.items()] or [[1, 2]]])
        d = dict(d)
        k = rng.choice(list(d))
        pick = rng.random()
        if pick < 0.3:  # a key that is no client id, or not one this may go to
            new = rng.choice([*BAD_KEYS, "0" + k, str(cid) if name == "mail" else "999999"])
            d[new] = d.pop(k)
        elif pick < 0.4 and name == "mail":  # one peer left out
            del d[k]
        elif pick < 0.5:  # one more, that is no peer
            d["999999"] = d[k]
        elif name == "mail":
            d[k] = bad_hex(d[k], rng)
        else:
            kind, v = d[k]
            d[k] = rng.choice([
                [kind, bad_share(v, rng)], [kind, bad_share(v, rng)],
                ["s" if kind == "b" else "b", v], ["x", v], [kind], [kind, v, v], v, None,
            ])  # fmt: skip
        return d

    def bad_tensors(self, op: str, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        rng = self.rng
        if not tensors:
            return [torch.zeros(rng.choice([0, 1, self.numel]), dtype=torch.float64)]
        t = tensors[0]
        options = [[], [t, t], [t.float()], [t[:-1]], [torch.cat([t, t[:1]])],
                   [t.reshape(1, -1)], [t.reshape(-1, 1)], [t[:0]]]  # fmt: skip
        if t.dtype == torch.float64:
            options += [[t.view(torch.int64)], [t.clone().fill_(float("nan"))],
                        [torch.where(torch.arange(len(t)) == 0, float("inf"), t)]]  # fmt: skip
        else:
            options += [[t.view(torch.float64)], [t.to(torch.int32)]]
        return rng.choice(options)

    def bad_frames(self, h: dict, tensors: list[torch.Tensor]) -> list[bytes]:
        rng = self.rng
        frames = pack(h, tensors)
        pick = rng.randrange(9)
        if pick == 0:
            return [*frames, b""]
        if pick == 1:
            return [*frames, b"\x00" * rng.choice([1, 8, 100])]
        if pick == 2 and len(frames) > 1:
            return frames[:-1]
        if pick == 3:
            return [frames[0]] + [b""] * rng.choice([2, 50, 2000])
        if pick == 4:  # the header lies about the tensors
            spec = rng.choice([[["float64", [self.numel + 5]]], [["complex64", [3]]],
                               [["float64", [-1]]], [["float64", [1], 3]], "x",
                               [["float64", [2**40]]], [["int64", [1] * 9]]])  # fmt: skip
            return pack(h, tensors, spec=spec)
        if pick == 5:
            return [frames[0], *frames]
        return [rng.choice(BAD_HEADERS), *frames[1:]]


# --- the hostile client process's loop --------------------------------------------------------

COUNTS = {"hello": 100, "join": 250, "work": 100, "update": 450, "share": 200, "mask": 150,
          "unmask": 200}  # fmt: skip
"""Mutations per step (per round for the rest, for the first client a round; 15 for others)."""


def hostile_client(address: str, secret: str, start: Callable[[], None], seed: int) -> Counter:
    """A client process that trains the clients it takes, and before each correct
    message sends many wrong ones. Returns how many it sent, by step. The honest
    process is started (``start``) once this one is ready to take clients, so the
    first round is this one's alone (every step of it fuzzed); then this one asks for
    work less often than the honest process, which takes most of the later rounds."""
    conn = Conn(address, secret, "hostile")
    held: dict[int, set[int]] = {}  # round -> clients this process reported
    answered: set[int] = set()  # clients of round 0 whose unmask step this process took
    current = {"round": -1}
    hostile = Hostile(conn, seed, lambda: held.get(current["round"], set()))
    hostile.fuzz("hello", {"op": "hello", "nonce": secrets.token_hex(16)}, [], COUNTS["hello"])
    hostile.fuzz("join", {"op": "join"}, [], COUNTS["join"])
    header, _ = conn.call({"op": "join"})
    local = Local(header["config"])
    hostile.numel = local.numel
    fuzzed: set[tuple[str, int]] = set()
    pause = 0.002  # between asks for work: sooner than the honest process, in round 0
    try:
        while True:
            if ("work", current["round"]) not in fuzzed:
                fuzzed.add(("work", current["round"]))
                hostile.fuzz("work", {"op": "work"}, [], COUNTS["work"])
                if current["round"] == -1:
                    start()
            mine = held.get(0, set())
            if mine == set(local.federation.chosen(0)) and (not local.secure.on
                                                            or answered == mine):  # fmt: skip
                pause = 1.0  # round 0 is over: the honest one (starting) asks more often
            header, tensors = conn.call({"op": "work"})
            op = header["op"]
            if op == "done":
                return hostile.sent
            if op == "wait":
                time.sleep(pause)
                continue
            r, cid = header["round"], header["client"]
            if r != current["round"]:
                current["round"] = r
                hostile.round_clients = local.federation.chosen(r)
            first = (op, r) not in fuzzed
            fuzzed.add((op, r))
            n = COUNTS["update" if op == "train" else op] if first else 15
            if op == "train":
                reply, out = local.update(header, tensors)
            else:
                reply, out = local.secure.step(header)
            hostile.fuzz("update" if op == "train" else reply["op"], reply, out, n)
            answer, _ = conn.call(reply, out)
            time.sleep(pause)
            if op == "train" and not answer.get("stale"):
                held.setdefault(r, set()).add(cid)
            elif op != "train":  # a step is asked of the holder only: it takes the reply
                assert answer == {**answer, "op": "ok"} and "stale" not in answer, answer
                if op == "unmask" and r == 0:
                    answered.add(cid)
    finally:
        conn.close()


def _serve_with(
    tmp_path: Path, job: list[str], guest: Callable[[str, str, Callable[[], None]], Any]
) -> tuple[Path, Any]:
    """The federation of ``job`` on loopback: its server, and ``guest(address, secret,
    start)`` in this process, which calls ``start()`` to start an honest ``shoal
    federate`` beside it (at once, if it does not). Each must end well. Returns the
    server's run directory and what ``guest`` returned."""
    secret, out = secrets.token_hex(32), tmp_path / "fed"
    env = {"SHOAL_SECRET": secret}
    # port 0: the server takes a free port and says which (a port picked here could be
    # taken by another process before the server binds it)
    server = start_train(out, *job, "--listen", "127.0.0.1:0", env=env)
    said: list[str] = []
    for line in server.stderr:
        said.append(line)
        if "federation server listening on " in line:
            address = line.rsplit(" ", 1)[1].strip().removeprefix("tcp://")
            break
    else:
        server.wait(timeout=60)
        raise AssertionError(f"the server did not listen:\n{''.join(said)}")
    reader = threading.Thread(target=lambda: said.extend(server.stderr), daemon=True)
    reader.start()
    honest: list[subprocess.Popen] = []

    def start() -> None:
        honest.append(subprocess.Popen(
            [*_shoal(), "federate", "--connect", address, "--timeout", "60"],
            env=shoal_env(env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        ))  # fmt: skip

    try:
        got = guest(address, secret, start)
        if not honest:
            start()
        server.wait(timeout=120)
        reader.join(timeout=10)
        err = "".join(said)
        _, honest_err = honest[0].communicate(timeout=60)
    finally:
        server.kill()
        for p in honest:
            p.kill()
    assert server.returncode == 0, err
    assert honest[0].returncode == 0, honest_err
    assert "internal error" not in err, err
    (out / "server.stderr").write_text(err)  # (read by a failing assertion)
    return out, got


def _shoal() -> list[str]:
    return [sys.executable, "-m", "shoal"]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secure"])
def test_the_server_survives_an_authenticated_client_that_sends_anything(tmp_path, secure):
    """An authenticated client process takes real clients and, at every step of the
    protocol (hello, join, work, update, and with --secure-agg the shares, the masked
    input and the answers), first sends over a thousand wrong variants of its correct
    message in all: wrong types, bad hex, wrong sizes, huge and non-finite numbers,
    other clients' ids, missing and extra fields, extra frames, wrong dtypes. Each is
    refused; the server runs on, and the federation ends at the simulation's model."""
    job = [*JOB, "--clients", "6", "--clients-per-round", "4", "--steps", "3",
           *(["--secure-agg"] if secure else [])]  # fmt: skip
    sim = tmp_path / "sim"
    train(sim, *job)
    out, sent = _serve_with(tmp_path, job, lambda *a: hostile_client(*a, seed=7))
    steps = ["hello", "join", "work", "update", *(["shares", "masked", "answers"] * secure)]
    assert set(sent) == set(steps) and all(sent[s] > 0 for s in steps), sent
    assert sent.total() >= 1000, sent
    assert max_abs_diff(params(out), params(sim)) < 1e-6
    fed = read_summary(out)["federated"]
    assert fed["rounds"] == 3 and fed["client_updates"] == 12, fed
    assert fed["rounds_unmasked_failed"] == 0 and fed["dropped_late"] == 0, fed
    refused = fed["refused"]
    assert "internal" not in refused, refused
    # every wrong message refused and in the summary, those of the server's last seconds
    # (answering late askers, when the last fuzz may arrive) too; its log says the same
    said = (out / "server.stderr").read_text()
    counted = re.findall(r"federation: refused (\d+) messages", said)
    assert sum(refused.values()) >= sent.total(), (refused, sent, said[-3000:])
    assert counted and int(counted[-1]) == sum(refused.values()), (refused, said[-3000:])
    assert refused["malformed"] > 0 and refused["not-holder"] > 0, refused


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_an_update_for_a_client_handed_to_another_connection_is_refused(tmp_path):
    """A process takes a client and vanishes; another authenticated connection sends an
    update of 1e6 for that client: refused and counted. The client is handed again to an
    honest process, and the model is the simulation's."""
    from shoal.net.peer import PeerError

    def impostor(address: str, secret: str, start: Callable[[], None]) -> None:
        holder = Conn(address, secret, "holder")
        header: dict = {}
        while header.get("op") != "train":
            header, tensors = holder.call({"op": "work"})
        other = Conn(address, secret, "impostor")
        r, cid = header["round"], header["client"]
        forged = torch.full_like(tensors[0], 1e6)
        with pytest.raises(PeerError, match="not-holder"):
            other.call({"op": "update", "round": r, "client": cid, "loss_sum": 0.0}, [forged])
        other.close()
        holder.close()  # gone, with the client

    job = [*JOB, "--clients", "4", "--local-steps", "2", "--steps", "3"]
    sim = tmp_path / "sim"
    train(sim, *job)
    out, _ = _serve_with(tmp_path, job, impostor)
    assert max_abs_diff(params(out), params(sim)) < 1e-6
    fed = read_summary(out)["federated"]
    assert fed["client_updates"] == 12 and fed["re_handed"] == 1, fed
    assert fed["refused"] == {"not-holder": 1}, fed


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_secure_round_past_its_deadline_unmasks_the_clients_on_time(tmp_path):
    """--secure-agg --listen --round-deadline: in the first round, clients 0 and 3 are
    held back past the deadline by whichever connection has them (so handing them again
    cannot save them: both client connections are this test's), and the secure steps
    still get their time; in the second round they advertise a public key of small
    order and are left out. Both rounds sum the other four clients, as the simulation
    does with clients 0 and 3 late (process 0 of 3)."""
    job = [*JOB, "--clients", "6", "--steps", "2", "--secure-agg"]
    sim = tmp_path / "sim"
    train(sim, *_with_workers(job, 3), "--round-deadline", "1",
          env={"SHOAL_FAULT": "slow:rank=0:ms=1500"})  # fmt: skip
    port, secret = free_port(), secrets.token_hex(32)
    address, out = f"127.0.0.1:{port}", tmp_path / "fed"
    server = start_train(out, *job, "--round-deadline", "4", "--listen", address,
                         env={"SHOAL_SECRET": secret})  # fmt: skip
    held_back, refused_keys, errors = {(0, 0), (0, 3)}, {(1, 0), (1, 3)}, []

    def client(name: str) -> None:
        try:
            _policy_client(address, secret, name, held_back, refused_keys)
        except BaseException as e:  # (raised in the test below)
            errors.append(e)

    threads = [threading.Thread(target=client, args=(f"c{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join(timeout=150)
        _, err = server.communicate(timeout=60)
    finally:
        server.kill()
    assert not errors, errors
    assert server.returncode == 0, err
    for run in (sim, out):
        fed = read_summary(run)["federated"]
        assert fed["client_updates"] == 2 * 4 and fed["dropped_late"] == 2 * 2, (run, fed)
        assert fed["rounds_unmasked_failed"] == 0, fed
    assert read_summary(out)["federated"]["refused"]["bad-key"] == 2
    assert max_abs_diff(params(out), params(sim)) < 1e-6


def _with_workers(job: list[str], n: int) -> list[str]:
    i = job.index("--workers")
    return [*job[:i], "--workers", str(n), *job[i + 2 :]]


def _policy_client(address: str, secret: str, name: str, held_back: set, bad_keys: set) -> None:
    """An honest client process, but for (round, client) pairs in ``held_back`` (never
    reported) and ``bad_keys`` (reported with a key of small order: refused)."""
    from shoal.errors import PeerLost
    from shoal.net.peer import PeerError

    conn = Conn(address, secret, name)
    try:
        header, _ = conn.call({"op": "join"})
        local = Local(header["config"])
        while True:
            try:
                header, tensors = conn.call({"op": "work"})
            except PeerLost:  # the server finished and left
                return
            op = header["op"]
            if op == "done":
                return
            if op == "wait":
                time.sleep(0.02)
                continue
            if op != "train":
                conn.call(*local.secure.step(header))
                continue
            at = (header["round"], header["client"])
            if at in held_back:
                continue
            reply, out = local.update(header, tensors)
            if at in bad_keys:
                with pytest.raises(PeerError, match="bad-key"):
                    conn.call({**reply, "keys": [bytes(32).hex(), reply["keys"][1]]})
                continue
            conn.call(reply, out)
    finally:
        conn.close()
