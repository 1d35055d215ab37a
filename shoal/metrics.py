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

from shoal.memory import MEMORY_FIELDS

PHASES = ("wait", "data", "forward_backward", "comm", "optimizer")
"""Per-phase times recorded each step. ``wait`` is time spent waiting for work
(a parameter-server task from the coordinator's queue; next to nothing
elsewhere). ``comm`` is the time collectives were in flight; with overlap it
runs *inside* ``forward_backward``, so the phases do not add up to the step time."""


SUMMARY_FILE = "summary.json"
MODEL_FILE = "model.safetensors"
HOST_BYTES = 64


class Gatherer(Protocol):
    """Collects one telemetry row per worker at the writer (rank 0, or a coordinator)."""

    is_writer: bool

    def gather(
        self, row: torch.Tensor, tag: str, meta: dict[str, Any] | None = None
    ) -> torch.Tensor | None:
        """Return the stacked rows on the writer, ``None`` on every other worker.

        ``tag`` says what the row is (``window``, ``counts``, ``totals``, ``rng``);
        ``meta`` describes a window (step, epoch, lr, steps, global_samples).
        """
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
        from shoal.config import write_atomic

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


# --- records shared by every writer (rank 0 of a collective, or a coordinator) ---------


WINDOW_FIELDS = 4 + len(PHASES)
"""Columns of a window row before the optional memory figures: loss sum, samples,
bytes sent and received, then one time per phase."""


def totals_row(
    sent: float, received: float, memory: dict[str, int], own: list[float], host: str
) -> torch.Tensor:
    """One worker's totals at the end of a run, as gathered to the writer."""
    values = [sent, received, *(memory.get(k, 0) for k in MEMORY_FIELDS), *own]
    return torch.cat([torch.tensor(values, dtype=torch.float64), host_code(host)])


def read_totals(rows: torch.Tensor, own: int = 0) -> dict[str, Any]:
    """The columns of gathered :func:`totals_row` rows (one per worker)."""
    end = 2 + len(MEMORY_FIELDS)
    return {
        "sent": rows[:, 0],
        "received": rows[:, 1],
        "memory": rows[:, 2:end],
        "own": rows[:, end : end + own],
        "hosts": [host_name(r) for r in rows[:, end + own :]],
    }


def window_row(
    loss_sum: float,
    count: int,
    sent: int,
    received: int,
    phases: dict[str, float],
    memory: dict[str, int] | None = None,
) -> torch.Tensor:
    """One worker's statistics for a log window, as gathered to the writer (``memory``:
    :data:`~shoal.memory.MEMORY_FIELDS` in bytes, where the worker measures it)."""
    values = [loss_sum, count, sent, received] + [phases[p] for p in PHASES]
    if memory is not None:
        values += [memory[k] for k in MEMORY_FIELDS]
    return torch.tensor(values, dtype=torch.float64)


def window_record(
    rows: torch.Tensor,
    *,
    step: int,
    epoch: float,
    lr: float,
    steps: int,
    global_samples: int,
    elapsed: float,
    wall_time: float,
) -> dict[str, Any]:
    """A ``metrics.jsonl`` record from every worker's :func:`window_row`."""
    rows = rows.double().cpu()
    record: dict[str, Any] = {
        "step": step,
        "epoch": epoch,
        "loss": float(rows[:, 0].sum() / rows[:, 1].sum().clamp(min=1)),
        "lr": lr,
        "samples_per_s": global_samples / elapsed if elapsed > 0 else 0.0,
        "step_time_s": elapsed / max(1, steps),
        "bytes_sent": int(rows[:, 2].sum()),
        "bytes_received": int(rows[:, 3].sum()),
        "wall_time": wall_time,
    }
    for i, p in enumerate(PHASES):
        record[f"t_{p}"] = float(rows[:, 4 + i].mean()) / max(1, steps)
    if rows.shape[1] > 4 + len(PHASES):  # the most any rank holds
        most = rows[:, 4 + len(PHASES) :].max(0).values
        record["memory"] = {k: int(v) for k, v in zip(MEMORY_FIELDS, most.tolist())}
    return record


def merge_counts(prior: dict[int, int], per_epoch: list[float]) -> dict[int, int]:
    """Samples per epoch: counts from before a resume plus those since."""
    counts = dict(prior)
    for epoch, n in enumerate(per_epoch):
        if n:
            counts[epoch] = counts.get(epoch, 0) + int(n)
    return counts


def host_code(host: str) -> torch.Tensor:
    """A host name as a fixed-size float tensor, so it can ride in a gathered row."""
    raw = host.encode()[:HOST_BYTES].ljust(HOST_BYTES, b"\0")
    return torch.tensor(list(raw), dtype=torch.float64)


def host_name(code: torch.Tensor) -> str:
    return bytes(int(v) for v in code.tolist()).rstrip(b"\0").decode(errors="replace")


def save_model(
    model: torch.nn.Module, out: Path, extra: dict[str, torch.Tensor] | None = None
) -> None:
    """The final model (plus ``extra`` tensors) as ``model.safetensors``, written atomically."""
    from safetensors.torch import save_file

    state = {**model.state_dict(), **(extra or {})}
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    tmp = out / f".{MODEL_FILE}.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(out / MODEL_FILE)


def build_summary(
    job: Any,
    *,
    dataset: str,
    world_size: int,
    steps: int,
    num_parameters: int,
    final_loss: float,
    eval_metrics: dict[str, float],
    wall_time: float,
    counts: dict[int, int],
    train_samples: int,
    per_worker: list[dict[str, Any]],
    **extra: Any,
) -> dict[str, Any]:
    """The contents of ``summary.json``."""
    return {
        "strategy": job.strategy.name,
        "model": job.model.name,
        "data": dataset,
        "world_size": world_size,
        "steps": steps,
        "global_batch_size": job.train.batch_size,
        "num_parameters": num_parameters,
        "final_loss": final_loss,
        **eval_metrics,
        "wall_time_s": wall_time,
        "samples_per_s": sum(counts.values()) / wall_time if wall_time > 0 else 0.0,
        "bytes_sent_total": sum(w["bytes_sent"] for w in per_worker),
        "bytes_received_total": sum(w["bytes_received"] for w in per_worker),
        "samples_per_epoch": {str(k): v for k, v in sorted(counts.items())},
        "train_samples": train_samples,
        "per_worker": per_worker,
        **extra,
    }
