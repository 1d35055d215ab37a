"""One ``shoal train`` run by a benchmark: in its own session, its stderr lines
timestamped as they arrive (and logged with the seconds since the start), its
processes found by role, its progress watched for stalls."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from shoal import procs
from shoal.errors import UserError
from shoal.layout import METRICS_FILE, SUMMARY_FILE


class BenchRun:
    """``shoal train --out OUT ARGS``, started at once; :meth:`wait` for it."""

    def __init__(
        self,
        out: Path,
        args: list[str],
        timeout: float,
        env: dict[str, str] | None = None,
        logs: Path | None = None,
        prefix: tuple[str, ...] | list[str] = (),
    ) -> None:
        self.out, self.timeout, self.name = out, timeout, out.name
        self.log = (logs or out.parent) / f"{out.name}.log"
        self.lines: list[tuple[float, str]] = []
        self.start = time.monotonic()
        cmd = [*prefix, sys.executable, "-m", "shoal", "train", "--out", str(out), *args]
        self.proc = subprocess.Popen(
            cmd,
            env={**os.environ, **(env or {})},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.code: int | None = None
        self.wall = float("nan")

    def _read(self) -> None:
        with self.log.open("w") as log:
            for line in self.proc.stderr:  # type: ignore[union-attr]
                now = time.monotonic()
                self.lines.append((now, line.rstrip()))
                log.write(f"[{now - self.start:7.1f}] {line}")
                log.flush()

    def wait(self) -> None:
        try:
            self.code = self.proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.code = self.proc.wait()
        self.wall = time.monotonic() - self.start
        self.reader.join(timeout=10)

    def check(self) -> None:
        """Raise :class:`UserError` unless the run finished and wrote its summary."""
        if self.code != 0 or not (self.out / SUMMARY_FILE).exists():
            raise UserError(f"the {self.name} run failed (exit {self.code}); see {self.log}")

    def summary(self) -> dict[str, Any]:
        return json.loads((self.out / SUMMARY_FILE).read_text())

    def pids(self, role: str = "worker") -> list[int]:
        """Live, running (not stopped) processes of ``role`` (``worker``, ``server``)
        below this run's launcher, as they name themselves (:mod:`shoal.procs`)."""
        return procs.role_processes(self.proc.pid, role)

    def progress(self) -> tuple[int, int]:
        """The metrics file's (size, mtime): it changes with every record written."""
        try:
            st = (self.out / METRICS_FILE).stat()
        except OSError:
            return (0, 0)
        return (st.st_size, st.st_mtime_ns)

    def line_after(self, t: float, needles: tuple[str, ...]) -> float | None:
        """When the first line with any of ``needles`` came, at ``t`` or later."""
        for when, line in list(self.lines):
            if when >= t and any(n in line for n in needles):
                return when
        return None

    def lines_between(self, t0: float, t1: float) -> list[tuple[float, str]]:
        """The lines that came from ``t0`` to ``t1``."""
        return [(when, line) for when, line in list(self.lines) if t0 <= when <= t1]


class Stalls(threading.Thread):
    """Watches a run's metrics file from its first record to its last training step:
    every interval without a new record, and the lines that came within it."""

    def __init__(self, run: BenchRun, total_steps: int, interval: float = 0.1) -> None:
        super().__init__(name="bench-stalls", daemon=True)
        self.job, self.total_steps, self.interval = run, total_steps, interval
        self.gaps: list[tuple[float, float]] = []  # (start, end) of each interval
        self.stopped = threading.Event()
        self.start()

    def run(self) -> None:
        seen, since = self.job.progress(), None
        while not self.stopped.wait(self.interval) and self.job.proc.poll() is None:
            now, got = time.monotonic(), self.job.progress()
            if got != seen:
                if since is not None:
                    self.gaps.append((since, now))
                seen, since = got, now
                if self._last_step() >= self.total_steps:
                    return  # trained: what follows (evaluation, summary) is not a stall
        if since is not None and self.job.proc.poll() not in (0, None):
            self.gaps.append((since, time.monotonic()))  # it ended in a stall

    def _last_step(self) -> int:
        try:
            with (self.job.out / METRICS_FILE).open("rb") as fh:
                fh.seek(max(0, fh.seek(0, 2) - 4096))
                tail = fh.read().splitlines()
            return int(json.loads(tail[-1]).get("step", 0))
        except (OSError, ValueError, IndexError):
            return 0

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=10)

    def longest(self, bound: float) -> dict[str, Any]:
        """The longest interval without progress, and the first line within ``bound`` of
        its start that came during it (what named the wait), if any."""
        if not self.gaps:
            return {"seconds": 0.0, "line": ""}
        t0, t1 = max(self.gaps, key=lambda g: g[1] - g[0])
        named = self.job.lines_between(t0, min(t1, t0 + bound))
        return {
            "seconds": round(t1 - t0, 2),
            "at": round(t0 - self.job.start, 1),
            "line": named[0][1] if named else "",
        }

    def unexplained(self, bound: float) -> list[tuple[float, float]]:
        """Intervals longer than ``bound`` without a line in their first ``bound``
        seconds: waits nobody named."""
        return [
            (t0 - self.job.start, t1 - t0)
            for t0, t1 in self.gaps
            if t1 - t0 > bound and not self.job.lines_between(t0, t0 + bound)
        ]
