"""What workers report, as named records: a log window's figures and a worker's totals.

A :class:`Window` travels every log step, so it converts to and from one float
tensor for the collectives (its columns are named once, in :meth:`Window.columns`);
a parameter-server worker sends the same tensor to the coordinator. A worker's
:class:`Totals` travel once, at the end, as a plain dict (``gather_object``, or
a JSON header to the coordinator): host names stay strings.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from shoal.memory import MEMORY_FIELDS
from shoal.metrics import PHASES


def _zeros(names: tuple[str, ...]) -> dict[str, float]:
    return dict.fromkeys(names, 0.0)


@dataclass
class Window:
    """One worker's figures over a log window (or one parameter-server task)."""

    loss_sum: float = 0.0
    samples: float = 0.0
    bytes_sent: float = 0.0
    """Cumulative since the worker started (counters are per process)."""
    bytes_received: float = 0.0
    phases: dict[str, float] = field(default_factory=lambda: _zeros(PHASES))
    """Seconds per phase (:data:`~shoal.metrics.PHASES`) over the window."""
    memory: dict[str, float] = field(default_factory=lambda: _zeros(MEMORY_FIELDS))
    """Bytes per memory figure (:data:`~shoal.memory.MEMORY_FIELDS`) at the window's end."""

    @staticmethod
    def columns() -> list[str]:
        """The tensor's columns, in order."""
        scalars = ["loss_sum", "samples", "bytes_sent", "bytes_received"]
        return scalars + [f"t_{p}" for p in PHASES] + [f"mem_{m}" for m in MEMORY_FIELDS]

    def to_tensor(self) -> torch.Tensor:
        values = [self.loss_sum, self.samples, self.bytes_sent, self.bytes_received]
        values += [self.phases.get(p, 0.0) for p in PHASES]
        values += [self.memory.get(m, 0.0) for m in MEMORY_FIELDS]
        return torch.tensor(values, dtype=torch.float64)

    @classmethod
    def from_tensor(cls, row: torch.Tensor) -> Window:
        """The inverse of :meth:`to_tensor`; ``ValueError`` for a row of the wrong size."""
        v = [float(x) for x in row.reshape(-1).tolist()]
        if len(v) != len(cls.columns()):
            raise ValueError(f"a window row has {len(cls.columns())} values, not {len(v)}")
        p = 4 + len(PHASES)
        return cls(
            v[0],
            v[1],
            v[2],
            v[3],
            dict(zip(PHASES, v[4:p])),
            dict(zip(MEMORY_FIELDS, v[p:])),
        )

    def add(self, other: Window) -> None:
        """Accumulate ``other``'s loss, samples and phase times (one worker's tasks);
        bytes and memory are the latest."""
        self.loss_sum += other.loss_sum
        self.samples += other.samples
        for k, v in other.phases.items():
            self.phases[k] = self.phases.get(k, 0.0) + v
        self.bytes_sent, self.bytes_received = other.bytes_sent, other.bytes_received
        self.memory = {k: max(self.memory.get(k, 0.0), v) for k, v in other.memory.items()}


def window_record(
    windows: list[Window],
    *,
    step: int,
    epoch: float,
    lr: float,
    steps: int,
    global_samples: int,
    elapsed: float,
    wall_time: float,
    shares: int = 0,
) -> dict[str, Any]:
    """A ``metrics.jsonl`` record from the windows of the workers. Phase times are per
    step and per share of a step (``shares``: how many a step is cut into: the workers,
    by default, or the parameter server's parts)."""
    samples = sum(w.samples for w in windows)
    record: dict[str, Any] = {
        "step": step,
        "epoch": epoch,
        "loss": sum(w.loss_sum for w in windows) / max(1.0, samples),
        "lr": lr,
        "samples_per_s": global_samples / elapsed if elapsed > 0 else 0.0,
        "step_time_s": elapsed / max(1, steps),
        "bytes_sent": int(sum(w.bytes_sent for w in windows)),
        "bytes_received": int(sum(w.bytes_received for w in windows)),
        "wall_time": wall_time,
    }
    per = max(1, shares or len(windows)) * max(1, steps)
    for p in PHASES:
        record[f"t_{p}"] = sum(w.phases.get(p, 0.0) for w in windows) / per
    record["memory"] = {m: int(max(w.memory.get(m, 0.0) for w in windows)) for m in MEMORY_FIELDS}
    return record


@dataclass
class Totals:
    """One worker's figures for ``summary.json``, sent once when it finishes."""

    rank: int
    host: str
    bytes_sent: int
    bytes_received: int
    memory: dict[str, int]
    """The most this worker held, per memory figure."""
    time: dict[str, float]
    """Seconds in each phase over the whole run: where its time went."""
    own: dict[str, float] = field(default_factory=dict)
    """The strategy's own figures (:meth:`Strategy.totals`)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> Totals:
        """Checked: ``ValueError`` for anything that is not a worker's totals."""
        if not isinstance(d, dict):
            raise ValueError("totals must be an object")
        for key in ("memory", "time", "own"):
            if not isinstance(d.get(key, {}), dict):
                raise ValueError(f"malformed totals: {key} must be an object")
        try:
            out = cls(
                rank=int(d["rank"]),
                host=str(d["host"])[:256],
                bytes_sent=int(d["bytes_sent"]),
                bytes_received=int(d["bytes_received"]),
                memory={str(k): int(v) for k, v in dict(d["memory"]).items()},
                time={str(k): float(v) for k, v in dict(d["time"]).items()},
                own={str(k): float(v) for k, v in dict(d.get("own", {})).items()},
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed totals: {e}") from None
        if len(out.memory) > 64 or len(out.time) > 64 or len(out.own) > 1024:
            raise ValueError("malformed totals: too many figures")
        return out

    def summary_entry(self) -> dict[str, Any]:
        """This worker's entry in ``summary.json``'s ``per_worker``."""
        return {
            "rank": self.rank,
            "host": self.host,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "memory": dict(self.memory),
            "time": {k: v for k, v in self.time.items() if not k.startswith("stepping")},
        }


def merge_counts(prior: dict[int, int], per_epoch: list[float]) -> dict[int, int]:
    """Samples per epoch: counts from before a resume plus those since."""
    counts = dict(prior)
    for epoch, n in enumerate(per_epoch):
        if n:
            counts[epoch] = counts.get(epoch, 0) + int(n)
    return counts
