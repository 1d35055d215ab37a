"""A fork server for the suite's ``shoal`` commands.

Each ``python -m shoal ...`` the tests run would start Python and import torch
and shoal first: 1.6 s of CPU, on the path of every test that trains. Here one
process per test worker imports them once and forks a child per command; the
child takes the command's environment, directory and output pipes and runs
:func:`shoal.cli.run_command`, the console command's own entry point, so what
runs is what a user's ``shoal`` runs, from its first line of ``main``.

What the server must hold to fork safely: one thread, and no OpenMP thread team
(nothing computed with torch), as shoal's own launcher requires of itself
before it forks workers (``OMP_NUM_THREADS=1``, set before torch loads, as
:func:`shoal.cli.main` does for a command that launches workers).

The client side, :func:`start`, returns a :class:`Command` that behaves as the
``subprocess.Popen`` the tests used (pid, signals, wait with a timeout,
communicate, pipes), and :func:`run` as ``subprocess.run``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

PRELOAD = (
    "shoal.cli",
    "shoal.cli.train",
    "shoal.launch",
    "shoal.worker",
    "shoal.trainer",
    "shoal.inplace.launch",
    "shoal.strategies.ps.coordinator",
)


# --- the server ---------------------------------------------------------------------


def serve(control: socket.socket) -> None:
    """Fork a child per request read from ``control`` until it closes."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    assert threading.active_count() == 1, "the fork server must have one thread"
    control.sendall(b"R")  # ready
    children: dict[int, socket.socket] = {}  # pid -> where its exit status goes
    while True:
        readable, _, _ = select.select([control], [], [], 0.05)
        _reap(children)
        if not readable:
            continue
        try:
            header, fds, _, _ = socket.recv_fds(control, 1 << 20, 4)
        except OSError:
            header = b""
        if not header:
            return  # (the test worker is gone)
        request = json.loads(header.decode())
        for fd in fds:  # (no later command, nor its workers, may hold them open)
            os.set_inheritable(fd, False)
        status = socket.socket(fileno=fds[3])
        pid = os.fork()
        if pid == 0:
            for other in children.values():
                other.close()
            _child(control, request, fds)
        for fd in fds[:3]:
            os.close(fd)
        try:
            status.sendall(struct.pack("!q", pid))
            children[pid] = status
        except OSError:  # (the test that asked is gone: so is its command)
            os.kill(pid, signal.SIGKILL)
            status.close()


def _reap(children: dict[int, socket.socket]) -> None:
    while children:
        try:
            pid, wstatus = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        status = children.pop(pid, None)
        if status is not None:
            with contextlib.suppress(OSError):
                status.sendall(struct.pack("!q", os.waitstatus_to_exitcode(wstatus)))
            status.close()


def _child(control: socket.socket, request: dict, fds: list[int]) -> None:
    code = 1
    try:
        if request["session"]:
            os.setsid()
        control.close()
        os.close(fds[3])
        for target, fd in enumerate(fds[:3]):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = ["shoal", *request["argv"]]  # (sys.stdout and stderr write to fds 1, 2)
        sys.path[:] = _path(request["cwd"], request["env"].get("PYTHONPATH", ""))
        from shoal.cli import run_command

        run_command()  # (exits the process itself)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _path(cwd: str, pythonpath: str) -> list[str]:
    """``sys.path`` as ``python -m`` in ``cwd`` with ``PYTHONPATH`` would start with: the
    directory, then ``PYTHONPATH``'s entries, then the installation's (the server's, less
    what its own start-up put first)."""
    ours = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    rest = [p for p in sys.path[1:] if p not in ours]
    return [cwd, *[p for p in pythonpath.split(os.pathsep) if p], *rest]


# --- the client ---------------------------------------------------------------------


class _Server:
    """This test worker's fork server, started on first use."""

    lock = threading.Lock()
    control: socket.socket | None = None
    process: subprocess.Popen | None = None

    @classmethod
    def get(cls, env: dict[str, str]) -> socket.socket:
        with cls.lock:
            if cls.process is not None and cls.process.poll() is not None:
                cls.control = None  # (it died: a new one)
            if cls.control is None:
                mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                fd = theirs.fileno()
                code = f"import socket, tests.forkserve as f; f.serve(socket.socket(fileno={fd}))"
                server_env = {**env, "OMP_NUM_THREADS": "1", "TORCH_CPP_LOG_LEVEL": "ERROR"}
                server_env.pop("SHOAL_FAULT", None)
                cls.process = subprocess.Popen(
                    [sys.executable, "-c", code],
                    env=server_env,
                    cwd=Path(__file__).resolve().parents[1],
                    pass_fds=[theirs.fileno()],
                )
                theirs.close()
                mine.settimeout(120)
                if mine.recv(1) != b"R":
                    raise RuntimeError("the tests' fork server did not start")
                mine.settimeout(None)
                cls.control = mine
            return cls.control


class Command:
    """A ``shoal`` command forked by the server: the parts of ``subprocess.Popen`` the
    tests use."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path | None,
                 stdout: int | None, stderr: int | None, session: bool) -> None:  # fmt: skip
        self.args = ["shoal", *argv]
        self.returncode: int | None = None
        ends = []  # (the child's end, ours or None)
        for how in (subprocess.DEVNULL, stdout, stderr):
            if how == subprocess.PIPE:
                r, w = os.pipe()
                ends.append((w, r))
            else:
                ends.append((os.open(os.devnull, os.O_RDWR), None))
        self.stdout, self.stderr = (_reader(ends[1][1]), _reader(ends[2][1]))
        mine, theirs = socket.socketpair()
        where = str(cwd or os.getcwd())
        request = json.dumps({"argv": argv, "env": env, "cwd": where, "session": session})
        control = _Server.get(env)
        with _Server.lock:
            socket.send_fds(control, [request.encode()], [e[0] for e in ends] + [theirs.fileno()])
        for child_end, _ in ends:
            os.close(child_end)
        theirs.close()
        self._status = mine
        self.pid = struct.unpack("!q", _read(mine, 8))[0]

    def poll(self) -> int | None:
        if self.returncode is None:
            readable, _, _ = select.select([self._status], [], [], 0)
            if readable:
                self._finish()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            readable, _, _ = select.select([self._status], [], [], timeout)
            if not readable:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self._finish()
        assert self.returncode is not None
        return self.returncode

    def _finish(self) -> None:
        data = _read(self._status, 8)
        self.returncode = struct.unpack("!q", data)[0] if data else -signal.SIGKILL
        self._status.close()

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # (not a pid the system may have given another)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Both pipes read to their end (in threads, so neither fills), and the exit."""
        out: dict[str, str] = {}
        readers = [
            threading.Thread(target=lambda n=n, f=f: out.__setitem__(n, f.read()), daemon=True)
            for n, f in (("stdout", self.stdout), ("stderr", self.stderr))
            if f is not None
        ]
        for t in readers:
            t.start()
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.wait()
            for t in readers:
                t.join(5)
            raise
        for t in readers:
            t.join()
        return out.get("stdout", ""), out.get("stderr", "")

    def __enter__(self) -> Command:
        return self

    def __exit__(self, *exc: object) -> None:
        for f in (self.stdout, self.stderr):
            if f is not None:
                f.close()
        if self.returncode is None:
            self.wait()


def _reader(fd: int | None) -> io.TextIOWrapper | None:
    return None if fd is None else open(fd, encoding="utf-8", errors="replace")


def _read(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return data
        data += chunk
    return data


def start(argv: list[str], env: dict[str, str], cwd: Path | None = None,
          stdout: int | None = None, stderr: int | None = None,
          start_new_session: bool = False) -> Command:  # fmt: skip
    """``python -m shoal ARGV`` started (as ``subprocess.Popen`` would)."""
    return Command(argv, env, cwd, stdout, stderr, start_new_session)


def run(argv: list[str], env: dict[str, str], cwd: Path | None = None,
        timeout: float = 240) -> subprocess.CompletedProcess:  # fmt: skip
    """``python -m shoal ARGV`` run to its end, its output captured (as
    ``subprocess.run(..., capture_output=True, text=True)`` would)."""
    cmd = Command(argv, env, cwd, subprocess.PIPE, subprocess.PIPE, False)
    try:
        out, err = cmd.communicate(timeout)
    except subprocess.TimeoutExpired as e:
        raise subprocess.TimeoutExpired(cmd.args, timeout) from e
    finally:
        for f in (cmd.stdout, cmd.stderr):
            if f is not None:
                f.close()
    return subprocess.CompletedProcess(cmd.args, cmd.wait(), out, err)
