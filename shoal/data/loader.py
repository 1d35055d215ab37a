"""Batches for the training loop: read in the background while the step before trains.

A :class:`Loader` takes rows by number from the dataset's :class:`Rows`; rows on
disk are read in one background thread (pyarrow decodes without the GIL), the
next task's as soon as it is known, into pinned memory when the device is a
GPU. Rows in memory are indexed where they are. An ``--audit-samples`` run
also writes every task's sample ids (:class:`Audit`).
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from shoal.data.datasets import Rows, Split, TensorRows
from shoal.layout import AUDIT_DIR


class Loader:
    """Reads the rows of a task; :meth:`ahead` starts reading a later one."""

    def __init__(self, rows: Rows, device: torch.device, prefetch: int) -> None:
        self.device = device
        self.rows: Rows = rows.to(device) if isinstance(rows, TensorRows) else rows
        self.in_memory = isinstance(self.rows, TensorRows)
        self.prefetch = 0 if self.in_memory else prefetch
        self.pool = ThreadPoolExecutor(1, "shoal-data") if self.prefetch else None
        self.pending: OrderedDict[bytes, Future[Split]] = OrderedDict()
        self.done: OrderedDict[bytes, Split] = OrderedDict()
        """The last batches read: a strategy that prefetches by the next task's rows reads
        that batch one step early, and the step then takes it from here."""

    def _read(self, idx: np.ndarray) -> Split:
        x, y = self.rows.take(idx)
        if self.device.type == "cuda":
            x, y = x.pin_memory(), y.pin_memory()
        return x, y

    def get(self, idx: np.ndarray) -> Split:
        """The rows ``idx`` on the device (read now unless read ahead)."""
        if self.in_memory:
            return self.rows.take(idx)
        key = idx.tobytes()
        batch = self.done.get(key)
        if batch is None:
            future = self.pending.pop(key, None)
            batch = future.result() if future is not None else self._read(idx)
            self.done[key] = batch
            while len(self.done) > 2:
                self.done.popitem(last=False)
        x, y = batch
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def ahead(self, idx: np.ndarray) -> None:
        """Start reading ``idx`` in the background (kept until ``prefetch`` newer ones)."""
        if self.pool is None:
            return
        key = idx.tobytes()
        if key in self.pending or key in self.done:
            return
        self.pending[key] = self.pool.submit(self._read, idx)
        while len(self.pending) > self.prefetch + 1:  # the current one, and those ahead
            self.pending.popitem(last=False)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


class Audit:
    """``--audit-samples``: this rank's tasks and their sample ids, one JSON line each,
    in ``audit/from-STEP-rank-R.jsonl`` (``STEP``: where this attempt started)."""

    def __init__(self, run_dir: Path, start: int, rank: int) -> None:
        path = run_dir / AUDIT_DIR / f"from-{start:09d}-rank-{rank:05d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("a", buffering=1)  # by line: a kill loses no finished step

    def write(self, step: int, part: int, parts: int, ids: np.ndarray) -> None:
        record = {"step": step, "part": part, "parts": parts, "ids": ids.tolist()}
        self.file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


def read_audit(run_dir: Path) -> dict[int, np.ndarray]:
    """The sorted sample ids of every step of a run, from its audit files.

    Steps done twice (after a resume from a checkpoint older than the kill) count
    from the attempt that started last: the one whose work the checkpoints kept;
    a task done twice inside an attempt (a parameter-server task handed out again)
    counts once."""
    parts: dict[int, tuple[int, dict[tuple[int, int], list[int]]]] = {}
    for path in sorted((run_dir / AUDIT_DIR).glob("from-*-rank-*.jsonl")):
        start = int(path.name.split("-")[1])
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue  # the line a kill cut short
            step = int(r["step"])
            if step < start:
                continue
            have = parts.get(step)
            if have is None or have[0] < start:
                have = parts[step] = (start, {})
            elif have[0] > start:
                continue
            have[1][(int(r["part"]), int(r["parts"]))] = r["ids"]
    return {
        step: np.sort(np.concatenate([np.asarray(v, dtype=np.int64) for v in got.values()]))
        for step, (_, got) in sorted(parts.items())
    }
