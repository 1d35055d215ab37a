"""Entry point of every launched process: ``python -m shoal.worker CONFIG``.

torchrun's agent starts one of these per local rank with the rendezvous
environment set; it reads the resolved job file and runs the trainer.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch.distributed

from shoal import dist, failure, procs
from shoal.config import JobConfig
from shoal.errors import PeerLost, PeerRejected, UserError
from shoal.faults import Injector
from shoal.health import EXIT_PEER_LOST, Heartbeat
from shoal.inplace import protocol as inplace
from shoal.inplace.member import Excluded, Member
from shoal.jobfile import load_toml
from shoal.launch import LAUNCHER_ENV
from shoal.layout import USER_ERROR_FILE
from shoal.preempt import EXIT_PREEMPTED, Preempted
from shoal.strategies import resolve
from shoal.trainer import Trainer


def _die_with_parent() -> None:
    """Linux: this process is killed when the launcher that started it dies (a SIGKILLed
    ``shoal train``), instead of living on as an orphan that waits for peers."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    launcher = os.environ.get(LAUNCHER_ENV)
    if launcher and os.getppid() != int(launcher) and not procs.alive(int(launcher)):
        os._exit(1)  # it died before we asked (a fork server's child: its server's
        # parent is the launcher, and the server ends with it)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    _die_with_parent()
    # what this process is, where ps, top and the chaos bench see it (a fork's environ
    # in /proc is its launcher's, and a new Python's name is just "python")
    procs.name_self(
        os.environ.get("SHOAL_ROLE", "worker"),
        os.environ.get("SHOAL_ROLE_RANK") or os.environ.get("RANK", ""),
    )
    if len(args) != 1:
        print("usage: python -m shoal.worker CONFIG.toml", file=sys.stderr)
        return 2
    try:
        job = load_toml(args[0])
    except UserError as e:
        print(f"shoal: error: {e}", file=sys.stderr)
        return 2
    return run(job)


def run(job: JobConfig) -> int:
    """Run this process's part of ``job`` (its role from ``SHOAL_ROLE``, a training
    worker by default) and return the exit code; joins the process group that the
    environment describes, or uses the one already there."""
    marker = Path(job.output.out) / USER_ERROR_FILE
    stop = failure.stopped(os.environ.get(failure.FAILURES_ENV))
    if dist.attempt() > 0 and (marker.exists() or stop):
        return 2  # a mistake or an exception was reported already; retrying cannot help
    plugin = resolve(job)
    if torch.distributed.is_initialized() and not plugin.needs_process_group:
        # another launcher's group (torchrun, Ray, TorchDistributor): the strategy gives
        # each rank a role; the training ones come back here, without the group
        group = dist.init(job.train.device)
        return plugin.run_in_group(job, group, lambda: _run(job))
    return _run(job)


def _run(job: JobConfig) -> int:
    trainer = heartbeat = faults = None
    preempted = False
    plugin = resolve(job)
    try:
        grouped = plugin.needs_process_group and inplace.STORE_ENV not in os.environ
        env = dist.init(job.train.device, process_group=grouped)
        role = os.environ.get("SHOAL_ROLE", "worker")
        if role != "worker":
            plugin.run_role(role, job, env)
            return 0
        faults = Injector(env.rank, run_dir=job.output.out)
        faults.at_start()  # (a fault "at step 0", a CPU quota)
        member = _member(job, plugin)
        if member is None and plugin.needs_process_group and env.world_size > 1:
            heartbeat = Heartbeat(env.rank, env.world_size, job.strategy.heartbeat_timeout)
        trainer = Trainer(job, env, member)
        if member is not None:  # (built before it joins: the others need not wait for that)
            env = trainer.join()
        if plugin.needs_process_group and (member is None or member.generation.step < 0):
            _restore(trainer, env)  # (parameter servers restore themselves)
        trainer.run()
        if heartbeat is not None:
            heartbeat.stop()
    except Excluded as e:  # (it came back after the others went on: nothing to do)
        print(f"shoal: {e}; it stops", file=sys.stderr)
        return 0
    except Preempted:
        preempted = True  # every rank saved the same step: leave together, below
        if heartbeat is not None:
            heartbeat.stop()
    except UserError as e:
        # every rank may find the same mistake: the first to write it down says it
        try:
            with (Path(job.output.out) / USER_ERROR_FILE).open("x") as fh:
                fh.write(f"{e}\n")
        except FileExistsError:
            return 2
        except OSError:
            pass
        print(f"shoal: error: {e}", file=sys.stderr)
        return 2
    except (PeerRejected, PeerLost) as e:
        rank = os.environ.get("SHOAL_ROLE_RANK") or os.environ.get("RANK", "")
        who = f"{os.environ.get('SHOAL_ROLE', 'worker')} {rank}"
        print(f"shoal: error: {who.strip()}: {str(e).splitlines()[0][:300]}", file=sys.stderr)
        return 1
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            return _raised(e, trainer)
        print(f"shoal: error: rank {os.environ.get('RANK', '?')}: {e}", file=sys.stderr)
        return 1
    except (torch.distributed.DistError, RuntimeError) as e:
        if not dist.peer_failure(e):
            return _raised(e, trainer)
        if heartbeat is not None:
            heartbeat.await_verdict()  # usually ends this process
        rank = os.environ.get("RANK", "?")
        print(
            f"shoal: error: rank {rank} lost a peer: {str(e).splitlines()[0][:300]}",
            file=sys.stderr,
        )
        return EXIT_PEER_LOST
    except Exception as e:  # the user's code (model, data, plugin), or a bug of shoal's
        return _raised(e, trainer)
    finally:
        if trainer is not None:
            trainer.strategy.close()
            del trainer
        if faults is not None:
            faults.close()
    # Leave together, then tear down: a rank that exits while a peer's gloo
    # threads still expect it can abort that peer.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    dist.shutdown()
    return EXIT_PREEMPTED if preempted else 0


def _raised(e: BaseException, trainer: Trainer | None) -> int:
    """This worker stopped on ``e``: recorded for its launcher, which shows it once and
    decides whether a restart can help (see :mod:`shoal.failure`)."""
    steps, finished = (trainer.step, trainer.finished) if trainer is not None else (0, 0)
    role = os.environ.get("SHOAL_ROLE", "worker")
    rank = int(os.environ.get("SHOAL_ROLE_RANK") or os.environ.get("RANK") or 0)
    failure.report(failure.record(e, role, rank, dist.attempt(), steps, finished))
    return failure.EXIT_RAISED


def _member(job: JobConfig, plugin: Any) -> Member | None:
    """This worker's membership of an in-place job (``--recovery inplace``), if it is one."""
    if inplace.STORE_ENV not in os.environ or not plugin.recovers_in_place:
        return None
    every, commits = job.train.log_every, plugin.commits_every(job)
    # a newcomer joins at a committed step: the first multiple of the commits' period at
    # or after every --log-every steps
    return Member(inplace.collective_timeout(job), check_every=-(-every // commits) * commits)


def _restore(trainer: Trainer, env: dist.DistEnv) -> None:
    """Continue from the newest good checkpoint, if the run has one: after ``--resume``,
    and after torchrun's agent restarted the workers following a failure."""
    path = trainer.restore()
    attempt = dist.attempt()
    # torchrun counts restarts after failures only; a checkpoint in a run that was not
    # --resume'd, found by a first attempt, means the agent re-formed the job because a
    # machine joined
    if attempt > 0:
        why = f"restart {attempt}"
    elif trainer.member is not None:
        return  # (in place: the launcher said why the generation starts from a checkpoint)
    elif path is not None and not trainer.job.output.resume:
        why = "a machine joined"
    else:
        return
    if env.is_main:
        where = f"from {path.parent.name}/{path.name}" if path else "from the start (no checkpoint)"
        print(
            f"shoal: {why}: {env.world_size} worker"
            f"{'s' if env.world_size != 1 else ''} resume {where}",
            file=sys.stderr,
            flush=True,
        )


if __name__ == "__main__":
    code = main()
    # Skip interpreter finalisation: gloo's worker threads may still hold
    # tensors whose release at that point aborts the process (SIGABRT). Every
    # output was already written and closed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
