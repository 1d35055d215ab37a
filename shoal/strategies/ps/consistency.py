"""Global steps and the three consistency modes of the parameter server.

Work is handed out as *tasks*: part ``p`` of global step ``t``'s batch (the
batch is cut into ``parts`` slices, one per worker the job started with). A
step is *applied* once every one of its parts has been applied; a shard's
``applied_through`` is the last step ``a`` such that every step up to ``a`` is
applied. Before computing a task of step ``t`` a worker pulls parameters, and
:meth:`Steps.can_read` says whether that pull may be answered yet:

- ``bsp``: only when step ``t - 1`` is applied. The parts of step ``t`` are
  summed and applied as one update: exactly synchronous all-reduce, whichever
  worker computed which part.
- ``ssp``: when ``applied_through >= t - 1 - s``: no task runs more than ``s``
  steps ahead of the oldest unfinished step. Each part is applied as it arrives.
- ``asp``: at once; each part is applied as it arrives.

The staleness of an applied gradient of step ``t`` is ``t - 1 - a``, where
``a`` was ``applied_through`` when its parameters were read: how many whole
steps of updates it may be missing. BSP gives 0, SSP at most ``s``, ASP
whatever the speeds make it.

Every ``(step, part)`` is applied at most once per shard: a task that is handed
out again (its worker died or was dropped) and pushed twice counts once.
"""

from __future__ import annotations

MODES = ("bsp", "asp", "ssp")


def read_bound(mode: str, staleness: int, step: int) -> int:
    """The ``applied_through`` a task of ``step`` needs before it may read (-inf for asp)."""
    if mode == "asp":
        return -(1 << 62)
    return step - 1 - (staleness if mode == "ssp" else 0)


class Steps:
    """Which parts of which global steps one server shard has applied."""

    def __init__(self, mode: str, staleness: int, parts: int) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown consistency mode {mode!r}")
        if parts < 1:
            raise ValueError("a step has at least one part")
        self.mode = mode
        self.staleness = staleness if mode == "ssp" else 0
        self.parts = parts
        self.applied_through = -1
        self.seen: dict[int, set[int]] = {}  # steps after applied_through: parts received

    def can_read(self, step: int) -> bool:
        return self.applied_through >= read_bound(self.mode, self.staleness, step)

    def is_new(self, step: int, part: int) -> bool:
        """Whether ``(step, part)`` has not been received before."""
        return step > self.applied_through and part not in self.seen.get(step, ())

    def received(self, step: int, part: int) -> bool:
        """Record a part; return whether its step now has every part."""
        got = self.seen.setdefault(step, set())
        got.add(part)
        return len(got) == self.parts

    def applied(self, step: int) -> None:
        """Every part of ``step`` is applied: advance ``applied_through`` as far as it goes."""
        self.seen[step] = set(range(self.parts))
        while len(self.seen.get(self.applied_through + 1, ())) == self.parts:
            self.applied_through += 1
            del self.seen[self.applied_through]
