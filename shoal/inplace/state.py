"""What a member hands a newcomer (or a member a step behind): the training state, point
to point over the new generation's group, and the sample counts of lost members."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from shoal.data.order import MASK64, digest

DIRECT_BYTES = 64 * 1024
"""Tensors of at least this size travel as themselves, straight from and into memory;
smaller ones, and everything else, in one serialized outline."""


def send(state: dict[str, Any], to: list[int]) -> int:
    """Send ``state`` (tensors, numbers, strings, in dicts and lists) to ranks ``to`` of
    the current group; returns the bytes sent to each.

    Its outline (the structure, small values, and each large CPU tensor as a meta tensor
    of its shape and dtype) is serialized; the large tensors then go as they are, all
    posted at once in the order the outline lists them: no serialized copy of the model,
    and no wait for the receiver between one tensor and the next (on a busy machine,
    each such wait costs a turn of the scheduler)."""
    direct: list[torch.Tensor] = []
    buffer = io.BytesIO()
    torch.save(_outline(state, direct), buffer)
    outline = torch.frombuffer(buffer.getbuffer(), dtype=torch.uint8)
    size = torch.tensor([outline.numel()], dtype=torch.int64)
    for rank in to:
        dist.send(size, rank)
        dist.send(outline, rank)
        for work in [dist.isend(t, rank) for t in direct]:  # (all posted at once: the
            work.wait()  # handshake of each with the receiver overlaps the others' data)
    return outline.numel() + sum(t.numel() * t.element_size() for t in direct)


def receive(source: int) -> dict[str, Any]:
    """What rank ``source`` sent with :func:`send` (its outline loaded as weights only: no
    code; its large tensors received into tensors of the shapes the outline says)."""
    size = torch.zeros(1, dtype=torch.int64)
    dist.recv(size, source)
    outline = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.recv(outline, source)
    state = torch.load(io.BytesIO(outline.numpy()), weights_only=True)
    direct: list[torch.Tensor] = []
    state = _fill(state, direct)
    for work in [dist.irecv(t, source) for t in direct]:
        work.wait()
    return state


def _outline(x: Any, direct: list[torch.Tensor]) -> Any:
    if isinstance(x, torch.Tensor):
        if x.device.type != "cpu" or x.numel() * x.element_size() < DIRECT_BYTES:
            return x
        direct.append(x.detach().contiguous())
        return torch.empty(x.shape, dtype=x.dtype, device="meta")
    if isinstance(x, dict):
        return {k: _outline(v, direct) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_outline(v, direct) for v in x)
    return x


def _fill(x: Any, into: list[torch.Tensor]) -> Any:
    """The outline with each meta tensor replaced by a new tensor of its shape and dtype,
    also listed in ``into``, in order."""
    if isinstance(x, torch.Tensor):
        if not x.is_meta:
            return x
        into.append(torch.empty(x.shape, dtype=x.dtype))
        return into[-1]
    if isinstance(x, dict):
        return {k: _fill(v, into) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_fill(v, into) for v in x)
    return x


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

    def state(self) -> dict[str, list[list[tuple[int, int]]]]:
        """:attr:`whole` and :attr:`credited`, for a newcomer."""
        return {"whole": [list(d.items()) for d in self.whole],
                "credited": [list(d.items()) for d in self.credited]}  # fmt: skip

    def load(self, state: dict[str, list[list[tuple[int, int]]]]) -> None:
        """What :meth:`state` gave: a group that lost nobody since its source's last fold
        holds the same lost samples, so the newcomer need not fold."""
        self.whole, self.credited = (
            tuple({int(k): int(v) for k, v in pairs} for pairs in state[key])  # type: ignore[misc]
            for key in ("whole", "credited")
        )
