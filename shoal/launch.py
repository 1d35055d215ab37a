"""Launching workers through torchrun's own machinery.

``shoal train`` builds the argument list that ``torchrun`` would take, turns it
into a :class:`torch.distributed.launcher.api.LaunchConfig` with
``torch.distributed.run.config_from_args`` and hands it to
:func:`~torch.distributed.launcher.api.elastic_launch`. The process running
``shoal train`` is therefore torchrun's elastic agent, and the same command runs
on several machines with torchrun's multi-node settings.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shlex
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal import failure, procs
from shoal.config import ClusterConfig, parse_endpoint
from shoal.dist import LAUNCHER_ENV, loopback_listener
from shoal.errors import UserError

WORKER_MODULE = "shoal.worker"


def describe_exit(code: int) -> str:
    """``was killed by SIGKILL`` or ``exited with code 1``: how a process ended."""
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


@dataclass
class LaunchFailed(Exception):
    """Some worker failed; ``message`` is one line naming it."""

    message: str

    def __str__(self) -> str:
        return self.message


def torchrun_args(cluster: ClusterConfig, config_path: str) -> list[str]:
    """The ``torchrun`` arguments equivalent to this launch."""
    nodes = f"{cluster.min_nodes}:{cluster.nnodes}" if cluster.elastic else str(cluster.nnodes)
    args = ["--nnodes", nodes, "--nproc-per-node", str(cluster.workers)]
    if cluster.elastic:  # torchrun's dynamic rendezvous; it hands out the node ranks
        args += [
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            cluster.rdzv_endpoint,
            "--rdzv-id",
            f"shoal-{cluster.rdzv_endpoint}",
            # node 0 hosts the rendezvous store (torch guesses from the host name, which
            # need not be the endpoint's); after a failure the survivors go on once MIN
            # have met and nobody else came for --rdzv-last-call seconds
            "--rdzv-conf",
            f"is_host={str(cluster.node_rank == 0).lower()},"
            f"last_call_timeout={cluster.rdzv_last_call:g}",
            # the address the other machines reach this one at (torch would take the FQDN)
            "--local-addr",
            local_address(*parse_endpoint(cluster.rdzv_endpoint)),
        ]
    elif cluster.rdzv_endpoint:
        args += [
            "--rdzv-backend",
            "static",
            "--rdzv-endpoint",
            cluster.rdzv_endpoint,
            "--node-rank",
            str(cluster.node_rank),
        ]
    else:  # what torchrun --standalone does: a private store on a free local port
        args += [
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            "localhost:0",
            "--rdzv-id",
            uuid.uuid4().hex,
            "--local-addr",  # the workers' process group meets on loopback too
            "127.0.0.1",
        ]
    args += ["--max-restarts", str(cluster.max_restarts), "--monitor-interval", "0.1"]
    return [*args, "-m", WORKER_MODULE, config_path]


def local_address(host: str, port: int) -> str:
    """This machine's address on the route to ``host`` (node 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, port))
        except OSError as e:
            raise UserError(f"cannot reach node 0 at {host}:{port}: {e.strerror}") from None
        return s.getsockname()[0]


def describe(cluster: ClusterConfig, config_path: str) -> str:
    """The equivalent ``torchrun`` command line, for logs and docs."""
    return "torchrun " + shlex.join(torchrun_args(cluster, config_path))


def check_port(cluster: ClusterConfig) -> None:
    """On node 0, fail early and clearly if the rendezvous port is taken."""
    if not cluster.rdzv_endpoint or cluster.node_rank != 0:
        return
    host, port = parse_endpoint(cluster.rdzv_endpoint)
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UserError(f"cannot resolve rendezvous host {host!r}: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind(addr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UserError(
                    f"port {port} on {host} is already in use; pick another with "
                    "--rdzv-endpoint HOST:PORT"
                ) from None
            if e.errno == errno.EADDRNOTAVAIL:
                raise UserError(
                    f"{host} is not an address of this machine, but node 0 must host "
                    "the rendezvous (--rdzv-endpoint)"
                ) from None
            raise


def launch(cluster: ClusterConfig, config_path: str, restart_why: str = "") -> None:
    """Run the workers of this node to completion; raise :class:`LaunchFailed` if one fails.
    A lost worker restarts them all (``restart_why``: why not in place, said with it)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, parse_args

    quiet_torchrun()
    CTRL_C.clear()
    _pass_ctrl_c_on_as_sigterm()
    failed = _name_failed_workers(
        cluster, failure.failures_dir(Path(config_path).parent), restart_why
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ[LAUNCHER_ENV] = str(os.getpid())
    os.environ[failure.FAILURES_ENV] = str(failed.where)
    # A restart must meet in a fresh store: in the agent's shared one, the new
    # workers would read the dead ones' gloo addresses (same keys, no prefix).
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    # a dead peer makes c10d print a C++ stack per failed store call; shoal names the culprit
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    args = torchrun_args(cluster, config_path)
    if not cluster.rdzv_endpoint:  # one machine: nothing listens beyond loopback
        _register_local_rendezvous()
        args[args.index("--rdzv-backend") + 1] = LOCAL_RENDEZVOUS
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo's pairs, as the stores
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    config, entry, entry_args = config_from_args(parse_args(args))
    if fork_workers():
        config.start_method = "fork"
        entry, entry_args = forked_worker, [config_path]
        preload()
    start = time.time()
    # the agent installs its own handlers and leaves them: the launcher's come back after
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    usr1 = signal.signal(signal.SIGUSR1, _on_usr1)
    try:
        elastic_launch(config, entry)(*entry_args)
    except ChildFailedError as e:
        preempted = preempted_since(config_path, start)
        if preempted is not None:
            raise JobPreempted(preempted) from None
        # name the root cause, not the peers the agent stopped (SIGTERM) or that stopped
        # because a peer failed (EXIT_PEER_LOST); a signal before an exit code
        from shoal.health import EXIT_PEER_LOST

        causes = [
            (r, f)
            for r, f in e.failures.items()
            if f.exitcode not in (-signal.SIGTERM, EXIT_PEER_LOST)
        ] or list(e.failures.items())
        rank, first = min(causes, key=lambda rf: (rf[1].exitcode >= 0, rf[1].timestamp))
        if failed.final:
            raise LaunchFailed(failed.final) from None
        if first.exitcode == failure.EXIT_RAISED and failed.raised.seen:
            raise LaunchFailed(f"{failed.raised.seen[-1].headline()} (no restart left)") from None
        how = describe_exit(first.exitcode)
        raise LaunchFailed(f"worker rank {rank} (pid {first.pid}) {how}") from None
    except SignalException:  # Ctrl-C or SIGTERM: the agent has already stopped the workers
        preempted = preempted_since(config_path, start)
        if preempted is not None:
            raise JobPreempted(preempted) from None
        if failed.final:
            raise LaunchFailed(failed.final) from None
        if failed.mistake:
            raise LaunchFailed("a worker stopped on a mistake in the job") from None
        raise KeyboardInterrupt from None
    except Exception as e:  # rendezvous and agent failures: one line, not a traceback
        raise LaunchFailed(f"launch failed: {type(e).__name__}: {e}".splitlines()[0]) from None
    finally:
        failed.cancel()
        signal.signal(signal.SIGUSR1, usr1)
        for sig, handler in before.items():
            signal.signal(sig, handler)


SPAWN_ENV = "SHOAL_SPAWN_WORKERS"
"""Set to 1 to start each worker as a new Python (``python -m shoal.worker``) rather than
a fork of the launcher."""


def fork_workers() -> bool:
    """Whether this node's workers are forks of the launcher (Linux; not where
    ``SHOAL_SPAWN_WORKERS=1``): a fork has torch and shoal imported already, where a new
    Python spends about 1.2 s of CPU per worker importing them, a large part of a small
    job's start-up on a small machine. The fork is taken before any process group, CUDA
    context or thread pool of the job exists."""
    return sys.platform == "linux" and os.environ.get(SPAWN_ENV, "") != "1"


def preload() -> None:
    """What every worker imports, imported once here, before the forks."""
    import importlib

    import torch
    import torch._dynamo  # (DDP, FSDP and the pipeline schedules import it)

    # torch._dynamo costs each importer 1.4 s of CPU: imported once here, not in every
    # worker, a job of 2 or 4 workers takes a fifth to a quarter less (docs/BENCHMARKS.md)
    importlib.import_module(WORKER_MODULE)  # (by name: the worker is a layer above)
    torch.set_num_threads(1)  # (no OpenMP team here: a fork would inherit a broken one)


def forked_worker(config_path: str) -> None:
    """A worker forked from the launcher: ``python -u -m shoal.worker CONFIG``, minus the
    start-up. The launcher's signal handlers are not the worker's; a non-zero exit code
    leaves as one (torch's agent collects the return value of a clean one)."""
    import importlib

    for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(s, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(line_buffering=True, write_through=True)  # (as python -u)
    code = importlib.import_module(WORKER_MODULE).main([config_path])
    sys.stdout.flush()
    sys.stderr.flush()
    if code:
        sys.exit(code)


CTRL_C = threading.Event()
"""Set when this launcher got a SIGINT (Ctrl-C) during its last launch."""


def _pass_ctrl_c_on_as_sigterm() -> None:
    """Ctrl-C reaches every process of the terminal's group, the workers included, and
    the agent passes the signal it got on to them: a second SIGINT, which a worker obeys
    at once (the user's second Ctrl-C). The agent passes a SIGTERM on instead, so that
    the workers finish the step they agreed on and checkpoint it (see shoal.preempt)."""
    from torch.distributed.elastic.multiprocessing import api

    def on_signal(signum: int, frame: Any) -> None:
        sigval = signal.Signals(signum)
        if sigval == signal.SIGINT:
            CTRL_C.set()  # (the workers may see the SIGTERM first: the launcher knows)
            sigval = signal.SIGTERM
        raise api.SignalException(f"Process {os.getpid()} got signal: {signum}", sigval=sigval)

    api._terminate_process_handler = on_signal  # (what the agent registers as it starts)
    if not getattr(sys.unraisablehook, "shoal_signal_again", False):
        sys.unraisablehook = _signal_again(sys.unraisablehook)


def _signal_again(hook: Callable[[Any], Any]) -> Callable[[Any], None]:
    """``hook``, but a stop (the agent's :class:`SignalException`) raised in code whose
    exceptions Python drops, a finalizer run by the garbage collector, is not printed as
    a traceback and lost: the signal is sent again, a moment later (sent from here, its
    handler would raise in this hook, which drops it too), to land in the agent's loop."""
    from torch.distributed.elastic.multiprocessing.api import SignalException

    def unraisable(args: Any) -> None:
        if isinstance(args.exc_value, SignalException):
            again = threading.Timer(0.05, os.kill, (os.getpid(), args.exc_value.sigval))
            again.daemon = True
            again.start()
            return
        hook(args)

    unraisable.shoal_signal_again = True  # type: ignore[attr-defined]
    return unraisable


def _on_usr1(signum: int, frame: Any) -> None:
    """Slurm's ``--signal``: SIGUSR1 would end this process (its default action). The
    workers get it (so they name it), then the agent gets a SIGTERM, on which it stops
    the workers instead of restarting them; they stop at a common step and checkpoint."""
    for pid in procs.children(os.getpid()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGUSR1)
    os.kill(os.getpid(), signal.SIGTERM)


class JobPreempted(Exception):
    """The workers stopped on a scheduler's signal, or Ctrl-C (``ctrl_c``), after
    checkpointing a common step."""

    def __init__(self, record: dict[str, Any]) -> None:
        super().__init__(f"preempted after step {record.get('step')}")
        self.record = record
        self.ctrl_c = CTRL_C.is_set() or record.get("signal") == "SIGINT"


def preempted_since(config_path: str, start: float) -> dict[str, Any] | None:
    """The preemption the workers noted in the run directory since ``start``, if any."""
    from shoal.preempt import PREEMPTED_FILE, history

    run_dir = Path(config_path).parent
    path = run_dir / PREEMPTED_FILE
    if not path.is_file() or path.stat().st_mtime < start:
        return None
    records = history(run_dir)
    return records[-1] if records else None


LOCAL_RENDEZVOUS = "shoal-local"
"""torchrun's c10d rendezvous, its store bound to loopback (a one-machine job)."""


def _local_rendezvous(params: Any) -> Any:
    """A c10d rendezvous handler whose store listens on 127.0.0.1 only: torch's own
    binds every interface, which a job on one machine does not need."""
    from datetime import timedelta

    from torch.distributed import TCPStore
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import (
        C10dRendezvousBackend,
    )
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler

    class Backend(C10dRendezvousBackend):
        @property
        def name(self) -> str:
            return LOCAL_RENDEZVOUS

    store = TCPStore(
        "127.0.0.1",
        (sock := loopback_listener()).getsockname()[1],
        is_master=True,
        multi_tenant=True,
        timeout=timedelta(seconds=60),
        master_listen_fd=sock.detach(),
    )
    return create_handler(store, Backend(store, params.run_id), params)


def _register_local_rendezvous() -> None:
    from torch.distributed.elastic.rendezvous import rendezvous_handler_registry

    rendezvous_handler_registry.register(LOCAL_RENDEZVOUS, _local_rendezvous)  # (idempotent)


class _FailedWorker(logging.Handler):
    """Turns the agent's record of a failed worker into shoal's one line naming it.

    The agent polls its workers every ``--monitor-interval`` and, at the first
    poll that finds one failed, logs it and stops the others. Survivors of a
    broken collective wait for that (see ``Heartbeat.await_verdict``), so the
    worker named is the one that died. A worker that exited with
    :data:`~shoal.health.EXIT_PEER_LOST` has named the culprit itself.
    """

    def __init__(self, cluster: ClusterConfig, where: Path, restart_why: str = "") -> None:
        super().__init__(logging.ERROR)
        self.cluster = cluster
        self.restart_why = restart_why
        """Why a loss restarts every worker rather than recovering in place ("": chosen)."""
        self.where = where
        self.mistake = False
        self.raised = failure.Raised(where)
        self.final = ""  # why the job is not retried, once decided
        self.timer: threading.Timer | None = None

    def _stop_agent(self) -> None:
        """A worker stopped on a mistake in the job (exit status 2, its line printed), or
        on an exception that a restart would repeat: the agent is stopped as Ctrl-C would
        stop it (from another thread, once this log call has returned); workers it
        restarted meanwhile see :data:`~shoal.failure.STOP_FILE` and exit at once."""
        with contextlib.suppress(OSError):
            (self.where / failure.STOP_FILE).touch()
        if not self.mistake:
            self.mistake = True
            self.timer = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGTERM))
            self.timer.start()

    def cancel(self) -> None:
        """The launch is over: a stop not yet sent is not sent."""
        if self.timer is not None:
            self.timer.cancel()

    def _raised(self) -> None:
        """A worker stopped on an exception: shown (once), and the job stopped where a
        restart would only repeat it."""
        first, why = self.raised.take()
        if first is not None and why and not self.final:
            self.final = f"{first.headline()}; not retried: {why}"
            self._stop_agent()

    def emit(self, record: logging.LogRecord) -> None:
        from shoal.health import EXIT_PEER_LOST

        if not str(record.msg).startswith("failed (exitcode") or len(record.args or ()) < 3:
            return
        code, local_rank, pid = record.args[:3]  # type: ignore[index]
        if code == 2:
            self._stop_agent()
        if code == failure.EXIT_RAISED:
            self._raised()
            return
        if code in (EXIT_PEER_LOST, 2):  # it named the culprit, or its mistake, itself
            return
        how = describe_exit(code)
        who = (
            f"worker rank {local_rank}"
            if self.cluster.nnodes == 1
            else f"node {self.cluster.node_rank}'s local worker {local_rank}"
        )
        why = f"; every worker restarts (not in place: {self.restart_why})"
        print(
            f"shoal: error: {who} on {socket.gethostname()} (pid {pid}) {how}"
            + (why if self.restart_why else ""),
            file=sys.stderr,
            flush=True,
        )


def _name_failed_workers(cluster: ClusterConfig, where: Path, restart_why: str) -> _FailedWorker:
    log = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
    log.handlers = [h for h in log.handlers if not isinstance(h, _FailedWorker)]
    handler = _FailedWorker(cluster, where, restart_why)
    log.addHandler(handler)
    log.setLevel(logging.ERROR)
    log.propagate = False
    return handler


def quiet_torchrun() -> None:
    """torchrun's agent logs every rendezvous detail at INFO/WARNING; keep errors."""
    prefixes = (
        "torch.distributed.elastic",
        "torch.distributed.launcher",
        "torch.distributed.run",
        "torch.multiprocessing",  # ("Terminating process ... via SIGTERM" as it stops one)
    )
    # (each of elastic's loggers has a level of its own, WARNING: set every one)
    named = [n for n in logging.root.manager.loggerDict if n.startswith(prefixes)]
    for name in {*prefixes, *named, "torch.distributed.elastic.agent.server.api"}:
        logger = logging.getLogger(name)
        if logger.level < logging.ERROR:
            logger.setLevel(logging.ERROR)
    _cheap_rendezvous_names()


def _cheap_rendezvous_names() -> None:
    """torch's dynamic rendezvous names each of its events after the calling method
    with ``inspect.stack()``, which reads the source of every frame on the stack:
    0.6 s of a one-step job's 4.9 s. The same name, from the frame itself."""
    from torch.distributed.elastic.rendezvous import dynamic_rendezvous

    def get_method_name(depth: int = 2) -> str:
        try:
            return sys._getframe(depth).f_code.co_name
        except ValueError:  # (a stack shallower than depth)
            return "no_method_name"

    if hasattr(dynamic_rendezvous, "get_method_name"):
        dynamic_rendezvous.get_method_name = get_method_name
