"""Several "machines" on this one: Linux network namespaces on a bridge, links capped.

Each host is a network namespace with one veth interface; the other ends of the
veths hang on a bridge in a namespace of its own, so 2 to N hosts see each
other as on one switch. ``rate`` caps every host's outgoing link with a token
bucket (``tc qdisc ... tbf``), so a transfer between two hosts runs at that
rate. Needs root and iproute2 (``ip``, ``tc``). Everything made is removed on
exit, also on an error or an interrupt; namespaces left by a run that was
killed outright are removed by the next one.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

from shoal import procs

PREFIX = "shoal-net"


class NetnsError(RuntimeError):
    """Namespaces could not be made (with the command's own reason)."""


@dataclass(frozen=True)
class Host:
    """One namespace "machine": its name, interface and address."""

    ns: str
    ifname: str
    addr: str

    def prefix(self) -> list[str]:
        """Command prefix that runs a program inside this host."""
        return ["ip", "netns", "exec", self.ns]


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or ``None`` if they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"network namespaces need iproute2 ({tool} not found)"
    return None


def _run(*cmd: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    if proc.returncode != 0:
        raise NetnsError(f"{' '.join(cmd)}: {proc.stderr.strip() or proc.returncode}")


def _delete(ns: str) -> None:
    subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


def remove_stale() -> None:
    """Remove namespaces of earlier runs whose process is gone (killed with SIGKILL)."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=20)
    for line in listing.stdout.splitlines():
        m = re.match(rf"({PREFIX}(\d+)-\S+)", line)
        if m and not procs.alive(int(m.group(2))):
            _delete(m.group(1))


def tbf_burst(rate_bits: float) -> int:
    """Token-bucket depth in bytes: 10 ms at the rate, at least 64 KiB (whole GSO packets)."""
    return max(64 * 1024, int(rate_bits / 8 / 100))


def parse_rate(rate: str) -> float | None:
    """``100mbit``, ``1gbit``, ``2.5gbit`` -> bits/s; ``none`` -> ``None`` (uncapped)."""
    if rate == "none":
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(k|m|g)bit", rate)
    if not m:
        raise ValueError(f"link rate {rate!r} must look like 100mbit, 1gbit or none")
    return float(m.group(1)) * {"k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]


@contextlib.contextmanager
def hosts(count: int, rate: str = "none", subnet: str = "10.231.9") -> Iterator[list[Host]]:
    """``count`` hosts on one bridge, each link capped at ``rate`` (``none``: uncapped)."""
    reason = unavailable()
    if reason:
        raise NetnsError(reason)
    bits = parse_rate(rate)
    remove_stale()
    tag = f"{PREFIX}{os.getpid()}"
    bridge_ns = f"{tag}-br"
    made: list[str] = []
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # unwinds through the finally below

    signal.signal(signal.SIGTERM, on_term)
    try:
        _run("ip", "netns", "add", bridge_ns)
        made.append(bridge_ns)
        _run("ip", "-n", bridge_ns, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", bridge_ns, "link", "set", "br0", "up")
        out = []
        for i in range(count):
            host = Host(f"{tag}-h{i}", f"eth{i}", f"{subnet}.{i + 1}")
            _run("ip", "netns", "add", host.ns)
            made.append(host.ns)
            peer = f"p{i}"
            _run(
                "ip",
                "-n",
                host.ns,
                "link",
                "add",
                host.ifname,
                "type",
                "veth",
                "peer",
                "name",
                peer,
            )
            _run("ip", "-n", host.ns, "link", "set", peer, "netns", bridge_ns)
            _run("ip", "-n", bridge_ns, "link", "set", peer, "master", "br0", "up")
            _run("ip", "-n", host.ns, "addr", "add", f"{host.addr}/24", "dev", host.ifname)
            _run("ip", "-n", host.ns, "link", "set", host.ifname, "up")
            _run("ip", "-n", host.ns, "link", "set", "lo", "up")
            if bits is not None:
                _run(
                    "tc", "-n", host.ns, "qdisc", "add", "dev", host.ifname, "root", "tbf",
                    "rate", rate, "burst", str(tbf_burst(bits)), "latency", "100ms",
                )  # fmt: skip
            out.append(host)
        yield out
    finally:
        for ns in reversed(made):  # a namespace takes its ends of the veths with it
            _delete(ns)
        signal.signal(signal.SIGTERM, previous)
