"""Which server shard holds what.

Dense parameters are laid end to end and cut into ``num_shards`` contiguous
ranges of (nearly) equal bytes, so a large tensor is split across shards and
small ones share one. Embedding-table rows go to shard ``row % num_shards``.
Every process computes the same plan from the same parameter list; nothing
about placement is ever sent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Slice:
    """Elements ``[start, stop)`` of the flattened parameter ``name`` live on ``shard``."""

    name: str
    shard: int
    start: int
    stop: int

    @property
    def key(self) -> str:
        return f"{self.name}@{self.start}"

    @property
    def numel(self) -> int:
        return self.stop - self.start


def dense_plan(params: list[tuple[str, int]], num_shards: int) -> list[Slice]:
    """Cut ``(name, numel)`` parameters into ``num_shards`` balanced ranges."""
    total = sum(n for _, n in params)
    bounds = [round(total * s / num_shards) for s in range(num_shards + 1)]
    slices, offset, shard = [], 0, 0
    for name, numel in params:
        start = 0
        while start < numel:
            while bounds[shard + 1] <= offset + start and shard < num_shards - 1:
                shard += 1
            stop = min(numel, bounds[shard + 1] - offset) if shard < num_shards - 1 else numel
            stop = max(stop, start + 1)
            slices.append(Slice(name, shard, start, stop))
            start = stop
        offset += numel
    return slices


def shard_bytes(plan: list[Slice], num_shards: int, itemsize: int = 4) -> list[int]:
    """Bytes of dense parameters each shard holds."""
    out = [0] * num_shards
    for s in plan:
        out[s.shard] += s.numel * itemsize
    return out


def row_shard(rows: torch.Tensor, num_shards: int) -> torch.Tensor:
    """The shard of each embedding row id."""
    return torch.remainder(rows, num_shards)
