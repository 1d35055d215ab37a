"""A parameter-server job that makes no progress says what it waits for, and acts.

Every failure shoal knows has its own line (a death, a silence, a full disk).
A wait that none of them explains still gets one: when no step has finished for
:attr:`StallWatch.bound` seconds, the coordinator says which step it waits for
and on whom (the workers holding its parts, a shard being restored, a
checkpoint), again every bound while it lasts. A worker that holds a task for
:data:`HUNG_FACTOR` bounds while its heartbeat goes on is hung in its work: it
is dropped like a silent one (its launcher kills and restarts it, its tasks go
to the others).
"""

from __future__ import annotations

import statistics
import time
from collections import deque

MIN_BOUND_S = 10.0
"""The shortest bound: long enough for a restore on a small machine."""
TYPICAL_FACTOR = 10.0
"""The bound is at least this many typical intervals between finished steps."""
HUNG_FACTOR = 3.0
"""A task held this many bounds, by a worker whose heartbeat goes on, is hung."""


class StallWatch:
    """When steps finish; whether the wait since the last one is due to be named."""

    def __init__(self, heartbeat_timeout: float) -> None:
        self.floor = max(MIN_BOUND_S, 3 * heartbeat_timeout)
        self.intervals: deque[float] = deque(maxlen=50)
        self.last = time.monotonic()
        self.said_at = 0.0

    @property
    def bound(self) -> float:
        """How long a wait may last unnamed: the floor, or ten typical steps."""
        typical = statistics.median(self.intervals) if self.intervals else 0.0
        return max(self.floor, TYPICAL_FACTOR * typical)

    def progressed(self) -> None:
        """A step finished (or the job started, or a restore ended)."""
        now = time.monotonic()
        self.intervals.append(now - self.last)
        self.last = now

    def restart(self) -> None:
        """The clock starts again (a restore ended, the job began): no interval counted."""
        self.last = time.monotonic()

    def quiet(self) -> float:
        return time.monotonic() - self.last

    def due(self) -> float | None:
        """Seconds without progress, when that is to be said now (once per bound)."""
        now, quiet = time.monotonic(), self.quiet()
        if quiet < self.bound or now - self.said_at < self.bound:
            return None
        self.said_at = now
        return quiet
