"""The launcher of an in-place job on one machine: its store, its workers (each on its
own), replacements for the lost ones, and the generations."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.api import SignalException

from shoal import failure
from shoal.config import JobConfig
from shoal.dist import loopback_listener
from shoal.inplace import protocol as p
from shoal.inplace.coordinator import Coordinator
from shoal.launch import JobPreempted, LaunchFailed, describe_exit, preempted_since
from shoal.layout import GENERATIONS_FILE
from shoal.preempt import EXIT_INTERRUPTED, EXIT_PREEMPTED
from shoal.roles import Role, RoleGroup


def launch(job: JobConfig, config_path: str, replicas: list[list[int]] | None = None) -> None:
    """Run this machine's workers of ``job`` to the end, each lost one replaced while the
    others go on; raise :class:`~shoal.launch.LaunchFailed` if the job cannot finish.
    ``replicas``: where a sharded state's shards are (see
    :meth:`~shoal.strategies.plugin.Plugin.in_place_replicas`)."""
    if job.cluster.nnodes > 1:
        raise LaunchFailed("--recovery inplace runs on one machine (--nnodes 1) for now")
    slots, spares = job.cluster.workers, job.cluster.spares
    timeout_s = p.collective_timeout(job)
    sock = loopback_listener()
    port = sock.getsockname()[1]
    base = {
        p.STORE_ENV: f"127.0.0.1:{port}",
        "WORLD_SIZE": str(slots),
        "LOCAL_WORLD_SIZE": str(slots + spares),
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": "lo",
    }

    def role(slot: int, incarnation: int) -> Role:
        env = {**base, p.UID_ENV: f"{slot}.{incarnation}", "RANK": str(slot)}
        return Role("worker", slot, {**env, "LOCAL_RANK": str(slot)})

    roles = [role(slot, 0) for slot in range(slots + spares)]
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    group = RoleGroup(roles, config_path, preload=("torch._dynamo",), fork_first=True)
    # the store's thread only now: the first workers are forks of this process (they
    # connect to the listening socket meanwhile)
    store = dist.TCPStore(
        "127.0.0.1",
        port,
        is_master=True,
        wait_for_workers=False,
        timeout=timedelta(seconds=timeout_s),
        multi_tenant=True,
        master_listen_fd=sock.detach(),
    )
    whole = replicas is not None
    coordinator = Coordinator(store, slots, timeout_s, replicas)
    for r in roles:
        coordinator.started(r.env[p.UID_ENV])
    replaced = 0
    over = False  # (a job whose state is sharded lost every copy of a shard)
    waiting: list[Role] = []  # lost workers to replace once the others go on
    stopping = False  # (preempted: Ctrl-C, SIGTERM to the job)
    start = time.time()
    shown = 0  # generations said
    pids: list[dict] = []  # each generation's processes, and when it was formed

    def relay_usr1(signum: int, frame: Any) -> None:
        """Slurm's ``--signal``: the workers get it (so they name it), then this process a
        SIGTERM, which stops the job at a common step (as under torchrun's agent; not to
        every child: the fork server of replacements would die of it, and they with it)."""
        group.signal(signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)

    told: list[int] = []  # (a stop asked for: Ctrl-C, SIGTERM)

    def on_stop(signum: int, frame: Any) -> None:
        """A flag the loop reads where it can act on it (an exception raised wherever the
        signal landed, reading /proc say, ended the launcher with a traceback); a second
        signal stops at once."""
        if told:
            raise KeyboardInterrupt
        told.append(signum)

    def own_signals() -> None:  # (torch's process layer installs its own as it starts one)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_stop)

    own_signals()
    usr1 = signal.signal(signal.SIGUSR1, relay_usr1)
    try:
        while not coordinator.done:
            for r, code in group.poll():
                uid = r.env[p.UID_ENV]
                if code in (EXIT_PREEMPTED, EXIT_INTERRUPTED):
                    stopping = True
                coordinator.exited(uid, 0 if stopping else code)
                if code == 0 or stopping:
                    continue
                _stop_on_a_mistake(group, code)
                member = uid in coordinator.members()
                if over:  # (stopped to start again from the checkpoint: not counted)
                    waiting.append(r)
                    continue
                _say(f"worker {uid} (slot {r.rank}) {describe_exit(code)}"
                     + ("; the others go on without it" if member else ""))  # fmt: skip
                if replaced < job.cluster.max_restarts:
                    replaced += 1
                    waiting.append(r)
                elif whole and member:
                    raise LaunchFailed(
                        f"worker {uid} is lost and --max-restarts {job.cluster.max_restarts} "
                        "are spent: this job's mesh needs every worker"
                    )
            shard = coordinator.lost_shard() if not over else None
            if shard is not None:  # its state is gone: every worker starts again
                _say(f"every copy of shard {shard} is lost: the workers start again from "
                     "the newest checkpoint")  # fmt: skip
                over = True
                for uid in coordinator.members():
                    group.kill("worker", int(uid.split(".")[0]))
            for r, pid, seconds in group.stopped(job.strategy.heartbeat_timeout):
                _say(f"worker {r.env[p.UID_ENV]} (pid {pid}) is hung (stopped for "
                     f"{seconds:.1f} s); killing it")  # fmt: skip
                group.kill(r.role, r.rank)
            for uid in coordinator.tick():
                _say(f"worker {uid} took no part in its group's collectives for "
                     f"{timeout_s:g} s; killing it")  # fmt: skip
                slot = int(uid.split(".")[0])
                group.kill("worker", slot)
            while shown < len(coordinator.history):
                if coordinator.history[shown].step < 0:
                    over = False  # (the workers started again)
                _said(coordinator.history[shown])
                pids.append({"at": time.time(), "pids": _pids(group)})
                shown += 1
            # (the survivors go on first, where they can: a replacement takes CPU)
            if waiting and (coordinator.settled or whole):
                for r in waiting:
                    new = role(r.rank, int(r.env[p.UID_ENV].split(".")[1]) + 1)
                    group.restart(r, new.env)
                    coordinator.started(new.env[p.UID_ENV])
                own_signals()
                waiting = []
            if group.running == 0 and not coordinator.done:
                preempted = preempted_since(config_path, start)
                if preempted is not None:
                    raise JobPreempted(preempted)
                raise LaunchFailed("every worker of the job is gone")
            if told and not stopping:  # the workers stop at a common step and checkpoint it
                stopping = True
                group.signal(signal.SIGTERM)
            time.sleep(0.01)
    except SignalException:  # (between a start and our handlers: torch's own)
        raise KeyboardInterrupt from None
    finally:
        signal.signal(signal.SIGUSR1, usr1)
        for sig, handler in before.items():
            signal.signal(sig, handler)
        group.close()
        _write_history(Path(config_path).parent, coordinator, pids)
    if stopping:
        preempted = preempted_since(config_path, start)
        if preempted is None:
            raise KeyboardInterrupt
        raise JobPreempted(preempted)


def _pids(group: RoleGroup) -> dict[str, int]:
    """The process of each running worker, by uid."""
    return {
        r.env[p.UID_ENV]: pid
        for i, r in enumerate(group.roles)
        if i not in group.exit_codes
        for pid in group.contexts[i].pids().values()
    }


def _stop_on_a_mistake(group: RoleGroup, code: int) -> None:
    """A mistake in the job (exit status 2, its line printed) or an exception that a
    replacement would raise again: the job stops. An exception is shown once, with the
    user's frames; it is not retried if it came before the worker finished a step, or
    if another worker raised the same one in the same step (the same batch: in place,
    a replacement takes the lost worker's slice and would meet it again)."""
    if code == 2:
        raise LaunchFailed("a worker stopped on a mistake in the job")
    if code != failure.EXIT_RAISED:
        return
    first, why = group.raised.take()
    if first is None:
        return  # (read with another worker's: judged then)
    again = [f for f in group.raised.seen if f is not first and f.signature == first.signature]
    if not why and again:
        why = "the same exception in the same step on another worker"
    if why:
        raise LaunchFailed(f"{first.headline()}; not retried: {why}")


def _said(gen: p.Generation) -> None:
    if gen.number == 0:
        return
    n = len(gen.members)
    who, verb = (f"{n} workers", "go on") if n != 1 else ("1 worker", "goes on")
    lost = f" without {', '.join(gen.lost)}" if gen.lost else ""
    new = [u for u in gen.needs_state if u not in gen.lost]
    gets = "gets" if len(new) == 1 else "get"
    given = f"; {', '.join(new)} {gets} the state from {gen.source}" if new else ""
    if gen.step < 0:
        _say(f"generation {gen.number}: {who} resume from the newest checkpoint{lost}")
    else:
        _say(f"generation {gen.number}: {who} {verb} from step {gen.step}{lost}{given}")


def _say(line: str) -> None:
    print(f"shoal: {line}", file=sys.stderr, flush=True)


def _write_history(run_dir: Path, coordinator: Coordinator, pids: list[dict]) -> None:
    """The generations, with each member's process id and when each was formed
    (``generations.jsonl``)."""
    lines = []
    for gen, formed in zip(coordinator.history, pids):
        record = json.loads(gen.to_json())
        record["pids"] = {u: formed["pids"].get(u) for u in gen.members}
        record["formed_at"] = formed["at"]
        lines.append(json.dumps(record))
    (run_dir / GENERATIONS_FILE).write_text("".join(f"{line}\n" for line in lines))
