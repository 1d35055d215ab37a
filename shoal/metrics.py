"""Counters, phase timers, the metrics file and the live progress display."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Protocol

import torch

PHASES = ("wait", "data", "forward_backward", "comm", "optimizer")
"""Per-phase times recorded each step. ``wait`` is time spent waiting for work
(a parameter-server task from the coordinator's queue; next to nothing
elsewhere). ``comm`` is the time collectives were in flight; with overlap it
runs *inside* ``forward_backward``, so the phases do not add up to the step time."""


class Gatherer(Protocol):
    """Collects one telemetry row per worker at the writer (rank 0, or a coordinator)."""

    is_writer: bool

    def gather(
        self, row: torch.Tensor, tag: str, meta: dict[str, Any] | None = None
    ) -> torch.Tensor | None:
        """Return the stacked rows on the writer, ``None`` on every other worker.

        ``tag`` says what the row is (``window``, ``counts``, ``rng``); ``meta``
        describes a window (step, epoch, lr, steps, global_samples).
        """
        ...

    def gather_object(self, obj: dict[str, Any], tag: str) -> list[dict[str, Any]] | None:
        """Every worker's ``obj`` (plain JSON types) on the writer, ``None`` elsewhere;
        ``tag`` says what it is (``totals``)."""
        ...


class CommCounter:
    """Bytes this process put on and took off the wire."""

    def __init__(self) -> None:
        self.sent = 0
        self.received = 0

    def add(self, sent: int = 0, received: int = 0) -> None:
        self.sent += sent
        self.received += received


class PhaseTimer:
    """Accumulates wall time per phase; :meth:`take` returns and resets it.

    On CUDA the device is synchronised at phase boundaries so that times are
    real rather than kernel-launch times.
    """

    def __init__(self, device: torch.device | None = None) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self._sync = device is not None and device.type == "cuda"

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self._sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self._sync:
                torch.cuda.synchronize()
            self.totals[name] += time.perf_counter() - start

    def add(self, name: str, seconds: float) -> None:
        self.totals[name] += seconds

    def take(self) -> dict[str, float]:
        out = {p: self.totals.get(p, 0.0) for p in PHASES}
        self.totals.clear()
        return out


class MetricsFile:
    """Appends one JSON object per line to ``metrics.jsonl`` (rank 0 only).

    On resume the records after the checkpoint's step are dropped first, so the
    file reads as one uninterrupted run; a torn or corrupt tail (a line cut by a
    crash, a block of NUL bytes) is cut off with a warning, and the file is
    rewritten atomically. A record that cannot be written (a full disk) is
    dropped with one warning, its partial line removed; training goes on.
    """

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        from shoal.layout import write_atomic

        self.path = path
        self.dropped = 0
        if resume_step is not None and path.exists():
            records, torn = _parse(path.read_bytes())
            if torn:
                print(
                    f"shoal: warning: {path}: cut off a torn or corrupt tail of {torn} bytes "
                    "(the run was interrupted while writing it)",
                    file=sys.stderr,
                )
            kept = [line for line, record in records if record.get("step", 0) <= resume_step]
            write_atomic(path, b"".join(line + b"\n" for line in kept))
        # unbuffered: a record the disk refuses must not linger in a buffer and come out,
        # in part, in front of a later one
        self._fh: IO[bytes] = path.open("ab", buffering=0)

    def write(self, record: dict[str, Any]) -> None:
        data = json.dumps(record).encode() + b"\n"
        fd = self._fh.fileno()
        good = os.fstat(fd).st_size
        try:
            done = 0
            while done < len(data):
                done += os.write(fd, data[done:])
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, good)  # no torn line under later records
            if not self.dropped:
                print(
                    f"shoal: warning: cannot write {self.path} ({e.strerror}); metric records "
                    "are dropped until it can",
                    file=sys.stderr,
                )
            self.dropped += 1

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._fh.close()


def _parse(raw: bytes) -> tuple[list[tuple[bytes, dict[str, Any]]], int]:
    """The records of a metrics file up to its first bad line; and how many bytes follow."""
    records: list[tuple[bytes, dict[str, Any]]] = []
    at = 0
    for line in raw.split(b"\n"):
        end = at + len(line) + 1
        if not line.strip():
            at = end
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            record = None
        step = record.get("step", 0) if isinstance(record, dict) else None
        if not isinstance(step, int) or end > len(raw):  # corrupt, or no newline: torn
            return records, len(raw) - at
        records.append((line, record))
        at = end
    return records, 0


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (up to a torn or corrupt tail, if any)."""
    return [record for _, record in _parse(path.read_bytes())[0]]


class Progress:
    """Live progress on rank 0: a rich bar on a terminal, plain lines otherwise."""

    def __init__(self, total_steps: int, start_step: int, enabled: bool, title: str) -> None:
        self.total = total_steps
        self.enabled = enabled
        self._bar = None
        self._last_line = time.monotonic()
        if not enabled:
            return
        from rich.console import Console

        console = Console(stderr=True)
        if console.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("{task.fields[rate]} samples/s"),
                TextColumn("{task.fields[note]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=console,
            )
            self._task = self._bar.add_task(
                title, total=total_steps, completed=start_step, loss="-", rate="-", note=""
            )
            self._bar.start()
        else:
            print(f"{title}: {total_steps - start_step} steps to run", file=sys.stderr, flush=True)

    def update(self, step: int, loss: float | None, rate: float | None, note: str = "") -> None:
        """Step ``step`` is done; with a record, its loss, samples per second and
        ``note`` (the strategy's own figures, such as ``epsilon 1.2``)."""
        if not self.enabled:
            return
        if self._bar is not None:
            fields = {}
            if loss is not None:
                fields = {"loss": f"{loss:.4g}", "rate": f"{rate:,.0f}", "note": note}
            self._bar.update(self._task, completed=step, **fields)
        elif loss is not None and (time.monotonic() - self._last_line > 5 or step == self.total):
            self._last_line = time.monotonic()
            print(
                f"step {step}/{self.total}  loss {loss:.4g}  {rate:,.0f} samples/s"
                + (f"  {note}" if note else ""),
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
