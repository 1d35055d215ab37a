"""The coordinator's telemetry: finished tasks' reports, summed per step and worker,
handed to the run writer as log windows once every step of a window has finished.

Workers report each task's :class:`~shoal.telemetry.Window` with their request
for the next task. A task handed out twice (its first worker dropped, say) is
counted once: the task queue says which report is the first.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from shoal.telemetry import Window
from shoal.writer import RunWriter


class StepTelemetry:
    """Task reports -> per-step, per-worker sums -> ``metrics.jsonl`` windows."""

    def __init__(
        self,
        writer: RunWriter,
        wall_time: Callable[[], float],
        log_every: int,
        total_steps: int,
        steps_per_epoch: int,
    ) -> None:
        self.writer, self.wall_time = writer, wall_time
        self.log_every, self.total_steps = log_every, total_steps
        self.steps_per_epoch = steps_per_epoch
        self.steps: dict[int, dict[int, Window]] = {}  # unfinished steps: worker -> sum
        self.lr: dict[int, float] = {}
        self.window: dict[int, Window] = {}  # finished steps since the last record
        self.logged_through = 0  # steps covered by records so far
        self.bytes: dict[int, tuple[float, float]] = {}  # each worker's latest counters
        self.time: dict[int, dict[str, float]] = {}  # each worker's phase totals
        self.last_record = time.perf_counter()

    def seen(self, worker: int, window: Window) -> None:
        """Any report of ``worker``, counted or not: its byte counters are cumulative."""
        self.bytes[worker] = (window.bytes_sent, window.bytes_received)

    def task_done(self, worker: int, step: int, lr: float, window: Window) -> None:
        """A task's first report: its loss, samples and phase times count."""
        per_worker = self.steps.setdefault(step, {})
        if worker in per_worker:
            per_worker[worker].add(window)
        else:
            per_worker[worker] = window
        self.lr[step] = lr
        totals = self.time.setdefault(worker, {})
        for k, v in window.phases.items():
            totals[k] = totals.get(k, 0.0) + v

    def flush(self, finished_through: int, parts: int) -> None:
        """A record for each log window whose steps have all finished."""
        while self.logged_through <= finished_through:
            step = self.logged_through
            for worker, w in self.steps.pop(step, {}).items():
                if worker in self.window:
                    self.window[worker].add(w)
                else:
                    self.window[worker] = w
            lr = self.lr.pop(step, 0.0)
            self.logged_through += 1
            end = self.logged_through
            if end % self.log_every and end != self.total_steps:
                continue
            for worker, w in self.window.items():  # bytes: the latest of every worker
                w.bytes_sent, w.bytes_received = self.bytes.get(worker, (0.0, 0.0))
            now = time.perf_counter()
            self.writer.window(
                self.window,
                step=end,
                epoch=end / self.steps_per_epoch,
                lr=lr,
                steps=(end - 1) % self.log_every + 1,
                global_samples=int(sum(w.samples for w in self.window.values())),
                elapsed=now - self.last_record,
                wall_time=self.wall_time(),
                shares=parts,
            )
            self.window = {}
            self.last_record = now

    def snapshot(self) -> dict[str, Any]:
        """The open window, in plain types (it is saved with a checkpoint's bookkeeping)."""
        return {
            "window": {str(w): asdict(v) for w, v in self.window.items()},
            "last_loss": self.writer.last_loss,
        }

    def rollback(self, saved: dict[str, Any], step: int) -> None:
        """Back to a checkpoint's bookkeeping at ``step``: records after it are void."""
        window = saved.get("window")
        self.window = (
            {int(w): Window(**v) for w, v in window.items()} if isinstance(window, dict) else {}
        )
        self.writer.last_loss = float(saved.get("last_loss", float("nan")))
        self.steps, self.lr = {}, {}
        self.logged_through = step
        self.last_record = time.perf_counter()
        self.writer.rewind(step)
