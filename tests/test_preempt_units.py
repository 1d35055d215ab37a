"""The preemption agreement between ranks: not every step, but at the same steps on
every rank, whatever each rank's own step time proposes."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import pytest
import torch.distributed as dist

from shoal import preempt
from tests.conftest import free_port


def _rank(rank: int, port: int, signal_at: int, out: mp.Queue) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    p = preempt.Preemption()
    agreed, stopped = [], None
    try:
        for step in range(1, 400):
            time.sleep(0.002 if rank == 0 else 0.009)  # rank 1 is the slow one
            if rank == 1 and step == signal_at:
                os.kill(os.getpid(), signal.SIGTERM)  # only this rank is told
            before = p.steps
            told = p.poll(may_stop=step % 3 != 0)  # some steps cannot stop
            if p.steps < before or told:  # an agreement was read or started here
                agreed.append(step)
            if told:
                stopped = (step, told[0])
                break
    finally:
        p.restore()
        dist.destroy_process_group()
    out.put((rank, agreed, stopped, p.steps_apart))


@pytest.mark.timeout(60)
def test_ranks_agree_at_the_same_steps_and_stop_together():
    ctx = mp.get_context("spawn")
    out, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, 150, out)) for r in range(2)]
    for proc in procs:
        proc.start()
    results = dict((r, rest) for r, *rest in (out.get(timeout=50) for _ in procs))
    for proc in procs:
        proc.join(timeout=10)
    (agreed0, stopped0, apart0), (agreed1, stopped1, apart1) = results[0], results[1]
    assert agreed0 == agreed1  # the same collectives at the same steps
    assert stopped0 == stopped1 and stopped0[1] == "SIGTERM", (stopped0, stopped1)
    assert 150 < stopped0[0] <= 150 + 2 * preempt.MAX_STEPS_APART + 3
    assert all(s % 3 for s in agreed0)  # never at a step that cannot stop
    # the slow rank's proposal wins: ~0.2 s / 9+ ms per step, not 0.2 s / 2 ms
    assert apart0 == apart1 and 5 <= apart0 <= 0.2 / 0.009 + 1, apart0
    assert len(agreed0) < 150 / 4  # far fewer collectives than steps
