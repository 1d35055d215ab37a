"""Sums over ranks in real gloo groups: every path gives every rank the same bits."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch
import torch.distributed as dist

from shoal.strategies.collectives import GATHER_BELOW, ring_allreduce_bytes, sum_over_ranks
from tests.conftest import free_port

SIZES = (1, 9610, GATHER_BELOW // 4 + 1000)  # swapped or gathered (small), all-reduced


def _rank(rank: int, world: int, port: int, out: mp.Queue) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        results = []
        for n in SIZES:
            flat = torch.randn(n, generator=torch.Generator().manual_seed(rank + 10 * n))
            sent = sum_over_ranks(flat, world)
            results.append((flat.numpy(), sent))  # (numpy: pickled whole, not shared)
        out.put((rank, results))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("world", [2, 3])
def test_every_rank_gets_the_same_sum_and_the_bytes_are_counted(world):
    ctx = mp.get_context("spawn")
    out, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, out)) for r in range(world)]
    for proc in procs:
        proc.start()
    results = dict(out.get(timeout=50) for _ in procs)
    for proc in procs:
        proc.join(timeout=10)
    for i, n in enumerate(SIZES):
        inputs = [torch.randn(n, generator=torch.Generator().manual_seed(r + 10 * n))
                  for r in range(world)]  # fmt: skip
        sums = [torch.from_numpy(results[r][i][0]) for r in range(world)]
        for s in sums[1:]:
            assert torch.equal(s, sums[0])  # the same bits everywhere
        torch.testing.assert_close(sums[0], sum(inputs), rtol=1e-6, atol=1e-6)
        nbytes = 4 * n
        small = (world - 1) * nbytes <= GATHER_BELOW
        expected = (world - 1) * nbytes if small else ring_allreduce_bytes(nbytes, world)
        assert all(results[r][i][1] == expected for r in range(world))


def _quantized_rank(rank: int, world: int, port: int, spec: str, out: mp.Queue) -> None:
    from shoal.compress import parse_codec
    from shoal.metrics import CommCounter
    from shoal.strategies.collectives import average

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        codec, comm = parse_codec(spec), CommCounter()
        items = [(k, _quantized_input(rank, k, n)) for k, n in QUANTIZED]
        means = average(items, codec, world, comm)
        out.put((rank, [m.numpy() for m in means], comm.sent,
                 [codec.residuals[k].numpy() for k, _ in QUANTIZED]))  # fmt: skip
    finally:
        dist.destroy_process_group()


QUANTIZED = (("w", 3000), ("b", 7))
"""Two tensors, across three chunks of 1,024 entries (the last one partly filled)."""


def _quantized_input(rank: int, key: str, n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(rank * 7 + n)
    return torch.randn(n, generator=gen) * (rank + 1)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("spec", ["int8", "int4"])
def test_a_quantized_average_sums_the_ranks_integers_exactly(spec):
    """int8 / int4 over 3 real gloo ranks: every rank gets the same bits, equal to
    ``sum(q_r) * scale / 3`` with the scale of each chunk from its largest magnitude on
    any rank; each rank keeps what its rounding dropped, and the wire carries one byte
    (or half of one) per entry."""
    world = 3
    ctx = mp.get_context("spawn")
    out, port = ctx.Queue(), free_port()
    procs = [
        ctx.Process(target=_quantized_rank, args=(r, world, port, spec, out)) for r in range(world)
    ]
    for proc in procs:
        proc.start()
    results = dict((r, rest) for r, *rest in (out.get(timeout=50) for _ in procs))
    for proc in procs:
        proc.join(timeout=10)
    qmax = 127 if spec == "int8" else 7
    xs = [torch.cat([_quantized_input(r, k, n) for k, n in QUANTIZED]) for r in range(world)]
    n = xs[0].numel()
    padded = torch.stack([torch.cat([x.abs(), x.new_zeros(-n % 1024)]) for x in xs])
    scale = (padded.amax(0).reshape(-1, 1024).amax(1) / qmax).repeat_interleave(1024)[:n]
    qs = [torch.round(x / scale).clamp(-qmax, qmax) for x in xs]
    want = (sum(q.to(torch.int32) for q in qs).float() * scale) / world
    for r in range(world):
        got = torch.cat([torch.from_numpy(m) for m in results[r][0]])
        assert torch.equal(got, want), (r, (got - want).abs().max())
        residual = torch.cat([torch.from_numpy(e) for e in results[r][2]])
        assert torch.equal(residual, xs[r] - qs[r] * scale)
        packed = n if spec == "int8" else (n + 1) // 2
        assert results[r][1] == ring_allreduce_bytes(4 * 3, world) + (world - 1) * packed
    exact = sum(xs) / world
    assert (want - exact).abs().max() <= scale.max() / 2 + 1e-6  # within half a step
