"""The heartbeat's verdict on the job's store: a starved beat thread is not a lost store,
a store that stops answering is (a real TCPStore in another process, SIGSTOPped)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from shoal.health import Heartbeat

SERVE = """
import sys, time
from datetime import timedelta
import torch.distributed as dist
store = dist.TCPStore("127.0.0.1", int(sys.argv[1]), is_master=True,
                      timeout=timedelta(seconds=30), use_libuv=False)
print("up", flush=True)
time.sleep(120)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def store_process():
    """A TCPStore served by a child process, and that process."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVE, str(port)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"up"
        client = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=0.5))
        yield client, proc
    finally:
        proc.kill()
        proc.wait()


def _watch(store, timeout_s: float) -> tuple[Heartbeat, list[str]]:
    said: list[str] = []
    return Heartbeat(0, 1, timeout_s, store=store, on_failure=said.append), said


@pytest.mark.timeout(60)
def test_a_beat_thread_that_was_starved_is_not_a_lost_store(store_process):
    """The last contact looks old (as after seconds without the CPU or the GIL), but the
    store answers when asked: no verdict, and the contact is fresh again."""
    store, _ = store_process
    beat, said = _watch(store, timeout_s=1.2)
    try:
        beat.contact = time.monotonic() - 60
        time.sleep(3 * beat.interval_s)
        assert said == []
        assert time.monotonic() - beat.contact < 1.2
    finally:
        beat.stop()


@pytest.mark.timeout(60)
def test_a_store_that_stops_answering_is_named_within_the_timeout(store_process):
    store, proc = store_process
    beat, said = _watch(store, timeout_s=1.2)
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 1.2 + 4.0  # the timeout, the probe's, beats
        while not said and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(said) == 1 and "lost contact with the job's store" in said[0], said
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        beat._stop.set()
