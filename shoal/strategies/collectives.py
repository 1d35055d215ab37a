"""Averaging tensors over ranks through a codec, with the bytes counted.

The one place where a codec meets a process group. Three ways, by codec:

- summable codecs (``none``, ``fp16``, ``bf16``): all-reduce the payloads as
  they are, in one flat buffer;
- ``int8``, ``int4``: a max all-reduce of each chunk's largest magnitude (the
  scales every rank then quantizes with), and the packed integers exchanged
  and summed exactly in int32;
- ``powersgd``: two all-reduces (the ``P`` factors, then the ``Q`` factors),
  vectors riding uncompressed with the first;
- the others (``topk``, ``qsgd``, ``sign``): a sum cannot be taken in their
  form, so every rank's payload is all-gathered, as bytes, and each rank
  decodes and averages them.

Bytes are counted as a ring moves them: an all-reduce of ``b`` bytes sends (and
receives) ``2 (W-1) / W * b`` per rank, an all-gather of ``b`` bytes per rank
``(W-1) * b``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from shoal.compress import Codec, Payload, PowerSGD, Quantize
from shoal.metrics import CommCounter

Items = list[tuple[str, torch.Tensor]]


def ring_allreduce_bytes(num_bytes: int, world_size: int) -> int:
    """Bytes one rank sends (and receives) in a ring all-reduce of ``num_bytes``.

    Reduce-scatter then all-gather: ``2 (W-1) / W`` of the buffer each way.
    """
    if world_size <= 1:
        return 0
    return 2 * (world_size - 1) * num_bytes // world_size


GATHER_BELOW = 512 * 1024
"""Sums that would receive at most this many bytes by all-gather ((W-1) times the
tensor) skip gloo's all-reduce, which takes several rounds of messages: on 2 ranks here
a 38 KB all-reduce took 0.6-1.3 ms, an all-gather 0.4-0.7 ms and one tensor sent each
way 0.17-0.46 ms (from 4 MB up the all-reduce is the fastest)."""


def sum_over_ranks(flat: torch.Tensor, world: int, group: object = None) -> int:
    """Sum the 1-d ``flat`` over all ranks in place (every rank gets the same bits);
    returns the bytes this rank sent (and received). Small tensors on gloo: sent to the
    other rank and added (2 ranks), or all-gathered and added in rank order; otherwise
    an all-reduce."""
    if world <= 1:
        return 0
    nbytes = _nbytes(flat)
    if (world - 1) * nbytes > GATHER_BELOW or dist.get_backend(group) != "gloo":
        dist.all_reduce(flat, group=group)
        return ring_allreduce_bytes(nbytes, world)
    if world == 2 and group is None:
        other = torch.empty_like(flat)
        sending = dist.isend(flat, 1 - dist.get_rank())
        dist.recv(other, 1 - dist.get_rank())
        sending.wait()
        flat.add_(other)  # (a + b is b + a, bit for bit: both ranks get the same sum)
        return nbytes
    rows = flat.new_empty(world, flat.numel())
    dist.all_gather(list(rows.unbind(0)), flat, group=group)
    torch.sum(rows, 0, out=flat)
    return (world - 1) * nbytes


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _allreduce(flat: torch.Tensor, world: int, comm: CommCounter, group: object) -> None:
    wire = ring_allreduce_bytes(_nbytes(flat), world)
    comm.add(sent=wire, received=wire)
    dist.all_reduce(flat, group=group)


def average(
    items: Items,
    codec: Codec,
    world: int,
    comm: CommCounter,
    group: object = None,
    into: bool = False,
) -> list[torch.Tensor]:
    """The mean over all ranks of each ``(key, tensor)``, as float32, through ``codec``.

    Every rank must call it with the same keys and shapes, in the same order. With
    ``into`` (float32 tensors only), means may be written into the given tensors
    (``powersgd``'s matrices are), which are then what is returned.
    """
    if not items:
        return []
    if isinstance(codec, PowerSGD):
        return _average_powersgd(items, codec, world, comm, group, into)
    if isinstance(codec, Quantize):
        return _average_quantized(items, codec, world, comm, group)
    payloads = [codec.encode(key, t) for key, t in items]
    if codec.summable:
        flat = torch.cat([p.tensors[0].reshape(-1) for p in payloads])
        if world > 1:
            _allreduce(flat, world, comm, group)
        out, at = [], 0
        for p in payloads:
            n = p.shape.numel()
            out.append(codec.decode(Payload([flat[at : at + n]], p.shape)) / world)
            at += n
        return out
    return _average_gathered(payloads, codec, world, comm, group)


def _as_bytes(payloads: list[Payload]) -> torch.Tensor:
    return torch.cat(
        [t.contiguous().reshape(-1).view(torch.uint8) for p in payloads for t in p.tensors]
    )


def _from_bytes(buf: torch.Tensor, like: list[Payload]) -> list[Payload]:
    """Payloads shaped like ``like``, read back from a rank's bytes."""
    out, at = [], 0
    for p in like:
        tensors = []
        for t in p.tensors:
            n = _nbytes(t)
            tensors.append(buf[at : at + n].clone().view(t.dtype).reshape(t.shape))
            at += n
        out.append(Payload(tensors, p.shape))
    return out


def _gather(mine: torch.Tensor, world: int, comm: CommCounter, group: object) -> list[torch.Tensor]:
    """Every rank's ``mine`` (bytes of one length), in rank order, counted as sent."""
    if world <= 1:
        return [mine]
    wire = (world - 1) * _nbytes(mine)
    comm.add(sent=wire, received=wire)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    return gathered


def _average_gathered(
    payloads: list[Payload], codec: Codec, world: int, comm: CommCounter, group: object
) -> list[torch.Tensor]:
    mine = _as_bytes(payloads)
    gathered = _gather(mine, world, comm, group)
    sums = [torch.zeros(p.shape, dtype=torch.float32, device=mine.device) for p in payloads]
    for buf in gathered:
        for total, p in zip(sums, _from_bytes(buf, payloads)):
            total += codec.decode(p)
    return [s / world for s in sums]


def _average_powersgd(
    items: Items, codec: PowerSGD, world: int, comm: CommCounter, group: object, into: bool
) -> list[torch.Tensor]:
    low = [i for i, (_, t) in enumerate(items) if codec.compresses(t.shape)]
    rest = [i for i, (_, t) in enumerate(items) if not codec.compresses(t.shape)]
    ps = [codec.project(items[i][0], items[i][1]) for i in low]
    first = torch.cat([p.reshape(-1) for p in ps] + [items[i][1].float().reshape(-1) for i in rest])
    if world > 1:
        _allreduce(first, world, comm, group)
    out: list[torch.Tensor | None] = [None] * len(items)
    at = 0
    p_sums = []
    for p in ps:
        p_sums.append(first[at : at + p.numel()].reshape(p.shape))
        at += p.numel()
    for i in rest:
        t = items[i][1]
        out[i] = first[at : at + t.numel()].reshape(t.shape) / world
        at += t.numel()
    if low:
        qs = [codec.back_project(items[i][0], p) for i, p in zip(low, p_sums)]
        second = torch.cat([q.reshape(-1) for q in qs])
        if world > 1:
            _allreduce(second, world, comm, group)
        at = 0
        for i, q in zip(low, qs):
            q_sum = second[at : at + q.numel()].reshape(q.shape)
            at += q.numel()
            key, t = items[i]
            writable = into and t.dtype == torch.float32 and t.is_contiguous()
            target = t.view(t.shape[0], -1) if writable else None
            out[i] = codec.finish(key, q_sum, world, target).reshape(t.shape)
    return [t for t in out if t is not None]


def _average_quantized(
    items: Items, codec: Quantize, world: int, comm: CommCounter, group: object
) -> list[torch.Tensor]:
    """Shared scales, then every rank's integers summed in int32: the mean is
    ``sum(q) * scale / W`` on every rank, bit for bit, whatever the order of arrival."""
    xs = [codec.residual_added(key, t) for key, t in items]
    flat = torch.cat(xs)
    absmax = codec.absmax(flat)
    if world > 1:
        wire = ring_allreduce_bytes(_nbytes(absmax), world)
        comm.add(sent=wire, received=wire)
        dist.all_reduce(absmax, op=dist.ReduceOp.MAX, group=group)
    scale = codec.scale(absmax)
    q = codec.quantize(flat, scale)
    error = flat - codec.dequantize(q, scale)
    at = 0
    for (key, _), x in zip(items, xs):
        codec.residuals[key] = error[at : at + x.numel()]
        at += x.numel()
    gathered = _gather(codec.pack(q), world, comm, group)
    total = torch.zeros(flat.numel(), dtype=torch.int32, device=flat.device)
    for buf in gathered:
        total += codec.unpack(buf, flat.numel())
    mean = codec.dequantize(total, scale) / world
    out, at = [], 0
    for _, t in items:
        out.append(mean[at : at + t.numel()].reshape(t.shape))
        at += t.numel()
    return out
