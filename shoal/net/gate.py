"""Who may talk to a shard or the coordinator: authentication at the connection.

A peer proves it knows the job's secret *before* ZeroMQ hands any of its
messages to shoal, so a peer that has not cannot make a listener hold more
than one small handshake frame:

- Listening sockets use ZeroMQ's PLAIN mechanism with a ZAP handler
  (:class:`Gatekeeper`, RFC 27). A client's PLAIN password is a one-time
  token ``TS.NONCE.HMAC(secret, "client"|user|target|TS|NONCE)`` bound to the
  listener it is meant for (``coordinator``, ``shard-3``) and to a time window;
  each nonce is accepted once. libzmq does not pass a connection's messages on
  (not even a part of a multipart message) until the handler says yes, and
  every frame on these sockets is capped (tensors travel as several frames), so
  an unauthenticated peer is held to one frame of the handshake,
  :data:`HANDSHAKE_S` seconds, and a connection count (:data:`MAX_CONNECTIONS`):
  a listener's frame cap times its connection cap is at most
  :data:`STRANGERS_BYTES` (:func:`frame_bytes`: 64 KiB frames where 1,024
  connections are allowed, 1 MiB at a shard's 64).
- The listener proves itself in turn: a client's first request is ``hello``
  with a fresh nonce, answered by ``HMAC(secret, "server"|target|user|...)``
  (:func:`server_proof`); a client refuses a listener that cannot answer
  (:class:`~shoal.errors.PeerRejected`). Labels differ by direction and tokens
  name their target, so no proof can be replayed the other way, or relayed to
  another listener, by a process that grabbed a restarting shard's port.

Tokens cross the wire in the clear: they are one-time, so a passive observer
gains nothing by replaying one. Traffic is authenticated, not encrypted
(ZeroMQ's CURVE would encrypt, at about a quarter of the throughput measured
here; see docs/FAULTS.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import socket
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from shoal.net.wire import FRAME_BYTES, LARGE_FRAME_BYTES

HANDSHAKE_S = 5.0
"""A connection that has not authenticated by then is closed (``ZMQ_HANDSHAKE_IVL``)."""
MAX_CONNECTIONS = 1024
"""Open connections per listener, at least (:func:`max_connections`); newer ones are cut.
An idle connection that has not authenticated costs a few KB, and is closed after
:data:`HANDSHAKE_S`; a job needs about three per worker at the coordinator."""
TOKEN_WINDOW_S = 600.0
"""How far a token's time may be from the listener's clock (machines' clocks must agree
this well); nonces are remembered this long, so a token is accepted once."""
ZAP_ENDPOINT = "inproc://zeromq.zap.01"


def max_connections(job: Any) -> int:
    """The connection cap of a job's listeners: room for every worker's connections."""
    return max(MAX_CONNECTIONS, 4 * (job.world_size + job.cluster.nnodes + job.cluster.servers))


SHARD_CONNECTIONS = 64
"""Open connections per parameter-server shard, at least (:func:`shard_connections`)."""
STRANGERS_BYTES = 64 << 20
"""What all the connections of one listener that have not authenticated may make it
hold at most: its connection cap times its largest frame (:func:`frame_bytes`)."""


def shard_connections(job: Any) -> int:
    """The connection cap of a shard: a connection from each worker and from the
    coordinator, with room for replacements' new ones while the old ones close."""
    return max(SHARD_CONNECTIONS, 4 * (job.world_size + job.cluster.nnodes + job.cluster.servers))


def frame_bytes(max_connections: int) -> int:
    """The largest frame a listener with this connection cap takes: a power of two from
    :data:`FRAME_BYTES` to :data:`LARGE_FRAME_BYTES` such that every connection's one
    frame of the handshake fits in :data:`STRANGERS_BYTES` (1 MiB for 64 connections;
    64 KiB for the 1,024 of a coordinator or a federation's server)."""
    size = LARGE_FRAME_BYTES
    while size > FRAME_BYTES and size * max(1, max_connections) > STRANGERS_BYTES:
        size //= 2
    return size


def _mac(secret: bytes, *parts: str) -> str:
    return hmac.new(secret, "|".join(("shoal-ps", *parts)).encode(), hashlib.sha256).hexdigest()


def client_token(secret: bytes, user: str, target: str, now: float | None = None) -> str:
    """The PLAIN password of a connection from ``user`` to the listener ``target``."""
    ts, nonce = str(int(time.time() if now is None else now)), secrets.token_hex(16)
    return f"{ts}.{nonce}.{_mac(secret, 'client', user, target, ts, nonce)}"


def server_proof(secret: bytes, target: str, user_id: str, nonce: str) -> str:
    """What listener ``target`` answers to the ``hello`` of the connection ``user_id``."""
    return _mac(secret, "server", target, user_id, nonce)


@dataclass
class Door:
    """One listener's entry in the gatekeeper: its secret, its name, what it refused."""

    secret: bytes
    target: str
    denied: Counter = field(default_factory=Counter)
    seen: OrderedDict = field(default_factory=OrderedDict)  # nonce -> time, oldest first

    def check(self, mechanism: bytes, user: bytes, password: bytes) -> tuple[str, str]:
        """``("", user_id)`` for a good token, else ``(why, "")``."""
        if mechanism != b"PLAIN":
            return "mechanism", ""
        try:  # ASCII only: nothing else can make a valid token
            name, (ts, nonce, given) = user.decode("ascii"), password.decode("ascii").split(".")
            when = int(ts)
        except (UnicodeDecodeError, ValueError):
            return "malformed", ""
        expected = _mac(self.secret, "client", name, self.target, ts, nonce)
        if not (0 < len(name) <= 64 and hmac.compare_digest(given.encode(), expected.encode())):
            return "bad-token", ""
        now = time.time()
        if abs(now - when) > TOKEN_WINDOW_S:
            return "expired", ""
        while self.seen and now - next(iter(self.seen.values())) > 2 * TOKEN_WINDOW_S:
            self.seen.popitem(last=False)  # older than any token still valid
        if nonce in self.seen:
            return "replayed", ""
        self.seen[nonce] = now  # only good tokens get here: one entry per real connection
        return "", f"{name}|{nonce}"


class Gatekeeper(threading.Thread):
    """The process's ZAP handler: answers libzmq's authentication requests for every
    listener registered with it (:meth:`register`). One per ZeroMQ context."""

    _instance: Gatekeeper | None = None
    _lock = threading.Lock()

    def __init__(self, ctx: zmq.Context) -> None:
        super().__init__(name="shoal-zap", daemon=True)
        self.doors: dict[str, Door] = {}
        self.sock = ctx.socket(zmq.REP)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(ZAP_ENDPOINT)
        self.start()

    @classmethod
    def get(cls) -> Gatekeeper:
        with cls._lock:
            ctx = zmq.Context.instance()
            me = cls._instance
            if me is None or not me.is_alive() or me.sock.context is not ctx:
                cls._instance = me = cls(ctx)
            return me

    def register(self, secret: bytes, target: str) -> tuple[str, Door]:
        """A ZAP domain for a new listener named ``target`` (several may share a name)."""
        domain = f"{target}#{secrets.token_hex(4)}"
        door = Door(secret, target)
        with self._lock:
            self.doors[domain] = door
        return domain, door

    def unregister(self, domain: str) -> None:
        with self._lock:
            self.doors.pop(domain, None)

    def run(self) -> None:
        try:
            while True:
                request = self.sock.recv_multipart()
                try:
                    reply = self._answer(request)
                except Exception:  # whatever a request does, the door stays manned
                    reply = [b"1.0", request[1] if len(request) > 1 else b"", b"500", b"", b"", b""]
                self.sock.send_multipart(reply)
        except zmq.ZMQError:  # the context is ending
            pass
        finally:
            self.sock.close(0)

    def _answer(self, request: list[bytes]) -> list[bytes]:
        if len(request) < 6:  # not from libzmq: it never sends less
            return [b"1.0", b"", b"500", b"bad request", b"", b""]
        version, rid, domain, _address, _identity, mechanism, *creds = request
        with self._lock:
            door = self.doors.get(domain.decode(errors="replace"))
        why, user_id = "unknown-listener", ""
        if door is not None:
            user, password = [*creds, b"", b""][:2]
            why, user_id = door.check(mechanism, user, password)
            if why:
                door.denied[why] += 1
        if why:
            return [version, rid, b"400", why.encode(), b"", b""]
        return [version, rid, b"200", b"OK", user_id.encode(), b""]


def monitor_address() -> str:
    """An inproc address for one socket monitor, never used twice in the process.
    (pyzmq's default names it after the socket's descriptor: a socket that was never
    closed, only collected, leaves its monitor bound there, and the next socket that gets
    the same descriptor would watch nothing: its handshakes would seem to hang.)"""
    return f"inproc://shoal-monitor-{secrets.token_hex(8)}"


class Listener:
    """A ROUTER socket that only authenticated peers reach, with its connection cap."""

    def __init__(
        self, ctx: zmq.Context, bind: str, secret: bytes, target: str, max_connections: int
    ) -> None:
        self.target, self.secret, self.max_connections = target, secret, max_connections
        self.frame_bytes = frame_bytes(max_connections)
        """The largest frame this listener takes (said to each client in its welcome)."""
        self.gate = Gatekeeper.get()
        self.domain, self.door = self.gate.register(secret, target)
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self.frame_bytes)
        sock.setsockopt(zmq.HANDSHAKE_IVL, int(HANDSHAKE_S * 1000))
        sock.plain_server = True
        sock.zap_domain = self.domain.encode()
        self.monitor = sock.get_monitor_socket(  # before binding: every connection is seen
            zmq.EVENT_ACCEPTED
            | zmq.EVENT_DISCONNECTED
            | zmq.EVENT_CLOSED
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
            addr=monitor_address(),
        )
        host, _, port = bind.rpartition(":")
        self.address = f"{host}:{sock.bind_to_random_port(host)}" if port == "0" else bind
        if port != "0":
            sock.bind(bind)
        self.sock = sock
        self.open: list[tuple[int, int]] = []  # open connections (fd, inode), oldest first
        self.cut = 0

    def watch_connections(self) -> None:
        """Take the monitor's news; cut the newest connections beyond the cap."""
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)
            kind, fd = event["event"], int(event["value"])
            if kind == zmq.EVENT_ACCEPTED:
                self.open.append((fd, _inode(fd)))
            elif kind in (zmq.EVENT_DISCONNECTED, zmq.EVENT_CLOSED):
                self.open = [(f, i) for f, i in self.open if f != fd]
            else:  # not even the handshake (ZAP counts the refused credentials)
                self.door.denied["handshake"] += 1
        while len(self.open) > self.max_connections:
            fd, inode = self.open.pop()
            if _inode(fd) != inode:  # closed meanwhile, and the number reused: not ours
                continue
            with contextlib.suppress(OSError):  # libzmq sees the end and closes it itself
                s = socket.socket(fileno=os.dup(fd))
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            self.cut += 1

    def user(self, frame: zmq.Frame) -> str:
        """The authenticated ``user|nonce`` a received frame came from."""
        return str(frame.get("User-Id"))

    def welcome(self, user_id: str, header: dict) -> dict:
        """The answer to a client's ``hello``: proof that this listener knows the secret,
        and the largest frame it takes."""
        nonce = str(header.get("nonce", ""))[:64]
        proof = server_proof(self.secret, self.target, user_id, nonce)
        return {"op": "welcome", "proof": proof, "frame": self.frame_bytes}

    def refused(self) -> dict[str, int]:
        """Connections refused at the door, by reason (and those cut for the cap)."""
        out = dict(self.door.denied)
        if self.cut:
            out["too-many-connections"] = self.cut
        return out

    def close(self, linger_ms: int = 0) -> None:
        self.sock.disable_monitor()
        self.monitor.close(0)
        self.sock.close(linger=linger_ms)
        self.gate.unregister(self.domain)


LINK_TIMEOUT_S = 10.0
"""A connection whose far end answers no ZMTP ping for this long is closed by libzmq
(its machine is gone or cut off); a busy peer's I/O thread still answers."""


def _inode(fd: int) -> int:
    """What an open file descriptor refers to (-1 once it is closed)."""
    try:
        return os.fstat(fd).st_ino
    except OSError:
        return -1


def connect(
    ctx: zmq.Context, address: str, secret: bytes, user: str, target: str, link_timeout_s: float
) -> tuple[zmq.Socket, zmq.Socket, str]:
    """A DEALER to listener ``target`` with a fresh token, its monitor, and the token's
    nonce. It does not reconnect in its lifetime: a connection that ends is over (a new
    one needs a new token, and a new proof from whoever listens there now). (Not
    ``RECONNECT_IVL=-1``: libzmq then drops replies that arrived just before the end.)"""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    # (one connection: what a listener that is not who it says can make it hold is a frame)
    sock.setsockopt(zmq.MAXMSGSIZE, LARGE_FRAME_BYTES)
    sock.setsockopt(zmq.RECONNECT_IVL, 24 * 3600 * 1000)
    sock.setsockopt(zmq.SNDTIMEO, int(link_timeout_s * 1000))  # no peer: no endless send
    sock.setsockopt(zmq.HEARTBEAT_IVL, int(min(1.0, link_timeout_s / 3) * 1000))
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(link_timeout_s * 1000))
    token = client_token(secret, user, target)
    sock.plain_username = user.encode()
    sock.plain_password = token.encode()
    monitor = sock.get_monitor_socket(  # before connecting: no event is missed
        zmq.EVENT_HANDSHAKE_SUCCEEDED
        | zmq.EVENT_HANDSHAKE_FAILED_AUTH
        | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
        | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
        | zmq.EVENT_DISCONNECTED
        | zmq.EVENT_CLOSED
        | zmq.EVENT_CONNECT_RETRIED,
        addr=monitor_address(),
    )
    sock.connect(address)
    return sock, monitor, token.split(".")[1]
