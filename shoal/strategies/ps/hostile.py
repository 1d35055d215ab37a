"""Hostile peers, for tests and ``shoal bench chaos``: what an attacker without the
job's secret can send to a shard or the coordinator.

Each function speaks raw TCP (ZMTP 3 framing by hand, as an attacker would, not
through libzmq), is bounded in time and closes what it opened. None of them
should get past the door (:mod:`~shoal.net.gate`).
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import time

GREETING_PLAIN = (
    b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"PLAIN".ljust(20, b"\x00") + b"\x00" * 32
)
"""A ZMTP 3.0 greeting that asks for the PLAIN mechanism, as shoal's clients do."""


def _address(address: str) -> tuple[str, int]:
    host, _, port = address.removeprefix("tcp://").rpartition(":")
    return host, int(port)


def _frame(body: bytes, more: bool = False, command: bool = False) -> bytes:
    flags = (0x01 if more else 0) | (0x04 if command else 0)
    if len(body) > 255:
        return bytes([flags | 0x02]) + struct.pack(">Q", len(body)) + body
    return bytes([flags, len(body)]) + body


def _hello(user: bytes, password: bytes) -> bytes:
    body = b"\x05HELLO" + bytes([len(user)]) + user + bytes([len(password)]) + password
    return _frame(body, command=True)


def _connect(address: str, timeout: float = 5.0) -> socket.socket:
    s = socket.create_connection(_address(address), timeout=timeout)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return s


def big_first_frame(address: str, nbytes: int = 4 << 20) -> None:
    """A greeting, then a first frame of ``nbytes`` (a 4 MiB "hello")."""
    with contextlib.suppress(OSError), _connect(address) as s:
        s.sendall(GREETING_PLAIN)
        s.sendall(bytes([0x06]) + struct.pack(">Q", nbytes))  # a long command frame
        chunk = b"\x00" * (1 << 16)
        for _ in range(nbytes // len(chunk)):
            s.sendall(chunk)


def endless_multipart(address: str, seconds: float = 3.0) -> int:
    """Message parts with the MORE flag, never a last one, for ``seconds``; bytes sent."""
    sent, deadline = 0, time.monotonic() + seconds
    part = _frame(b"\x00" * 200, more=True)
    with contextlib.suppress(OSError), _connect(address) as s:
        s.sendall(GREETING_PLAIN)
        while time.monotonic() < deadline:
            s.sendall(part * 64)
            sent += 64 * len(part)
    return sent


def open_connections(address: str, count: int = 500, hold_s: float = 2.0) -> int:
    """``count`` connections opened and held for ``hold_s``; how many were accepted."""
    socks = []
    try:
        for _ in range(count):
            with contextlib.suppress(OSError):
                socks.append(_connect(address))
        time.sleep(hold_s)
        return len(socks)
    finally:
        for s in socks:
            s.close()


def garbage_hellos(address: str, count: int = 10_000) -> int:
    """``count`` handshakes with made-up credentials or plain garbage; how many were sent."""
    sent = 0
    for i in range(count):
        if i % 3 == 1:  # well formed, the wrong proof
            token = f"{int(time.time())}.{i:032x}.{'0' * 64}".encode()
            payload = GREETING_PLAIN + _hello(b"worker0", token)
        elif i % 3 == 2:  # not even text: bytes a careless parser chokes on
            payload = GREETING_PLAIN + _hello("wörker".encode(), os.urandom(40) + "é.1".encode())
        else:  # not even ZMTP
            payload = os.urandom(64)
        for attempt in range(5):  # the listener's closes can briefly hold ports on loopback
            try:
                with _connect(address, timeout=2.0) as s:
                    s.sendall(payload)
                sent += 1
                break
            except OSError:
                time.sleep(0.01 * (attempt + 1))
    return sent


def rss_bytes(pid: int) -> int:
    """Resident memory of process ``pid``."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"no VmRSS for pid {pid}")
