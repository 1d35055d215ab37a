"""A job on one machine listens on loopback only: nothing of it is reachable from the
network (torchrun's store, the process group's store, gloo, the parameter server)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import LINEAR_JOB, start_train

pytestmark = pytest.mark.slow  # trains through the launcher: not in the quick tier


def _tree(pid: int) -> set[int]:
    """``pid`` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        found.add(p)
        todo += children.get(p, [])
    return found


def _listening(pids: set[int]) -> list[str]:
    """The local addresses of the TCP sockets these processes listen on."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = str(fd.readlink()) if fd.is_symlink() else ""
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # LISTEN
                addr, port = cols[1].split(":")
                if len(addr) == 8:
                    ip = ".".join(str(int(addr[i : i + 2], 16)) for i in (6, 4, 2, 0))
                else:
                    ip = "::1" if addr == "0" * 24 + "01000000" else f"[{addr}]"
                found.append(f"{ip}:{int(port, 16)}")
    return found


@pytest.mark.timeout(120)
@pytest.mark.parametrize("strategy", [["--strategy", "allreduce"], ["--strategy", "ps"]])
def test_a_one_machine_job_listens_on_loopback_only(tmp_path, strategy):
    out = tmp_path / "run"
    slow = {"SHOAL_FAULT": "slow:rank=*:ms=40"}
    job = start_train(out, *LINEAR_JOB, "--workers", "2", *strategy, env=slow)
    try:
        deadline = time.monotonic() + 90
        metrics = out / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            assert time.monotonic() < deadline and job.poll() is None, job.stderr.read()
            time.sleep(0.2)
        listening = _listening(_tree(job.pid))
        assert listening, "the job listens somewhere: this test must see it"
        assert all(a.startswith(("127.", "::1")) for a in listening), listening
    finally:
        job.kill()
        job.wait(timeout=30)
