"""Preemption: a scheduler's SIGTERM (Kubernetes, Spark, Ray) or SIGUSR1 (Slurm's
``--signal``), or the user's Ctrl-C (SIGINT), stops every rank after the same step,
with a checkpoint of it. A second Ctrl-C stops at once.

A signal only sets a flag. The ranks agree on it with one small all-reduce
(MAX of the flag, MIN of the time it came), started after one step and read
at the next agreement, so it runs while training computes; a rank that was told
and one that was not stop at the same step boundary. Agreements come about every
:data:`AGREE_EVERY_S` seconds of training, not every step (a collective per step
costs a visible part of a short one): each carries every rank's proposal of
how many steps to the next, and all take the smallest, so they all agree at the
same steps. They write that step's
checkpoint, rank 0 adds a line to ``RUN_DIR/preempted.jsonl`` (the step, the
signal, the seconds from the signal to the checkpoint written, and whether that
was within ``--grace-period``), and each exits with :data:`EXIT_PREEMPTED`.
``shoal train --resume RUN_DIR`` continues from that checkpoint, and the summary
of the run that finishes lists every preemption.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

EXIT_PREEMPTED = 143
"""Exit status of a preempted job (128 + SIGTERM, what a process ended by the
scheduler's SIGTERM reports): a checkpoint of the last step was written."""
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
RANK = {signal.SIGTERM: 0, signal.SIGINT: 1, signal.SIGUSR1: 2}
"""Which signal names a stop when several came: Slurm's SIGUSR1 (shoal's launcher turns
it into a SIGTERM to the workers), then Ctrl-C (the launcher's SIGTERM follows it)."""
EXIT_INTERRUPTED = 130
"""Exit status of a job stopped by Ctrl-C (128 + SIGINT), its checkpoint written."""
PREEMPTED_FILE = "preempted.jsonl"
AGREE_EVERY_S = 0.2
"""About how often the ranks agree on a signal: a stop comes at most about twice this
after the signal, plus a step."""
MAX_STEPS_APART = 64
"""The most steps between two agreements, however short a step."""


class Preempted(Exception):
    """Every rank stopped after ``step`` and saved it: the job is to exit."""

    def __init__(self, step: int, record: dict[str, Any]) -> None:
        super().__init__(f"preempted after step {step}")
        self.step, self.record = step, record


class Preemption:
    """The signal handlers and the agreement (a collective: every rank calls :meth:`poll`
    after every step, and agrees at the same steps)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.received = float("inf")
        self.work: Any = None  # the agreement under way (its tensor: flags)
        self.flags = torch.zeros(5, dtype=torch.float64)
        self.regrouped()  # (also sets when the first agreement comes)
        # (an engine that runs the training in a thread of its own, as Ray Train does,
        # keeps the signals: it restarts the workers, and they resume from a checkpoint)
        main = threading.current_thread() is threading.main_thread()
        self.previous = {s: signal.signal(s, self._on) for s in SIGNALS} if main else {}

    def _on(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            self.restore()  # a second Ctrl-C: at once
            raise KeyboardInterrupt
        if self.signum is None:
            self.received = time.time()
        if self.signum is None or RANK[signum] > RANK[self.signum]:
            self.signum = signum

    def regrouped(self) -> None:
        """The group changed (or is new): forget the agreement under way (an all-reduce
        of the group that ended) and agree at the next step that may stop, as every
        member of the new group does."""
        self.work, self.steps_apart, self.steps = None, 1, 0
        self.since = time.perf_counter()

    def poll(self, may_stop: bool) -> tuple[str, float] | None:
        """Call after every step on every rank; ``may_stop``: a checkpoint here holds one
        model. Returns ``(signal name, earliest time any rank got it)`` when the ranks
        agree to stop here. The agreement is an all-reduce (flag MAX, earliest time,
        SIGUSR1 seen, steps to the next one MIN) started at one such step and read at
        the next agreement, so it runs while training computes and never holds it up."""
        self.steps += 1  # since the last agreement
        if not may_stop or self.steps < self.steps_apart:
            return None
        told = None
        if self.work is not None:
            self.work.wait()
            flags, self.work = self.flags, None
            told = _told(flags)
            self.steps_apart = int(-flags[4])  # the same on every rank
        if told is None:
            now = time.perf_counter()
            per_step = (now - self.since) / self.steps
            self.since, self.steps = now, 0
            propose = min(MAX_STEPS_APART, max(1, int(AGREE_EVERY_S / max(per_step, 1e-6))))
            self.flags = self._mine(propose)
            if _grouped():
                self.work = dist.all_reduce(self.flags, op=dist.ReduceOp.MAX, async_op=True)
            else:
                self.work = _Done()
        return told

    def settle(self) -> tuple[str, float] | None:
        """Call on every rank once training is over and the final checkpoint and summary
        are written (the handlers stay until then, so a signal meanwhile is obeyed after
        them rather than killing the process half-way): ``(signal name, earliest time)``
        when any rank got a signal, found by one all-reduce."""
        if self.work is not None:  # (the agreement started after the last step)
            self.work.wait()
            self.work = None
        flags = self._mine()
        if _grouped():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return _told(flags)

    def _mine(self, steps_apart: int = 1) -> torch.Tensor:
        """This rank's part of an agreement: told, -(when), SIGUSR1, SIGINT, and
        -(steps to the next agreement) it proposes."""
        mine = self.signum is not None
        return torch.tensor(
            [float(mine), -self.received if mine else -float("inf"),
             float(self.signum == signal.SIGUSR1), float(self.signum == signal.SIGINT),
             -float(steps_apart)],
            dtype=torch.float64,
        )  # fmt: skip

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def failed(self) -> None:
        """Training failed (a peer died, say): put the handlers back, and obey at once a
        SIGTERM already here (the launcher stopping this worker to restart the job)."""
        self.restore()
        if self.signum == signal.SIGTERM and self.previous:
            signal.raise_signal(signal.SIGTERM)


def _grouped() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def _told(flags: torch.Tensor) -> tuple[str, float] | None:
    """What an agreement's result says: the signal and its earliest time, if any."""
    if flags[0] > 0:
        name = "SIGUSR1" if flags[2] else "SIGINT" if flags[3] else "SIGTERM"
        return name, -float(flags[1])
    return None


class _Done:
    """A finished agreement (one process: nothing to wait for)."""

    def wait(self) -> bool:
        return True


def record(run_dir: Path, step: int, signame: str, received: float, grace_s: float) -> dict:
    """Rank 0: note a preemption in ``RUN_DIR/preempted.jsonl``; return the record."""
    took = time.time() - received
    entry = {"step": step, "signal": signame, "checkpoint_s": round(took, 3),
             "within_grace": took <= grace_s, "at": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
    with (run_dir / PREEMPTED_FILE).open("a") as f:
        f.write(json.dumps(entry) + "\n")
    return entry


def history(run_dir: Path) -> list[dict[str, Any]]:
    """Every preemption of the run so far."""
    path = run_dir / PREEMPTED_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out
