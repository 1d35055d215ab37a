"""The client side of shoal's wire: one authenticated DEALER per peer.

A connection authenticates itself with a one-time token and then makes the
listener prove that it knows the secret too (see
:mod:`~shoal.net.gate`) before anything else is asked of it.

Requests carry an ``id``; replies are matched by it, so a pull that the server
parks (BSP/SSP) does not block other requests to the same shard. Requests to
all shards are sent first and awaited after, so shards work in parallel.
"""

from __future__ import annotations

import contextlib
import hmac
import itertools
import secrets
import time
from collections.abc import Callable
from typing import Any

import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from shoal.errors import PeerLost, PeerRejected
from shoal.metrics import CommCounter
from shoal.net import gate, wire

Reply = tuple[dict[str, Any], list[torch.Tensor]]


WATCH_MS = 1000


class PeerError(PeerLost):
    """A peer refused a request, did not answer in time, or the connection ended."""


class PeerTimeout(PeerError):
    """A peer did not answer in time."""


class PeerGone(PeerError):
    """The connection to a peer ended (the process or its machine is gone, or cut off)."""


class Peer:
    """One authenticated connection to a server shard or the coordinator.

    It connects once: it waits (up to ``timeout_s``) for the listener to be there,
    authenticates with a one-time token, and asks the listener to prove the secret
    back. It never reconnects by itself; once the connection ends, every call raises
    :class:`PeerGone` and a new :class:`Peer` is needed.
    """

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
        link_timeout_s: float = gate.LINK_TIMEOUT_S,
    ) -> None:
        self.address, self.target = address, target
        self.comm = comm
        self.timeout_ms = int(timeout_s * 1000)
        self.max_bytes = max_bytes
        self.ids = itertools.count()
        self.stash: dict[int, Reply] = {}
        self.buffers = wire.Buffers()  # what replies are received into, reply after reply
        self.frame_bytes = wire.FRAME_BYTES
        """The frames requests are cut in: the listener's own cap, once it proved itself."""
        self.watch: Callable[[], None] | None = None
        """Called about every second while a reply is awaited; may raise to stop waiting."""
        self.gone = ""
        deadline = time.monotonic() + timeout_s
        while True:  # until the listener is up (another machine may start later)
            self.sock, self.monitor, token_nonce = gate.connect(
                ctx, address, secret, who, target, link_timeout_s
            )
            if self._handshake(deadline):
                break
            self.close()
            if time.monotonic() > deadline:
                raise PeerTimeout(f"cannot reach {target} at {address} in {timeout_s:.0f} s")
            time.sleep(0.2)
        try:
            self._prove(secret, f"{who}|{token_nonce}")
        except BaseException:
            self.close()
            raise

    def _handshake(self, deadline: float) -> bool:
        """Whether the connection was made and our token accepted; a listener that
        refuses the token, or does not speak shoal's wire, is refused in turn."""
        while time.monotonic() < deadline:
            if not self.monitor.poll(200):
                continue
            event = recv_monitor_message(self.monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                return True
            if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self.close()
                raise PeerRejected(
                    f"{self.target} at {self.address} refused this process's credentials: "
                    f"{wire.SECRET_ENV} must be the same on every machine and their clocks "
                    f"within {gate.TOKEN_WINDOW_S / 60:.0f} minutes"
                )
            if event in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
                self.close()
                raise PeerRejected(
                    f"{self.address} does not speak shoal's authenticated wire: refusing it "
                    f"(expected {self.target})"
                )
            if event in (zmq.EVENT_CLOSED, zmq.EVENT_DISCONNECTED, zmq.EVENT_CONNECT_RETRIED):
                return False  # nobody listens there yet: try again
        return False

    def _prove(self, secret: bytes, user_id: str) -> None:
        """Ask the listener to prove it knows the secret; refuse it if it cannot."""
        nonce = secrets.token_hex(16)
        welcome, _ = self.call({"op": "hello", "nonce": nonce})
        proof = gate.server_proof(secret, self.target, user_id, nonce)
        if not hmac.compare_digest(str(welcome.get("proof", "")).encode(), proof.encode()):
            raise PeerRejected(
                f"{self.address} answered as {self.target} but does not know the job's "
                "secret: refusing it (another process on that port?)"
            )
        frame = welcome.get("frame")
        if isinstance(frame, int) and wire.FRAME_BYTES <= frame <= wire.LARGE_FRAME_BYTES:
            self.frame_bytes = frame

    def _check_link(self) -> None:
        """Raise :class:`PeerGone` once the connection has ended."""
        while not self.gone and self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)["event"]
            if event in (zmq.EVENT_DISCONNECTED, zmq.EVENT_CLOSED):
                self.gone = f"the connection to {self.target} at {self.address} was lost"
        if self.gone:
            raise PeerGone(self.gone)

    def send(self, header: dict[str, Any], tensors: list[torch.Tensor] = ()) -> int:
        self._check_link()
        rid = next(self.ids)
        frames = wire.encode({**header, "id": rid}, list(tensors), self.frame_bytes)
        self.comm.add(sent=wire.message_bytes(frames))
        try:
            self.sock.send_multipart(frames, copy=False)
        except zmq.Again:  # nothing to send to: the connection is gone
            self.gone = self.gone or f"cannot send to {self.target} at {self.address}"
            raise PeerGone(self.gone) from None
        return rid

    def recv(self, rid: int, timeout_s: float | None = None) -> Reply:
        """The reply to request ``rid`` (other replies are kept for their callers)."""
        timeout_ms = self.timeout_ms if timeout_s is None else int(timeout_s * 1000)
        deadline = time.monotonic() + timeout_ms / 1000
        while rid not in self.stash:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if not self.sock.poll(max(0, min(left_ms, WATCH_MS))):
                self._check_link()
                if left_ms <= 0:
                    raise PeerTimeout(f"no answer from {self.address} in {timeout_ms / 1000:.0f} s")
                if self.watch is not None:
                    self.watch()
                continue
            try:
                _, size, header, tensors = wire.receive(
                    self.sock, self.max_bytes, self.buffers, frame_cap=wire.LARGE_FRAME_BYTES
                )
            except wire.WireError as e:
                self.comm.add(received=e.received[1] if e.received else 0)
                raise
            self.comm.add(received=size)
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
        if not self.sock.closed:
            self.sock.disable_monitor()
            self.sock.close(0)
        self.monitor.close(0)

    def __del__(self) -> None:
        # A peer nobody closed (dropped on an error path, held by a traceback until the
        # cyclic collector came): close it in order, the monitor first. Left to pyzmq, the
        # two sockets are closed in any order, and the context's I/O thread stopped
        # completing other sockets' handshakes (seen in tests: PeerTimeout on a new peer).
        if hasattr(self, "monitor"):
            with contextlib.suppress(Exception):
                self.close()
