"""Two "machines" on this host: Linux network namespaces joined by a veth pair.

Needs root and iproute2; :func:`hosts` skips the test with the reason otherwise.
Everything made is removed on exit, also when the test fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest


@dataclass(frozen=True)
class Host:
    ns: str
    ifname: str
    addr: str

    def prefix(self) -> list[str]:
        """Command prefix that runs a program inside this host."""
        return ["ip", "netns", "exec", self.ns]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


@contextlib.contextmanager
def hosts(subnet: str = "10.231.7") -> Iterator[tuple[Host, Host]]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2")
    tag = f"{os.getpid() % 100000}"
    a = Host(f"shoal-a{tag}", f"sha{tag}", f"{subnet}.1")
    b = Host(f"shoal-b{tag}", f"shb{tag}", f"{subnet}.2")
    made: list[str] = []
    try:
        for h in (a, b):
            _ip("netns", "add", h.ns)
            made.append(h.ns)
        _ip("link", "add", a.ifname, "type", "veth", "peer", "name", b.ifname)
        for h in (a, b):
            _ip("link", "set", h.ifname, "netns", h.ns)
            _ip("-n", h.ns, "addr", "add", f"{h.addr}/24", "dev", h.ifname)
            _ip("-n", h.ns, "link", "set", h.ifname, "up")
            _ip("-n", h.ns, "link", "set", "lo", "up")
    except subprocess.CalledProcessError as e:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        pytest.skip(f"cannot build network namespaces: {e.stderr.strip()}")
    try:
        yield a, b
    finally:
        for ns in made:  # deleting a namespace also deletes its end of the veth pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
