"""Several "machines" on this one: Linux network namespaces on a bridge, links capped.

Each host is a network namespace with one veth interface; the other ends of the
veths hang on a bridge in a namespace of its own, so 2 to N hosts see each
other as on one switch. ``rate`` caps every host's outgoing link with a token
bucket (``tc qdisc ... tbf``), so a transfer between two hosts runs at that
rate. Needs root and iproute2 (``ip``, ``tc``). Everything made is removed on
exit, also on an error or an interrupt; namespaces left by a run that was
killed outright are removed by the next one.

Distance (``delay``): this kernel has no netem, so a delayed network is a link of
our own in user space. Each host then has a TUN device instead of a veth, and
a relay (:class:`Relay`, a thread of this process) reads every packet a host
sends, holds it for the delay and writes it into the TUN device of the host it
is addressed to: every packet is ``delay`` late one way, as ``tc netem delay``
on each host's link would make it. The rate cap stays ``tbf``, on each TUN
device. The TUN devices take 64 KB packets, so the relay moves few of them; its
ceiling is measured by ``shoal bench comm --relay-check``.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import heapq
import os
import re
import selectors
import shutil
import signal
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

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


def parse_delay(delay: str) -> float:
    """``50ms``, ``0.2s``, ``0`` -> seconds."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s)?", delay)
    if not m or (m.group(2) is None and float(m.group(1)) != 0):
        raise ValueError(f"link delay {delay!r} must look like 50ms, 0.2s or 0")
    return float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)


TUN_MTU = 65000
_TUNSETIFF = 0x400454CA
_IFF_TUN, _IFF_NO_PI = 0x0001, 0x1000
_CLONE_NEWNET = 0x40000000


def _open_tun(ns: str, ifname: str) -> int:
    """A file descriptor of the TUN device ``ifname`` made in namespace ``ns`` (this
    thread enters the namespace to open it, then comes back)."""
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    there = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(there, _CLONE_NEWNET) != 0:
            raise NetnsError(f"setns {ns}: {os.strerror(ctypes.get_errno())}")
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
            request = struct.pack("16sH", ifname.encode(), _IFF_TUN | _IFF_NO_PI)
            fcntl.ioctl(fd, _TUNSETIFF, request)
            return fd
        finally:
            libc.setns(home, _CLONE_NEWNET)
    finally:
        os.close(home)
        os.close(there)


@dataclass(eq=False)
class Relay(threading.Thread):
    """Moves IPv4 packets between the hosts' TUN devices, each ``delay`` seconds after
    it was read: a constant delay keeps every flow's order."""

    routes: dict[bytes, int]  # destination address -> that host's TUN descriptor
    delay: float
    packets: int = 0
    bytes: int = 0
    late_max: float = 0.0  # the longest a packet waited past its due time
    busy: float = 0.0  # seconds this thread spent moving packets
    stopped: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        super().__init__(name="shoal-relay", daemon=True)

    def run(self) -> None:
        sel = selectors.DefaultSelector()
        for fd in self.routes.values():
            sel.register(fd, selectors.EVENT_READ)
        held: list[tuple[float, int, int, bytes]] = []
        seq = 0
        while not self.stopped.is_set():
            wait = 0.05 if not held else max(0.0, held[0][0] - time.monotonic())
            ready = sel.select(min(wait, 0.05))
            t0 = time.monotonic()
            for key, _ in ready:
                while True:
                    try:
                        packet = os.read(key.fd, TUN_MTU + 100)
                    except BlockingIOError:
                        break
                    ipv4 = len(packet) >= 20 and packet[0] >> 4 == 4
                    out = self.routes.get(packet[16:20]) if ipv4 else None
                    if out is not None:
                        heapq.heappush(held, (t0 + self.delay, seq, out, packet))
                        seq += 1
            now = time.monotonic()
            while held and held[0][0] <= now:
                due, _, out, packet = heapq.heappop(held)
                self.late_max = max(self.late_max, now - due)
                try:
                    os.write(out, packet)
                except OSError:
                    continue  # (the receiving queue is full: a drop, as on a wire)
                self.packets += 1
                self.bytes += len(packet)
            self.busy += time.monotonic() - t0

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=5)


@contextlib.contextmanager
def _namespaces() -> Iterator[tuple[str, list[str]]]:
    """What every way of making hosts shares: the checks, stale namespaces removed, a
    SIGTERM that unwinds, and every namespace put in the list removed at the end.
    Yields this process's tag (the prefix of its namespaces' names) and that list."""
    reason = unavailable()
    if reason:
        raise NetnsError(reason)
    remove_stale()
    made: list[str] = []
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # unwinds through the finally below

    signal.signal(signal.SIGTERM, on_term)
    try:
        yield f"{PREFIX}{os.getpid()}", made
    finally:
        for ns in reversed(made):  # a namespace takes its ends of the veths with it
            _delete(ns)
        signal.signal(signal.SIGTERM, previous)


def _add_namespace(ns: str, made: list[str]) -> None:
    _run("ip", "netns", "add", ns)
    made.append(ns)


def _cap(host: Host, rate: str, latency: str) -> None:
    """``tbf`` at ``rate`` on ``host``'s link (``none``: nothing)."""
    bits = parse_rate(rate)
    if bits is not None:
        _run(
            "tc", "-n", host.ns, "qdisc", "add", "dev", host.ifname, "root", "tbf",
            "rate", rate, "burst", str(tbf_burst(bits)), "latency", latency,
        )  # fmt: skip


@contextlib.contextmanager
def hosts(
    count: int, rate: str = "none", subnet: str = "10.231.9", delay: float = 0.0
) -> Iterator[list[Host]]:
    """``count`` hosts on one bridge, each link capped at ``rate`` (``none``: uncapped);
    with ``delay`` (seconds), on TUN devices joined by a :class:`Relay` instead."""
    parse_rate(rate)  # (a bad rate before anything is made)
    if delay > 0:
        with _tun_hosts(count, rate, subnet, delay) as made:
            yield made
        return
    with _namespaces() as (tag, made):
        bridge_ns = f"{tag}-br"
        _add_namespace(bridge_ns, made)
        _run("ip", "-n", bridge_ns, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", bridge_ns, "link", "set", "br0", "up")
        out = []
        for i in range(count):
            host = Host(f"{tag}-h{i}", f"eth{i}", f"{subnet}.{i + 1}")
            _add_namespace(host.ns, made)
            peer = f"p{i}"
            _run("ip", "-n", host.ns, "link", "add", host.ifname, "type", "veth",
                 "peer", "name", peer)  # fmt: skip
            _run("ip", "-n", host.ns, "link", "set", peer, "netns", bridge_ns)
            _run("ip", "-n", bridge_ns, "link", "set", peer, "master", "br0", "up")
            _run("ip", "-n", host.ns, "addr", "add", f"{host.addr}/24", "dev", host.ifname)
            _run("ip", "-n", host.ns, "link", "set", host.ifname, "up")
            _run("ip", "-n", host.ns, "link", "set", "lo", "up")
            _cap(host, rate, "100ms")
            out.append(host)
        yield out


@contextlib.contextmanager
def _tun_hosts(count: int, rate: str, subnet: str, delay: float) -> Iterator[list[Host]]:
    fds: list[int] = []
    relay: Relay | None = None
    with _namespaces() as (tag, made):
        try:
            routes = {}
            out = []
            for i in range(count):
                host = Host(f"{tag}-h{i}", "tun0", f"{subnet}.{i + 1}")
                _add_namespace(host.ns, made)
                _run("ip", "-n", host.ns, "tuntap", "add", "dev", host.ifname, "mode", "tun")
                _run("ip", "-n", host.ns, "link", "set", host.ifname, "mtu", str(TUN_MTU))
                _run("ip", "-n", host.ns, "addr", "add", f"{host.addr}/24", "dev", host.ifname)
                _run("ip", "-n", host.ns, "link", "set", host.ifname, "up")
                _run("ip", "-n", host.ns, "link", "set", "lo", "up")
                for key in ("net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem"):
                    # windows for a long fat link (1 Gbit/s x 100 ms round trip = 12.5 MB)
                    _run(*host.prefix(), "sysctl", "-qw", f"{key}=4096 131072 67108864")
                _cap(host, rate, "1s")
                fds.append(_open_tun(host.ns, host.ifname))
                routes[bytes(int(x) for x in host.addr.split("."))] = fds[-1]
                out.append(host)
            relay = Relay(routes, delay)
            relay.start()
            yield out
        finally:
            if relay is not None:
                relay.stop()
            for fd in fds:
                os.close(fd)
