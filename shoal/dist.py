"""The process's place in the job: process group, device, threads.

Workers are started by torchrun's machinery, which sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT``; :func:`init` reads them. Run without them (plain ``python``),
it falls back to a single process.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

LAUNCHER_ENV = "SHOAL_LAUNCHER_PID"
"""The pid of the ``shoal train`` that started a worker: it dies with it."""
INPLACE_STORE_ENV = "SHOAL_INPLACE_STORE"
"""``host:port`` of an in-place job's store (see :mod:`shoal.inplace`), in each of its
workers' environment: a worker of a job that recovers a lost peer in place."""


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: ranks, device and collective backend."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str
    host: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class CollectiveGatherer:
    """Gathers one row per rank to rank 0 with a collective (the writer is rank 0)."""

    def __init__(self, env: DistEnv) -> None:
        self.env = env
        self.is_writer = env.is_main

    def gather(
        self, row: torch.Tensor, tag: str = "", meta: dict | None = None
    ) -> torch.Tensor | None:
        """Stack every rank's ``row`` on rank 0; ``None`` elsewhere. Collective."""
        row = row.to(self.env.device)
        parts = [torch.empty_like(row) for _ in range(self.env.world_size)]
        dist.all_gather(parts, row)
        return torch.stack(parts).cpu() if self.is_writer else None

    def start(self, row: torch.Tensor) -> Callable[[], torch.Tensor | None]:
        """:meth:`gather` begun in the background: returns what finishes it (waits for
        the collective, if it is still out, and gives its result)."""
        row = row.to(self.env.device)
        parts = [torch.empty_like(row) for _ in range(self.env.world_size)]
        work = dist.all_gather(parts, row, async_op=True)

        def finish() -> torch.Tensor | None:
            work.wait()  # type: ignore[union-attr]
            return torch.stack(parts).cpu() if self.is_writer else None

        return finish

    def gather_object(self, obj: dict, tag: str = "") -> list[dict] | None:
        """Every rank's ``obj`` on rank 0 (pickled by torch: ranks trust each other);
        ``None`` elsewhere. Collective."""
        if not dist.is_initialized() or self.env.world_size == 1:
            return [obj]
        parts: list[Any] = [None] * self.env.world_size if self.is_writer else []
        dist.gather_object(obj, parts if self.is_writer else None, dst=0)
        return parts if self.is_writer else None


def resolve_device(kind: str) -> str:
    """``auto`` and ``mixed`` become ``cuda`` when a GPU is visible, else ``cpu``."""
    if kind in ("auto", "mixed"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return kind


def threads_per_process(local_world_size: int) -> int:
    """Cores available to this process when the node's cores are shared fairly."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, local_world_size))


def init(device: str = "cpu", timeout_s: float = 300.0, process_group: bool = True) -> DistEnv:
    """Join the process group that torchrun's environment describes.

    Sets the torch thread count so that oversubscribed CPU workers do not crawl,
    picks ``cuda:LOCAL_RANK`` with NCCL for ``device="cuda"`` and gloo otherwise
    (``mixed``: ``cuda:LOCAL_RANK`` where there is a GPU, over gloo, which also
    carries CUDA tensors, so that ranks with and without GPUs share one group).
    Safe to call twice. ``process_group=False`` only reads the environment
    (strategies that talk over their own sockets).
    """
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(threads_per_process(local_world_size))
    kind = resolve_device(device)
    if kind == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
        backend = "gloo" if device == "mixed" else "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if process_group and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
            device_id=dev if backend == "nccl" else None,
            store=_group_store(rank, world_size, timeout_s),
        )
    return DistEnv(
        rank, world_size, local_rank, local_world_size, dev, backend, socket.gethostname()
    )


def _group_store(rank: int, world_size: int, timeout_s: float) -> dist.Store | None:
    """The group's store, listening on 127.0.0.1 only when the job is on one machine
    (``MASTER_ADDR`` is loopback); ``None`` lets torch make it (every interface).

    Under plain torchrun the agent hosts the store, and keeps it across restarts:
    each attempt's keys get their own prefix, or the workers of a restart would
    read the dead ones' gloo addresses and fail to connect."""
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        timeout = timedelta(seconds=timeout_s)
        agent = dist.TCPStore(addr, port, world_size, is_master=False, timeout=timeout)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        return dist.PrefixStore(f"shoal/attempt-{attempt}", agent)
    if addr != "localhost" and not addr.startswith("127."):
        return None
    fd = loopback_listener(port).detach() if rank == 0 else None  # the store owns it
    return dist.TCPStore(
        "127.0.0.1",
        port,
        world_size,
        is_master=rank == 0,
        timeout=timedelta(seconds=timeout_s),
        multi_tenant=True,
        master_listen_fd=fd,
    )


def loopback_listener(port: int = 0) -> socket.socket:
    """A TCP socket listening on 127.0.0.1 (``port``, or a free one)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(256)
    return sock


ATTEMPT_ENV = "SHOAL_ATTEMPT"
"""Set by an engine that restarts the workers itself (Ray): which attempt this is."""


def attempt() -> int:
    """How many times the job's workers were restarted after a failure before this
    attempt: Ray's count (:data:`ATTEMPT_ENV`) or torchrun's agent's."""
    return int(os.environ.get(ATTEMPT_ENV) or os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)


def peer_failure(e: BaseException) -> bool:
    """A collective failed because another process died, vanished or stayed away (not a
    bug here): its connection broke or it timed out."""
    text = str(e)
    return isinstance(e, dist.DistNetworkError) or any(
        s in text
        for s in (
            "Connection reset by peer",
            "Connection closed by peer",
            "Broken pipe",
            "Read error",
            "Timed out waiting",
            "caused pair closure",  # (gloo: a peer's group ended, or its op timed out)
        )
    )


def shutdown() -> None:
    """Leave the process group if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
