"""A job's processes on one machine, each started and watched on its own with torchrun's
process layer: the parameter server's roles, and the workers of an in-place job."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal import failure, procs
from shoal.dist import LAUNCHER_ENV
from shoal.launch import WORKER_MODULE, fork_workers, forked_worker, quiet_torchrun


def _preload_forkserver(modules: tuple[str, ...]) -> None:
    """Every role's process is a fork of one server process that imported the worker's
    modules once (Python's ``forkserver``, itself a new Python: the launcher's threads
    and sockets, the coordinator's among them, are not in it). A new Python per role
    spent 1.7 s of CPU importing them, each restart of a role again."""
    import multiprocessing.forkserver as forkserver

    forkserver.set_forkserver_preload([WORKER_MODULE, *modules])


def _fork_forkserver() -> None:
    """Start multiprocessing's fork server as a fork of this process, not a new Python.

    This process has imported what the server would preload and has one thread (the
    caller's promise, as for the workers it forked first), so a fork of it is the
    server, ready at once and costing nothing: a new Python spent 2-3 s of CPU
    importing torch and shoal, on every in-place job, while its first workers start on
    the same cores. Where the server's entry differs (Python 3.14 authenticates its
    clients), it starts the usual way."""
    import multiprocessing.forkserver as forkserver
    import socket
    from multiprocessing import connection, resource_tracker, util

    server = forkserver._forkserver
    if sys.version_info >= (3, 14) or server._forkserver_pid is not None:
        forkserver.ensure_running()
        return
    resource_tracker.ensure_running()
    with socket.socket(socket.AF_UNIX) as listener:
        address = connection.arbitrary_address("AF_UNIX")
        listener.bind(address)
        if not util.is_abstract_socket_namespace(address):
            os.chmod(address, 0o600)
        listener.listen()
        alive_r, alive_w = os.pipe()  # (the server ends when every client's end closes)
        pid = os.fork()
        if pid == 0:  # the server: serves until its clients are gone, then exits
            code = 0
            try:
                os.close(alive_w)
                forkserver.main(listener.fileno(), alive_r, [])  # (all imported already)
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else 0
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        os.close(alive_r)
    server._forkserver_address = address
    server._forkserver_alive_fd = alive_w
    server._forkserver_pid = pid


def start_fork_server() -> None:
    """Before anything else starts a thread or a socket here: import what every role
    imports and fork the fork server from this process, so that roles started later
    (by :class:`RoleGroup`, once the parameter server's coordinator runs in this
    process) are forks of it rather than of a new Python. Does nothing where workers
    are not forked, or where this process already has other threads."""
    import importlib
    import threading

    if not fork_workers() or threading.active_count() > 1:
        return
    importlib.import_module(WORKER_MODULE)
    _preload_forkserver(())
    _fork_forkserver()


def _role_process(config_path: str) -> None:
    """A role's process, forked by the fork server. The server lives while a process
    holds the end of a pipe it hands each one; given up here, the server ends with the
    launcher, and this process with the server (see ``shoal.worker``): a SIGKILLed
    launcher leaves no role behind."""
    import multiprocessing.forkserver as forkserver

    server = forkserver._forkserver
    if server._forkserver_alive_fd is not None:
        with contextlib.suppress(OSError):
            os.close(server._forkserver_alive_fd)
        server._forkserver_alive_fd = None
    forked_worker(config_path)


@dataclass
class Role:
    """One process to start: its role name, its rank within the role, its environment."""

    role: str
    rank: int
    env: dict[str, str]


class RoleGroup:
    """Processes started with torchrun's process layer, each watched on its own.

    torchrun's agent treats its workers as one unit: one failure stops (or
    restarts) them all. A parameter server needs the opposite, so roles are
    started one ``PContext`` each (``torch.distributed.elastic.multiprocessing.
    start_processes``, the layer under the agent) and :meth:`poll` reports each
    exit separately.
    """

    def __init__(
        self,
        roles: list[Role],
        config_path: str,
        preload: tuple[str, ...] = (),
        fork_first: bool = False,
    ) -> None:
        quiet_torchrun()
        # each exit is reported by the caller, in its own words
        logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(
            logging.CRITICAL
        )
        self.roles = roles
        self.config_path = config_path
        self.preload = preload
        """Modules the fork server imports for every process, beyond the worker's."""
        self.raised = failure.Raised(failure.failures_dir(Path(config_path).parent))
        """The exceptions its processes stopped on (:data:`~shoal.failure.EXIT_RAISED`)."""
        self.fork_first = fork_first and fork_workers()
        """The first processes are forks of this one (which has no threads yet), the
        later ones (restarts) the fork server's: a fork server costs a new Python's
        start-up, one of this process's fork nothing."""
        if self.fork_first:
            from shoal.launch import preload

            preload()
        self.contexts = [self._start(r) for r in roles]
        self.fork_first = False
        if fork_first and fork_workers():  # ready for the first restart
            _preload_forkserver(self.preload)
            _fork_forkserver()
        self.exit_codes: dict[int, int] = {}
        self.restarts: dict[int, int] = {}
        self.stopped_since: dict[int, float] = {}  # pid -> when first seen stopped

    def _start(self, r: Role) -> Any:
        from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, start_processes

        env = {**r.env, "SHOAL_ROLE": r.role, "SHOAL_ROLE_RANK": str(r.rank)}
        env[LAUNCHER_ENV] = str(os.getpid())
        env[failure.FAILURES_ENV] = str(self.raised.where)
        if not fork_workers():
            return start_processes(
                name=f"shoal-{r.role}{r.rank}",
                entrypoint=sys.executable,
                args={0: ("-u", "-m", WORKER_MODULE, self.config_path)},
                envs={0: env},
                logs_specs=DefaultLogsSpecs(),
            )
        if not self.fork_first:
            _preload_forkserver(self.preload)
        return start_processes(
            name=f"shoal-{r.role}{r.rank}",
            entrypoint=forked_worker if self.fork_first else _role_process,
            args={0: (self.config_path,)},
            envs={0: env},
            logs_specs=DefaultLogsSpecs(),
            start_method="fork" if self.fork_first else "forkserver",
        )

    def restart(self, role: Role, env: dict[str, str]) -> int:
        """Start ``role`` again (it exited), with ``env`` added; how often it was restarted."""
        i = self.roles.index(role)
        self.roles[i] = Role(role.role, role.rank, {**role.env, **env})
        self.contexts[i] = self._start(self.roles[i])
        self.exit_codes.pop(i, None)
        self.restarts[i] = self.restarts.get(i, 0) + 1
        return self.restarts[i]

    def poll(self) -> list[tuple[Role, int]]:
        """Roles that exited since the last call, with their exit codes (negative: signal)."""
        exited = []
        for i, ctx in enumerate(self.contexts):
            if i in self.exit_codes:
                continue
            result = ctx.wait(0)
            if result is None:
                continue
            code = 0
            if result.failures:
                code = next(iter(result.failures.values())).exitcode
            self.exit_codes[i] = code
            exited.append((self.roles[i], code))
        return exited

    def kill(self, role: str, rank: int) -> None:
        """Stop one role's process (a hung worker): SIGKILL, even if it is stopped."""
        for i, r in enumerate(self.roles):
            if r.role == role and r.rank == rank and i not in self.exit_codes:
                for pid in self.contexts[i].pids().values():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)

    def signal(self, signum: int) -> None:
        """Send ``signum`` to every running process."""
        for i, ctx in enumerate(self.contexts):
            if i not in self.exit_codes:
                for pid in ctx.pids().values():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signum)

    def stopped(self, for_s: float) -> list[tuple[Role, int, float]]:
        """Roles whose process has been stopped (SIGSTOP, a debugger) for ``for_s``
        seconds or more: ``(role, pid, seconds)``. A stopped process beats no heartbeat
        and answers nothing; its launcher sees it at once, wherever it was."""
        now, found, seen = time.monotonic(), [], set()
        for i, ctx in enumerate(self.contexts):
            if i in self.exit_codes:
                continue
            for pid in ctx.pids().values():
                seen.add(pid)
                if procs.state(pid) != "stopped":
                    self.stopped_since.pop(pid, None)
                    continue
                since = self.stopped_since.setdefault(pid, now)
                if now - since >= for_s:
                    found.append((self.roles[i], pid, now - since))
        self.stopped_since = {p: t for p, t in self.stopped_since.items() if p in seen}
        return found

    @property
    def running(self) -> int:
        return len(self.contexts) - len(self.exit_codes)

    def close(self) -> None:
        for i, ctx in enumerate(self.contexts):
            if i not in self.exit_codes:
                ctx.close()
