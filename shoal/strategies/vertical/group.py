"""A party as a data-parallel group: its processes on its machine, one gloo group.

Process ``r`` of a party's ``n`` trains slice ``r`` of every batch (the same cut at
every party, :func:`~shoal.strategies.vertical.link.part_of`) with process ``r`` of
the label party; the slices' gradients of the party's bottom (and the label party's
top) are summed over the group before each step, so the group steps as one process
on the whole batch would. The first process does what is done once per party: the
alignment and the resume round with the label party, the evaluation, checkpoints,
the exported model, and (at the label party) the run's records.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

RANK_ENV = "SHOAL_PARTY_RANK"
"""This process's index among its party's processes."""
GROUP_ENV = "SHOAL_PARTY_GROUP"
"""Where its party's processes meet (``tcp://127.0.0.1:PORT``, picked by the launcher)."""


class Group:
    """This process's place in its party (``size`` 1: a party of one process)."""

    def __init__(self, size: int, timeout_s: float = 1800.0) -> None:
        self.size = size
        self.rank = int(os.environ.get(RANK_ENV, "0"))
        if size > 1:
            dist.init_process_group(
                "gloo", init_method=os.environ[GROUP_ENV], rank=self.rank, world_size=size,
                timeout=timedelta(seconds=timeout_s),
            )  # fmt: skip

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def part(self) -> tuple[int, int]:
        return self.rank, self.size

    def broadcast(self, obj: Any) -> Any:
        """The first process's ``obj``, on every process."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order, on every process."""
        if self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def sum(self, values: list[float]) -> list[float]:
        """``values`` summed over the processes."""
        if self.size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def reduce(self, grads: list[torch.Tensor], flag: float = 0.0) -> float:
        """Sum ``grads`` in place over the processes (one flat all-reduce), and ``flag``
        with them: the sum of every process's ``flag``."""
        flat = torch.cat(
            [*(g.reshape(-1) for g in grads), torch.tensor([flag], dtype=grads[0].dtype)]
        )
        dist.all_reduce(flat)
        at = 0
        for g in grads:
            g.copy_(flat[at : at + g.numel()].view_as(g))
            at += g.numel()
        return float(flat[-1])

    def close(self) -> None:
        if self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()
