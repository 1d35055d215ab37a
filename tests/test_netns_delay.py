"""Distant hosts: namespaces joined through TUN devices and a relay that holds every
packet for the delay (this kernel has no netem)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from shoal import netns
from tests.conftest import run_shoal

ECHO = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5001)); s.listen(1)
c, _ = s.accept()
while True:
    d = c.recv(1 << 16)
    if not d:
        break
    c.sendall(d)
"""

PING = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], 5001), timeout=10)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
rtts = []
for _ in range(5):
    t = time.perf_counter(); s.sendall(b"x" * 100); got = b""
    while len(got) < 100:
        got += s.recv(100)
    rtts.append(time.perf_counter() - t)
s.sendall(b"y" * 2_000_000)  # a bulk transfer through the cap, echoed back
got = 0
while got < 2_000_000:
    got += len(s.recv(1 << 16))
print(min(rtts))
"""


@pytest.mark.netns
@pytest.mark.timeout(60)
def test_every_packet_between_distant_hosts_is_late_by_the_delay():
    reason = netns.unavailable()
    if reason:
        pytest.skip(reason)
    with netns.hosts(2, "100mbit", delay=0.04) as (a, b):
        server = subprocess.Popen([*b.prefix(), sys.executable, "-c", ECHO, b.addr])
        try:
            time.sleep(0.5)
            ping = subprocess.run(
                [*a.prefix(), sys.executable, "-c", PING, b.addr],
                capture_output=True, text=True, timeout=40,
            )  # fmt: skip
        finally:
            server.kill()
            server.wait()
        assert ping.returncode == 0, ping.stderr
        rtt = float(ping.stdout)
        assert rtt >= 0.08, rtt  # there and back: twice the one-way delay, at least
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    assert f"{netns.PREFIX}{os.getpid()}-" not in listing.stdout  # every one it made is gone


@pytest.mark.timeout(60)
def test_a_delay_that_is_no_duration_is_refused_in_one_line(tmp_path):
    proc = run_shoal("bench", "comm", "--out", str(tmp_path / "b"), "--delay", "soon")
    assert proc.returncode == 2 and "must look like 50ms" in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    proc = run_shoal("bench", "comm", "--out", str(tmp_path / "b"), "--runs", "diloco:int8+x")
    assert proc.returncode == 2 and "'x' must look like fragments=4" in proc.stderr
