"""Global-batch sampler: shards of one seeded epoch order.

Global step ``s`` of epoch ``e`` covers positions ``[s*B, (s+1)*B)`` of the
epoch's order (:class:`~shoal.data.order.Order`: a function of the seed, the
epoch and the dataset, never of the workers). The rows of a step are sorted,
and each of the ``W`` workers takes one contiguous slice of them, the first
``n % W`` slices one sample longer (or as a load balancer's plan says: see
:mod:`shoal.balance`): the set of samples in a global step never
depends on ``W``, which makes N synchronous workers equal to one and lets a
run resume, or be re-sharded onto a different number of workers, mid-epoch
without losing or repeating a sample; and sorted slices make each worker read
a narrow range of rows, its own share, not rows from all over the step.

Every sample is identified by its row number; the sampler keeps, per epoch,
how many samples this rank consumed and their digest
(:func:`~shoal.data.order.digest`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from shoal.data.order import MASK64, Order, digest, range_digest


def split_sizes(n: int, parts: int) -> list[int]:
    """Sizes of ``parts`` contiguous slices of ``n`` items, differing by at most 1."""
    base, extra = divmod(n, parts)
    return [base + (1 if r < extra else 0) for r in range(parts)]


def part_slice(n: int, part: int, parts: int) -> slice:
    """Part ``part`` of ``parts`` contiguous slices of ``n`` items."""
    sizes = split_sizes(n, parts)
    start = sum(sizes[:part])
    return slice(start, start + sizes[part])


@dataclass(frozen=True)
class Task:
    """One piece of work: part ``part`` of global step ``step``'s batch, cut in ``parts``."""

    step: int
    part: int
    parts: int
    indices: np.ndarray
    global_batch: int

    @property
    def loss_scale(self) -> float:
        """Turns this part's loss sum into its share of the global mean (summed over parts)."""
        return self.parts / self.global_batch


class Work(Protocol):
    """Where a worker's tasks come from: its own slice of every step, or a shared queue."""

    def next(self) -> Task | None:
        """The task to compute now; ``None`` when this worker is done."""
        ...

    def peek(self) -> Task | None:
        """The task after the current one, if it is known already (for prefetching)."""
        ...

    def log_now(self, step: int) -> bool:
        """Whether the trainer should report telemetry after finishing a task of ``step``."""
        ...


class GlobalBatchSampler:
    """Yields this rank's indices for each global step, with resumable state.

    Args:
        num_samples: size of the training set.
        batch_size: the GLOBAL batch size (all workers together).
        rank, world_size: this worker's slot.
        seed: seeds the per-epoch order.
        drop_last: drop the final, smaller global batch of an epoch.
        order: the epoch order (default: a full shuffle of ``num_samples`` rows).

    Iterating yields lists of indices until the end of the current epoch, so it
    can be passed as ``batch_sampler=`` to a ``torch.utils.data.DataLoader``.
    Call :meth:`next_batch` to step explicitly. The position is
    ``(epoch, step_in_epoch)``; :meth:`state_dict` captures it, together with
    how many samples of each epoch this rank has consumed (``samples_seen``) and
    their digest (``digests``).
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        drop_last: bool = False,
        order: Order | None = None,
    ) -> None:
        if batch_size < world_size:
            raise ValueError("the global batch must hold at least one sample per worker")
        if batch_size > num_samples:
            raise ValueError(
                f"global batch {batch_size} is larger than the dataset ({num_samples})"
            )
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.step_in_epoch = 0
        self.samples_seen: dict[int, int] = {}
        self.digests: dict[int, int] = {}
        self.order = order or Order(num_samples, seed)
        self._recent: dict[tuple[int, int], np.ndarray] = {}  # (epoch, step) -> batch
        self.cut: Callable[[int], list[int]] | None = None
        """Sizes of the ranks' slices of a global batch of ``n`` samples (a load
        balancer's plan, the same on every rank); ``None``: equal slices."""
        if self.order.n != num_samples:
            raise ValueError("the order is of a different number of samples")

    @property
    def steps_per_epoch(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def permutation(self, epoch: int) -> np.ndarray:
        """The whole sample order of ``epoch`` (for small datasets and references)."""
        return self.order.permutation(epoch)

    def global_indices(self, epoch: int, step: int) -> np.ndarray:
        """All samples of global step ``step`` of ``epoch``, sorted (shared with later
        calls: not to be written to; torch refuses to wrap read-only arrays quietly).

        A step's batch is asked for up to three times (peeked for the loader, taken,
        peeked for its size), so the last two are kept: on a slow machine the
        permutation of a large global batch is a visible part of every step."""
        key = (epoch, step)
        if key not in self._recent:
            start = step * self.batch_size
            stop = min(start + self.batch_size, self.num_samples)
            g = np.sort(self.order.rows(epoch, np.arange(start, stop, dtype=np.int64)))
            last = list(self._recent.items())[-1:]
            self._recent = {**dict(last), key: g}
        return self._recent[key]

    def local_slice(self, n: int) -> slice:
        """This rank's part of a global batch of ``n`` sorted samples."""
        if self.cut is None:
            return part_slice(n, self.rank, self.world_size)
        sizes = self.cut(n)
        start = sum(sizes[: self.rank])
        return slice(start, start + sizes[self.rank])

    def task(self, step: int, part: int, parts: int) -> Task:
        """Part ``part`` of global step ``step`` (counted from the start of training)."""
        g = self.global_indices(*divmod(step, self.steps_per_epoch))
        return Task(step, part, parts, g[part_slice(len(g), part, parts)], len(g))

    def peek(self) -> np.ndarray:
        """This rank's indices of the *next* global step, without moving there."""
        g = self.global_indices(self.epoch, self.step_in_epoch)
        return g[self.local_slice(len(g))]

    def next_batch(self) -> tuple[np.ndarray, int]:
        """Advance one global step; return (this rank's indices, global batch size)."""
        g = self.global_indices(self.epoch, self.step_in_epoch)
        local = g[self.local_slice(len(g))]
        self.samples_seen[self.epoch] = self.samples_seen.get(self.epoch, 0) + len(local)
        self.digests[self.epoch] = (self.digests.get(self.epoch, 0) + digest(local)) & MASK64
        self.step_in_epoch += 1
        if self.step_in_epoch >= self.steps_per_epoch:
            self.epoch += 1
            self.step_in_epoch = 0
        return local, len(g)

    def seek(self, step: int) -> None:
        """Go to global step ``step`` (counted from the start of training)."""
        self.epoch, self.step_in_epoch = divmod(step, self.steps_per_epoch)

    def untake(self, task: Task) -> None:
        """``task`` was taken (counted) but never trained: its samples no longer count."""
        epoch = task.step // self.steps_per_epoch
        self.samples_seen[epoch] = self.samples_seen.get(epoch, 0) - len(task.indices)
        self.digests[epoch] = (self.digests.get(epoch, 0) - digest(task.indices)) & MASK64

    def loss_scale(self, global_batch: int) -> float:
        """Factor turning this rank's summed loss into its share of the global mean.

        Gradient averaging divides by ``world_size``; multiplying each rank's
        loss sum by ``world_size / global_batch`` makes the average equal to the
        mean over the global batch even when slices differ in size.
        """
        return self.world_size / global_batch

    def __iter__(self) -> Iterator[list[int]]:
        epoch = self.epoch
        while self.epoch == epoch:
            yield self.next_batch()[0].tolist()

    def __len__(self) -> int:
        return self.steps_per_epoch - self.step_in_epoch

    def expected_digest(self, epoch: int, count: int) -> int:
        """The digest of the first ``count`` samples of ``epoch``'s order: what an
        epoch that consumed ``count`` samples, each once, must show."""
        if count == self.num_samples:
            return range_digest(0, count)
        total, chunk = 0, 1 << 20
        for start in range(0, count, chunk):
            positions = np.arange(start, min(count, start + chunk), dtype=np.int64)
            total = (total + digest(self.order.rows(epoch, positions))) & MASK64
        return total

    def digest_report(
        self, counts: dict[int, int], digests: dict[int, int]
    ) -> list[dict[str, Any]]:
        """Per epoch: samples, their digest, the digest they must have, and whether the
        two agree (every sample of the epoch's first ``samples`` positions, once)."""
        out = []
        for epoch in sorted(counts):
            n = int(counts[epoch])
            got, want = digests.get(epoch, 0), self.expected_digest(epoch, n)
            out.append({"epoch": epoch, "samples": n, "digest": f"{got:016x}",
                        "expected": f"{want:016x}", "exact": got == want})  # fmt: skip
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "order": self.order.describe(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position; ``world_size`` may differ from the saved run."""
        for key in ("seed", "num_samples", "batch_size"):
            if state[key] != getattr(self, key):
                raise ValueError(f"sampler {key} changed from {state[key]} to {getattr(self, key)}")
        if state.get("order") != self.order.describe():
            raise ValueError(
                f"the sample order changed from {state.get('order', 'an older shoal one')} "
                f"to {self.order.describe()}"
            )
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])


class StepWork:
    """Every global step from ``step`` to ``total``, this rank's slice of each, in order."""

    def __init__(self, sampler: GlobalBatchSampler, step: int, total: int, log_every: int) -> None:
        self.sampler, self.step, self.total, self.log_every = sampler, step, total, log_every

    def next(self) -> Task | None:
        if self.step >= self.total:
            return None
        s = self.sampler
        idx, global_batch = s.next_batch()
        self.step += 1
        return Task(self.step - 1, s.rank, s.world_size, idx, global_batch)

    def peek(self) -> Task | None:
        if self.step >= self.total:
            return None
        s = self.sampler
        global_batch = len(s.global_indices(s.epoch, s.step_in_epoch))
        return Task(self.step, s.rank, s.world_size, s.peek(), global_batch)

    def log_now(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.total
