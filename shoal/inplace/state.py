"""What a member hands a newcomer (or a member a step behind): the training state, point
to point over the new generation's group, and the sample counts of lost members."""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from shoal.data.order import MASK64, digest

DIRECT_BYTES = 64 * 1024
"""Tensors of at least this size travel as themselves, straight from and into memory;
smaller ones packed together, in one message."""

_MARK = "shoal:tensor"  # (a tensor's place in the outline: (_MARK, its index))


def send(state: dict[str, Any], to: list[int]) -> int:
    """Send ``state`` (tensors, numbers, strings, in dicts and lists) to ranks ``to`` of
    the current group and wait until it is sent; returns the bytes sent to each (see
    :func:`post`)."""
    posted = post(state, to)
    posted.wait()
    return posted.bytes


class Posted:
    """A state on its way (:func:`post`): what it sends must stay as it is until
    :meth:`wait` returns."""

    def __init__(self, works: list[Any], keep: list[Any], nbytes: int) -> None:
        self.works, self.keep, self.bytes = works, keep, nbytes

    def wait(self) -> None:
        """Until every part is sent (raises what a failed send raised)."""
        works, self.works = self.works, []
        for work in works:
            work.wait()
        self.keep = []


def post(state: dict[str, Any], to: list[int]) -> Posted:
    """Start sending ``state`` to ranks ``to`` of the current group, without waiting.

    What travels: a head (the structure and plain values, each CPU tensor replaced by
    its index in a list of dtypes and shapes), then the small tensors packed in one
    buffer, then each large one as it is: no serialized copy of the model, and all of it
    posted at once, so that no tensor waits for the receiver's turn to take the one
    before it (on a busy machine each such wait costs a turn of the scheduler). A tensor
    equal, bit for bit, to one before it (the model and its copies, at a point where the
    replicas are one) is sent once."""
    tensors: list[torch.Tensor] = []
    outline = _outline(state, tensors)
    kinds, packed, direct = _pack(tensors)
    same = _same(direct)
    buffer = io.BytesIO()
    head = {"outline": outline, "kinds": kinds, "packed": packed.numel(), "same": same}
    torch.save(head, buffer)
    raw = torch.frombuffer(bytearray(buffer.getbuffer()), dtype=torch.uint8)
    size = torch.tensor([raw.numel()], dtype=torch.int64)
    sent = [size, raw, packed, *(t for j, t in enumerate(direct) if j not in same)]
    works = [dist.isend(t, rank) for rank in to for t in sent if t.numel()]
    return Posted(works, sent, sum(t.numel() * t.element_size() for t in sent[1:]))


def receive(source: int) -> dict[str, Any]:
    """What rank ``source`` sent with :func:`send` (its head loaded as weights only: no
    code; its tensors received into tensors of the dtypes and shapes the head says)."""
    size = torch.zeros(1, dtype=torch.int64)
    dist.recv(size, source)
    raw = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.recv(raw, source)
    head = torch.load(io.BytesIO(raw.numpy()), weights_only=True)
    kinds = [(_dtype(d), tuple(shape), int(at)) for d, shape, at in head["kinds"]]
    same = {int(j): int(i) for j, i in head["same"].items()}
    packed = torch.empty(int(head["packed"]), dtype=torch.uint8)
    direct = [torch.empty(s, dtype=d) for d, s, at in kinds if at < 0]
    wanted = [packed, *(t for j, t in enumerate(direct) if j not in same)]
    for work in [dist.irecv(t, source) for t in wanted if t.numel()]:
        work.wait()
    for j, i in sorted(same.items()):
        direct[j].copy_(direct[i])
    tensors, big = [], iter(direct)
    for d, s, at in kinds:
        small = at >= 0
        tensors.append(packed[at : at + _nbytes(d, s)].view(d).reshape(s).clone() if small
                       else next(big))  # fmt: skip
    return _fill(head["outline"], tensors)


def _outline(x: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(x, torch.Tensor) and x.device.type == "cpu":
        tensors.append(x.detach().contiguous())
        return (_MARK, len(tensors) - 1)
    if isinstance(x, dict):
        return {k: _outline(v, tensors) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_outline(v, tensors) for v in x)
    return x


def _fill(x: Any, tensors: list[torch.Tensor]) -> Any:
    """The outline with each tensor's mark replaced by that tensor."""
    if isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) and x[0] == _MARK:
        return tensors[x[1]]
    if isinstance(x, dict):
        return {k: _fill(v, tensors) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_fill(v, tensors) for v in x)
    return x


def _pack(
    tensors: list[torch.Tensor],
) -> tuple[list[tuple[str, list[int], int]], torch.Tensor, list[torch.Tensor]]:
    """Each tensor's dtype, shape and offset in the packed buffer (-1: sent as itself),
    the packed buffer of the small ones (8-byte aligned), and the large ones, in order."""
    kinds, parts, direct, at = [], [], [], 0
    for t in tensors:
        name = str(t.dtype).removeprefix("torch.")
        if t.numel() * t.element_size() >= DIRECT_BYTES:
            kinds.append((name, list(t.shape), -1))
            direct.append(t)
            continue
        raw = t.reshape(-1).view(torch.uint8)
        pad = -raw.numel() % 8
        kinds.append((name, list(t.shape), at))
        parts += [raw, torch.zeros(pad, dtype=torch.uint8)]
        at += raw.numel() + pad
    return kinds, torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8), direct


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"not a dtype: {name!r}")
    return dtype


def _nbytes(dtype: torch.dtype, shape: tuple) -> int:
    return math.prod(shape) * dtype.itemsize


def _same(direct: list[torch.Tensor]) -> dict[int, int]:
    """Which of ``direct`` equal, bit for bit, an earlier one: index -> that one's."""
    same: dict[int, int] = {}
    firsts: dict[tuple, list[int]] = {}
    for j, t in enumerate(direct):
        kind = firsts.setdefault((t.shape, t.dtype), [])
        i = next((i for i in kind if _bits_equal(direct[i], t)), None)
        if i is None:
            kind.append(j)
        else:
            same[j] = i
    return same


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
    if not torch.equal(a[:64], b[:64]):  # (most differ at once)
        return False
    if a.numel() % 8 == 0 and a.data_ptr() % 8 == 0 and b.data_ptr() % 8 == 0:
        a, b = a.view(torch.int64), b.view(torch.int64)  # (several times faster)
    return torch.equal(a, b)


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
