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
