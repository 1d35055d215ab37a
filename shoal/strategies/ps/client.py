"""The parameter server's clients: connections to every shard, and the heartbeat a
worker or shard sends the coordinator (the connections themselves: :mod:`shoal.net.peer`)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
import zmq

from shoal.metrics import CommCounter
from shoal.net.peer import Peer, PeerTimeout, Reply


class Client:
    """Connections to every server shard."""

    def __init__(
        self,
        addresses: list[str],
        targets: list[str],
        secret: bytes,
        who: str,
        comm: CommCounter,
        **kw: Any,
    ) -> None:
        self.ctx = zmq.Context.instance()
        self.comm = comm
        self.shards: list[Peer] = []
        try:
            for address, target in zip(addresses, targets, strict=True):
                self.shards.append(Peer(self.ctx, address, secret, who, comm, target=target, **kw))
        except BaseException:
            self.close()
            raise

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
        peer.watch = self._check_stopped  # a busy coordinator must not hold up stop()
        try:
            while True:
                rid = peer.send(self.beat)
                while True:  # a slow answer is no reason to stop beating
                    try:
                        peer.recv(rid, timeout_s=max(1.0, 2 * self.interval))
                        break
                    except PeerTimeout:
                        continue
                if self.stopped.wait(self.interval):
                    break
        except Exception:  # stopped, or the coordinator is gone: the job is ending
            pass
        finally:
            peer.close()

    def _check_stopped(self) -> None:
        if self.stopped.is_set():
            raise _Stopped

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=5)


class _Stopped(Exception):
    """A heartbeat's wait for an answer ends: it was stopped."""
