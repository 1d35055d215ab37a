"""One ``shoal train`` run by a benchmark: in its own session, its stderr lines
timestamped as they arrive (and logged), its processes found by role."""

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

from shoal.errors import UserError
from shoal.launch import LAUNCHER_ENV
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
                self.lines.append((time.monotonic(), line.rstrip()))
                log.write(line)
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
        that this run's launcher started."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                environ = (entry / "environ").read_bytes().split(b"\0")
            except (OSError, IndexError):
                continue
            if f"{LAUNCHER_ENV}={self.proc.pid}".encode() not in environ or state in "ZTt":
                continue
            roles = [e for e in environ if e.startswith(b"SHOAL_ROLE=")] or [b"SHOAL_ROLE=worker"]
            if roles[0] == f"SHOAL_ROLE={role}".encode():  # (torchrun's workers carry none)
                found.append(int(entry.name))
        return found

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
