"""Client side of the parameter-server wire: one authenticated DEALER per peer.

A connection authenticates itself with a one-time token and then makes the
listener prove that it knows the secret too (see
:mod:`~shoal.strategies.ps.gate`) before anything else is asked of it.

Requests carry an ``id``; replies are matched by it, so a pull that the server
parks (BSP/SSP) does not block other requests to the same shard. Requests to
all shards are sent first and awaited after, so shards work in parallel.
"""

from __future__ import annotations

import hmac
import itertools
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from shoal.errors import PeerLost, PeerRejected
from shoal.metrics import CommCounter
from shoal.strategies.ps import gate, wire

Reply = tuple[dict[str, Any], list[torch.Tensor]]


WATCH_MS = 1000


class PeerError(PeerLost):
    """A peer refused a request or did not answer in time."""


class PeerTimeout(PeerError):
    """A peer did not answer in time."""


class Peer:
    """One authenticated connection to a server shard or the coordinator."""

    def __init__(
        self,
        ctx: zmq.Context,
        address: str,
        secret: bytes,
        who: str,
        comm: CommCounter,
        timeout_s: float = 300.0,
        max_bytes: int = 1 << 30,
        target: str = "coordinator",
    ) -> None:
        self.address = address
        self.comm = comm
        self.timeout_ms = int(timeout_s * 1000)
        self.max_bytes = max_bytes
        self.sock, token_nonce = gate.connect(ctx, address, secret, who, target)
        self.ids = itertools.count()
        self.stash: dict[int, Reply] = {}
        self.watch: Callable[[], None] | None = None
        """Called about every second while a reply is awaited; may raise to stop waiting."""
        self._prove(secret, f"{who}|{token_nonce}", target)

    def _prove(self, secret: bytes, user_id: str, target: str) -> None:
        """Ask the listener to prove it knows the secret; refuse it if it cannot. A
        listener that refuses this process's token is named as such, not waited for."""
        nonce = secrets.token_hex(16)
        monitor = self.sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
        )
        watch, self.watch = self.watch, lambda: self._handshake_failed(monitor, target)
        try:
            welcome, _ = self.call({"op": "hello", "nonce": nonce})
        finally:
            self.watch = watch
            if not self.sock.closed:
                self.sock.disable_monitor()
            monitor.close(0)
        proof = gate.server_proof(secret, target, user_id, nonce)
        if not hmac.compare_digest(str(welcome.get("proof", "")), proof):
            self.close()
            raise PeerRejected(
                f"{self.address} answered as {target} but does not know the job's secret: "
                "refusing it (another process on that port?)"
            )

    def _handshake_failed(self, monitor: zmq.Socket, target: str) -> None:
        while monitor.poll(0):
            event = recv_monitor_message(monitor)["event"]
            self.close()
            if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                raise PeerRejected(
                    f"{target} at {self.address} refused this process's credentials: "
                    f"{wire.SECRET_ENV} must be the same on every machine and their clocks "
                    f"within {gate.TOKEN_WINDOW_S / 60:.0f} minutes"
                )
            raise PeerRejected(
                f"{self.address} does not speak shoal's authenticated wire: refusing it "
                f"(expected {target})"
            )

    def send(self, header: dict[str, Any], tensors: list[torch.Tensor] = ()) -> int:
        rid = next(self.ids)
        frames = wire.encode({**header, "id": rid}, list(tensors))
        self.comm.add(sent=wire.message_bytes(frames))
        self.sock.send_multipart(frames, copy=False)
        return rid

    def recv(self, rid: int, timeout_s: float | None = None) -> Reply:
        """The reply to request ``rid`` (other replies are kept for their callers)."""
        timeout_ms = self.timeout_ms if timeout_s is None else int(timeout_s * 1000)
        deadline = time.monotonic() + timeout_ms / 1000
        while rid not in self.stash:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if not self.sock.poll(max(0, min(left_ms, WATCH_MS if self.watch else left_ms))):
                if left_ms <= 0:
                    raise PeerTimeout(f"no answer from {self.address} in {timeout_ms / 1000:.0f} s")
                if self.watch is not None:
                    self.watch()
                continue
            frames = self.sock.recv_multipart(copy=False)
            self.comm.add(received=wire.message_bytes(frames))
            header, tensors = wire.decode(frames, self.max_bytes)
            self.stash[header.get("id")] = (header, tensors)
        header, tensors = self.stash.pop(rid)
        if header["op"] == "error":
            raise PeerError(f"{self.address} refused: {header.get('error')}")
        return header, tensors

    def call(
        self,
        header: dict[str, Any],
        tensors: list[torch.Tensor] = (),
        timeout_s: float | None = None,
    ) -> Reply:
        return self.recv(self.send(header, tensors), timeout_s)

    def close(self) -> None:
        self.sock.close(0)


class Client:
    """Connections to every server shard."""

    def __init__(
        self, addresses: list[str], secret: bytes, who: str, comm: CommCounter, **kw: Any
    ) -> None:
        self.ctx = zmq.Context.instance()
        self.comm = comm
        self.shards = [
            Peer(self.ctx, a, secret, who, comm, target=f"shard-{k}", **kw)
            for k, a in enumerate(addresses)
        ]

    def call_all(self, requests: list[tuple[dict[str, Any], list[torch.Tensor]]]) -> list[Reply]:
        """Send one request to each shard, then collect every reply."""
        rids = [peer.send(h, t) for peer, (h, t) in zip(self.shards, requests)]
        return [peer.recv(rid) for peer, rid in zip(self.shards, rids)]

    def watch(self, check: Callable[[], None]) -> None:
        """Call ``check`` about every second while waiting on any shard."""
        for peer in self.shards:
            peer.watch = check

    def close(self) -> None:
        for peer in self.shards:
            peer.close()


class Heartbeat(threading.Thread):
    """Sends ``beat`` to the coordinator every ``interval`` seconds: this process lives.

    Its own socket, its own thread: a worker busy in a long step, or a shard applying a
    large update, still beats; a stopped, dead or cut-off process does not.
    """

    def __init__(
        self, address: str, secret: bytes, who: str, beat: dict[str, Any], interval: float
    ) -> None:
        super().__init__(name="shoal-heartbeat", daemon=True)
        self.address, self.secret, self.who, self.beat = address, secret, who, beat
        self.interval = interval
        self.stopped = threading.Event()
        self.start()

    def run(self) -> None:
        try:
            peer = Peer(zmq.Context.instance(), self.address, self.secret, self.who, CommCounter())
        except Exception:  # the coordinator is gone: the job is ending
            return
        try:
            while True:
                peer.call(self.beat)
                if self.stopped.wait(self.interval):
                    break
        except Exception:  # the coordinator is gone: the job is ending
            pass
        finally:
            peer.close()

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=5)
