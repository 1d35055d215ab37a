"""What a member hands a newcomer (or a member a step behind): the training state, point
to point over the new generation's group, and the sample counts of lost members."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from shoal.data.order import MASK64, digest


def send(state: dict[str, Any], to: list[int]) -> int:
    """Send ``state`` (tensors, numbers, strings, in dicts and lists) to ranks ``to`` of
    the current group; returns the bytes sent to each."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = torch.frombuffer(bytearray(buffer.getbuffer()), dtype=torch.uint8)
    size = torch.tensor([data.numel()], dtype=torch.int64)
    for rank in to:
        dist.send(size, rank)
        dist.send(data, rank)
    return data.numel()


def receive(source: int) -> dict[str, Any]:
    """What rank ``source`` sent with :func:`send` (loaded as weights only: no code)."""
    size = torch.zeros(1, dtype=torch.int64)
    dist.recv(size, source)
    data = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.recv(data, source)
    return torch.load(io.BytesIO(data.numpy().tobytes()), weights_only=True)


def add_batch(counts: dict[int, int], digests: dict[int, int], epoch: int, n: int,
              d: int) -> None:  # fmt: skip
    """Count ``n`` samples of digest ``d`` in ``epoch``."""
    counts[epoch] = counts.get(epoch, 0) + n
    digests[epoch] = (digests.get(epoch, 0) + d) & MASK64


def credit(
    whole: tuple[dict[int, int], dict[int, int]], own: tuple[dict[int, int], dict[int, int]]
) -> tuple[dict[int, int], dict[int, int]]:
    """The samples of lost members: every committed step's whole batch (``whole``) less
    what the members of the group trained of it (``own``, this rank's; summed over the
    group here, collectively)."""
    epochs = max([*whole[0], *own[0], -1]) + 1
    mine = torch.zeros(2, epochs, dtype=torch.int64)
    for e, n in own[0].items():
        mine[0, e] = n
    for e, d in own[1].items():
        mine[1, e] = int(np.uint64(d).view(np.int64))
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, mine)
    counts = torch.stack(parts)[:, 0].sum(0).tolist()
    digests = torch.stack(parts)[:, 1].numpy().view(np.uint64).sum(0, dtype=np.uint64).tolist()
    lost_counts, lost_digests = {}, {}
    for e in range(epochs):
        n = whole[0].get(e, 0) - counts[e]
        if n:
            lost_counts[e] = n
            lost_digests[e] = (whole[1].get(e, 0) - int(digests[e])) & MASK64
    return lost_counts, lost_digests


class Ledger:
    """What a member of an in-place job counts of committed steps: each one's whole
    batch (the same on every member, whoever trained it), and from those the samples of
    members lost since this process started (:func:`credit`)."""

    def __init__(self) -> None:
        self.whole: tuple[dict[int, int], dict[int, int]] = ({}, {})
        """Per epoch: samples and digest of every committed step's whole batch."""
        self.credited: tuple[dict[int, int], dict[int, int]] = ({}, {})
        """Per epoch: samples and digest the lost members trained in committed steps."""
        self.pending: dict[int, tuple[int, int, int]] = {}  # trained, not yet committed

    def trained(self, step: int, epoch: int, batch: np.ndarray) -> None:
        """Global ``step`` (of ``epoch``, whole batch ``batch``) is trained here."""
        self.pending[step] = (epoch, len(batch), digest(batch))

    def commit(self, through: int) -> None:
        """Every step trained up to ``through`` is committed."""
        for step in sorted(s for s in self.pending if s <= through):
            add_batch(*self.whole, *self.pending.pop(step))

    def drop(self) -> None:
        """The steps trained and not committed are not (they are trained again)."""
        self.pending = {}

    def fold(self, own: tuple[dict[int, int], dict[int, int]]) -> None:
        """Credit the lost members' samples: the whole batches less ``own``, this member's
        counts, summed over the group (collective)."""
        self.credited = credit(self.whole, own)

    def state(self) -> list[list[tuple[int, int]]]:
        """:attr:`whole`, for a newcomer."""
        return [list(d.items()) for d in self.whole]

    def load(self, state: list[list[tuple[int, int]]]) -> None:
        self.whole = tuple({int(k): int(v) for k, v in pairs} for pairs in state)  # type: ignore[assignment]
