"""Waits that used to go unnamed in a parameter-server job, provoked directly (one
process, no training): each test plays the moment a chaos run stalled on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shoal import procs
from shoal.config import JobConfig
from shoal.strategies import resolve
from shoal.strategies.ps.coordinator import Coordinator
from shoal.strategies.ps.membership import Membership
from shoal.strategies.ps.recovery import ShardTable
from shoal.telemetry import Window


def _job(tmp_path, heartbeat: float = 0.2) -> JobConfig:
    job = JobConfig()
    job.output.out = str(tmp_path)
    job.output.progress = False
    job.strategy.name = "ps"
    job.strategy.heartbeat_timeout = heartbeat
    resolve(job)  # [strategy.ps] at its defaults: bsp
    return job


@pytest.mark.timeout(30)
def test_a_worker_that_failed_then_rejoined_is_watched_again(tmp_path, capsys):
    """A worker that failed (not killed) used to say goodbye on its way out, as if the job
    were done; its restarted process rejoined, but the coordinator no longer watched its
    heartbeat, so a later SIGSTOP of it was never named and the job waited until other
    faults broke the wait (95 s in a chaos run)."""
    lost = []
    members = Membership(_job(tmp_path), ShardTable(), lambda k: False, lambda *a: lost.append(a))
    members.worker_seen(1, starting=True)
    members.left.add(1)  # what a failing worker said before it exited (code 1)
    members.worker_died(1, 1)
    members.worker_seen(1, starting=True)  # its restart asks for the shards: it rejoined
    time.sleep(0.3)  # then it is stopped: no heartbeat for longer than 0.2 s
    members.check()
    assert 1 in members.dropped
    assert "worker 1 sent no heartbeat" in capsys.readouterr().err
    assert lost == [(1, 1), (1, -1000)]


def _coordinator(tmp_path, heartbeat: float = 3.0) -> Coordinator:
    coordinator = Coordinator(_job(tmp_path, heartbeat), b"k" * 32, "tcp://127.0.0.1:0", 1, 5, 5)
    coordinator.dispatch(b"n", {"op": "node", "node_rank": 0, "workers": 2, "servers": 0}, [])
    coordinator.queue.hold_at = None  # (no checkpoint in the way)
    for worker in (0, 1):
        coordinator.members.worker_seen(worker, starting=True)
    return coordinator


def _take(coordinator: Coordinator, worker: int, done=()) -> list:
    header = {"op": "task", "worker": worker, "take": 1, "wait": False}
    header["done"] = [{"task": list(t), "lr": 0.1} for t in done]
    rows = [Window(samples=1).to_tensor() for _ in done]
    return coordinator.dispatch(b"w", header, rows)["tasks"]


@pytest.mark.timeout(30)
def test_a_job_without_progress_says_what_it_waits_for(tmp_path, capsys):
    coordinator = _coordinator(tmp_path)
    try:
        assert _take(coordinator, 0) == [[0, 0]]
        assert _take(coordinator, 1) == [[0, 1]]
        assert _take(coordinator, 1, done=[(0, 1)]) == []  # bsp: step 1 waits for step 0
        coordinator._watch_progress()
        assert capsys.readouterr().err == ""  # nothing to say yet
        coordinator.stall.last -= coordinator.stall.bound + 1
        coordinator._watch_progress()
        err = capsys.readouterr().err
        assert "shoal: warning: no step finished for 1" in err
        assert "step 0 waits: worker 0 holds part 0 (last heartbeat" in err
        coordinator._watch_progress()
        assert capsys.readouterr().err == ""  # said once per bound, not every loop
    finally:
        coordinator.listener.close()


@pytest.mark.timeout(30)
def test_a_worker_that_holds_a_task_far_too_long_while_beating_is_dropped(tmp_path, capsys):
    """Alive (its heartbeat thread beats) but stuck in its work: the task goes to another."""
    coordinator = _coordinator(tmp_path)
    try:
        assert _take(coordinator, 0) == [[0, 0]]
        coordinator.queue.since[(0, 0)] -= 3 * coordinator.stall.bound + 1
        coordinator._watch_progress()
        err = capsys.readouterr().err
        assert "worker 0 has held step/part 0/0 for" in err and "hung in its work" in err
        assert 0 in coordinator.members.dropped  # its launcher kills it, then restarts it
        assert "worker 0's tasks (step/part) 0/0 handed out again" in err
        assert _take(coordinator, 1) == [[0, 0]]
    finally:
        coordinator.listener.close()


_LAUNCHER = """
import os, sys, time
from shoal import procs
child = os.fork()
if child == 0:
    procs.name_self("worker", 3)
    time.sleep(60)
    os._exit(0)
print(child, flush=True)
time.sleep(60)
"""


@pytest.mark.timeout(60)
def test_forked_workers_are_found_by_the_name_they_give_themselves():
    """A forked worker's /proc environ is its launcher's exec-time block (no SHOAL_ROLE):
    the chaos bench looked for that and found no allreduce worker to kill or stop."""
    launcher = subprocess.Popen(
        [sys.executable, "-c", _LAUNCHER], stdout=subprocess.PIPE, text=True
    )
    try:
        child = int(launcher.stdout.readline())
        deadline = time.monotonic() + 10
        while procs.role_processes(launcher.pid, "worker") != [child]:
            assert time.monotonic() < deadline, procs.role_processes(launcher.pid, "worker")
            time.sleep(0.05)
        assert b"SHOAL_ROLE" not in Path(f"/proc/{child}/environ").read_bytes()
        assert procs.role_processes(launcher.pid, "server") == []
        assert procs.role_processes(os.getpid() + 10**7, "worker") == []  # another launcher
        os.kill(child, signal.SIGSTOP)
        while procs.state(child) != "stopped":
            time.sleep(0.01)
        assert procs.role_processes(launcher.pid, "worker") == []  # (stopped: not running)
        assert procs.role_processes(launcher.pid, "worker", running=False) == [child]
        os.kill(child, signal.SIGKILL)
    finally:
        launcher.kill()
        launcher.wait()
