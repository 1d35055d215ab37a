"""shoal for people who keep their own training loop.

A plain ``torchrun`` script changes by a few lines::

    from shoal import api as shoal

    env = shoal.init()                                  # process group, device, threads
    model = shoal.wrap_model(model.to(env.device), env) # DDP + shoal's comm hook
    sampler = shoal.GlobalBatchSampler(len(x), batch_size=64, rank=env.rank,
                                       world_size=env.world_size, seed=0, drop_last=True)
    for step in range(steps):
        idx, global_batch = sampler.next_batch()
        loss = loss_fn(model(x[idx]), y[idx], reduction="sum") * sampler.loss_scale(global_batch)
        ...
    print(shoal.comm_bytes(model))                      # bytes this rank sent / received

``GlobalBatchSampler`` also works as ``DataLoader(dataset, batch_sampler=sampler)``;
then every batch of an epoch but the last holds ``batch_size`` samples in all,
so ``loss_scale(batch_size)`` is exact (use ``drop_last=True`` to make it exact
for the last one too).
"""

from __future__ import annotations

from torch import nn

from shoal.data.sampler import GlobalBatchSampler
from shoal.dist import DistEnv, init, shutdown
from shoal.metrics import CommCounter
from shoal.strategies.allreduce import wrap_ddp

__all__ = ["DistEnv", "GlobalBatchSampler", "comm_bytes", "init", "shutdown", "wrap_model"]

_COUNTERS: dict[int, CommCounter] = {}


def wrap_model(model: nn.Module, env: DistEnv, bucket_mb: float = 25.0) -> nn.Module:
    """Wrap ``model`` (already on ``env.device``) for synchronous data parallel.

    Returns a ``DistributedDataParallel`` whose gradient all-reduce goes through
    shoal's communication hook, so that :func:`comm_bytes` can report traffic.
    """
    counter = CommCounter()
    ddp, _ = wrap_ddp(model, env, bucket_mb, counter)
    _COUNTERS[id(ddp)] = counter
    return ddp


def comm_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes sent, bytes received) by this rank through a :func:`wrap_model` model."""
    counter = _COUNTERS.get(id(model))
    if counter is None:
        raise ValueError("model was not wrapped by shoal.api.wrap_model")
    return counter.sent, counter.received
