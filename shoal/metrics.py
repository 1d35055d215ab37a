"""Counters, phase timers, the metrics file and the live progress display."""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch

PHASES = ("data", "forward_backward", "comm", "optimizer")
"""Per-phase times recorded each step. ``comm`` is the time collectives were in
flight; with overlap it runs *inside* ``forward_backward``, so the phases do not
add up to the step time."""


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
    file reads as one uninterrupted run.
    """

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        self.path = path
        if resume_step is not None and path.exists():
            kept = [
                line
                for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            path.write_text("".join(line + "\n" for line in kept))
        self._fh: IO[str] = path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` file."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=console,
            )
            self._task = self._bar.add_task(
                title, total=total_steps, completed=start_step, loss="-", rate="-"
            )
            self._bar.start()
        else:
            print(f"{title}: {total_steps - start_step} steps to run", file=sys.stderr, flush=True)

    def update(self, step: int, loss: float | None, rate: float | None) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            fields = {}
            if loss is not None:
                fields = {"loss": f"{loss:.4g}", "rate": f"{rate:,.0f}"}
            self._bar.update(self._task, completed=step, **fields)
        elif loss is not None and (time.monotonic() - self._last_line > 5 or step == self.total):
            self._last_line = time.monotonic()
            print(
                f"step {step}/{self.total}  loss {loss:.4g}  {rate:,.0f} samples/s",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
