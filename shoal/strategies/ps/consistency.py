"""Worker clocks and the three consistency modes of the parameter server.

A worker's clock counts the gradients it has pushed. Before computing the
gradient of its clock ``c`` it pulls parameters, and :meth:`Clocks.can_read`
says whether that pull may be answered yet:

- ``bsp``: only when every live worker has pushed clock ``c - 1`` (and the
  server has applied their sum): all workers move in lock step, exactly like
  synchronous all-reduce.
- ``ssp``: when the slowest live worker is at most ``staleness`` clocks behind:
  nobody runs more than ``s`` clocks ahead of the slowest.
- ``asp``: at once; gradients are applied as they arrive.

The staleness of an applied gradient is ``c - m``, where ``m`` is the slowest
live worker's clock when the parameters it was computed on were read: the
number of clocks of other workers' updates it may be missing. BSP gives 0, SSP
at most ``s``, ASP whatever the speeds make it.
"""

from __future__ import annotations

MODES = ("bsp", "asp", "ssp")
DONE = 1 << 62  # the clock of a worker that has left: never the slowest


class Clocks:
    """Clocks of the live workers, as one server shard sees them."""

    def __init__(self, mode: str, staleness: int, num_workers: int) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown consistency mode {mode!r}")
        self.mode = mode
        self.staleness = staleness if mode == "ssp" else 0
        self.clock = dict.fromkeys(range(num_workers), 0)
        self.left: set[int] = set()

    @property
    def live(self) -> list[int]:
        return [w for w in self.clock if w not in self.left]

    def min_clock(self) -> int:
        """The slowest live worker's clock (``DONE`` if none is live)."""
        return min((self.clock[w] for w in self.live), default=DONE)

    def can_read(self, clock: int) -> bool:
        if self.mode == "asp":
            return True
        return self.min_clock() >= clock - self.staleness

    def pushed(self, worker: int, clock: int) -> None:
        self.clock[worker] = max(self.clock.get(worker, 0), clock + 1)

    def leave(self, worker: int) -> None:
        """``worker`` finished or died: nobody waits for it any more."""
        self.left.add(worker)

    def complete(self, contributors: set[int]) -> bool:
        """BSP: have all live workers contributed to a clock?"""
        return all(w in contributors for w in self.live)
