"""Synchronous data parallel: PyTorch DDP with a shoal communication hook.

DDP buckets gradients and starts each bucket's all-reduce as soon as backward
has filled it, overlapping communication with the rest of backward. shoal adds
one thing: its own comm hook (:func:`allreduce_hook`), which counts the bytes
each worker sends and receives and the time the collectives take. It is also
the seam where gradient compression plugs in: a hook that encodes the bucket
before the collective and decodes it after.
"""

# No "from __future__ import annotations": DDP inspects the hook's real annotations.

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from shoal import privacy
from shoal.compress import COMPRESS_HELP, Codec, TopK, parse_codec
from shoal.config import JobConfig, option
from shoal.dist import DistEnv
from shoal.errors import UserError
from shoal.memory import ActivationMeter
from shoal.metrics import CommCounter, PhaseTimer
from shoal.optim import build_optimizer, build_scheduler
from shoal.strategies import plugin
from shoal.strategies.base import Batch, LossFn, Strategy
from shoal.strategies.collectives import average, ring_allreduce_bytes
from shoal.strategies.dgc import SparseUpdates


@dataclass
class HookState:
    """What the hooks need: the group, where to count, and (compressed) the codec."""

    world_size: int
    comm: CommCounter
    timer: PhaseTimer | None = None
    group: dist.ProcessGroup | None = None
    codec: Codec | None = None
    names: dict[int, str] = field(default_factory=dict)  # id(parameter) -> its name
    ready: float = 0.0
    """When the newest bucket was ready, less the time hooks blocked before it: the end
    of this rank's own compute in the step, whatever its peers do."""
    blocked: float = 0.0
    """Seconds hooks spent in collectives that block (compressed codecs), this step."""
    tolerant: bool = False
    """A failed exchange is noted in :attr:`failed` rather than raised in backward
    (``--recovery inplace``: an error raised there would keep the group alive through
    the reducer's reference to it, and the step is abandoned anyway)."""
    failed: str = ""
    """The first error of this step's exchange (tolerant hooks)."""


def _value(state: HookState, f: torch.futures.Future, fallback: torch.Tensor) -> torch.Tensor:
    """The all-reduced bucket; where the exchange failed and the hooks are tolerant,
    the bucket as it was (the step is not applied: see :attr:`HookState.failed`)."""
    try:
        return f.value()[0]
    except Exception as e:
        if not state.tolerant:
            raise
        state.failed = state.failed or str(e).splitlines()[0]
        return fallback


def allreduce_hook(state: HookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average one gradient bucket over all ranks, counting bytes and time."""
    start = time.perf_counter()
    state.ready = start - state.blocked
    buffer = bucket.buffer()
    buffer.div_(state.world_size)
    wire = ring_allreduce_bytes(buffer.numel() * buffer.element_size(), state.world_size)
    state.comm.add(sent=wire, received=wire)
    fut = dist.all_reduce(buffer, group=state.group, async_op=True).get_future()

    def done(f: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
        if state.timer is not None:
            state.timer.add("comm", time.perf_counter() - start)
        return _value(state, f, buffer)

    return fut.then(done)


def compressed_hook(
    state: HookState, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """Average one bucket through the codec, parameter by parameter (error feedback is
    kept per parameter). Runs its collectives at once: no overlap with backward, except
    for summable codecs (fp16, bf16), which all-reduce the bucket asynchronously."""
    assert state.codec is not None
    if state.codec.summable:
        return _summable_hook(state, bucket)
    start = time.perf_counter()
    state.ready = start - state.blocked
    grads = bucket.gradients()
    keys = [state.names[id(p)] for p in bucket.parameters()]
    try:
        items = list(zip(keys, grads))
        means = average(items, state.codec, state.world_size, state.comm, state.group, into=True)
    except Exception as e:
        if not state.tolerant:
            raise
        state.failed = state.failed or str(e).splitlines()[0]
        means = grads
    for g, m in zip(grads, means):
        if m.data_ptr() != g.data_ptr():  # (powersgd wrote its matrices in place)
            g.copy_(m.reshape(g.shape))
    state.blocked += time.perf_counter() - start
    if state.timer is not None:
        state.timer.add("comm", time.perf_counter() - start)
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def _summable_hook(state: HookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """fp16/bf16: the whole bucket in half precision, all-reduced while backward goes on."""
    assert state.codec is not None
    start = time.perf_counter()
    state.ready = start - state.blocked
    buffer = bucket.buffer()
    payload = state.codec.encode(f"bucket{bucket.index()}", buffer.div_(state.world_size))
    half = payload.tensors[0]
    wire = ring_allreduce_bytes(half.numel() * half.element_size(), state.world_size)
    state.comm.add(sent=wire, received=wire)
    fut = dist.all_reduce(half, group=state.group, async_op=True).get_future()

    def done(f: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
        _value(state, f, half)
        buffer.copy_(state.codec.decode(payload).reshape(buffer.shape))  # type: ignore[union-attr]
        if state.timer is not None:
            state.timer.add("comm", time.perf_counter() - start)
        return buffer

    return fut.then(done)


def wrap_ddp(
    model: nn.Module, env: DistEnv, bucket_mb: float, comm: CommCounter, codec: Codec | None = None
) -> tuple[DDP, HookState]:
    """``model`` in DDP, its gradients averaged by :func:`allreduce_hook` (or, with a
    codec other than ``none``, :func:`compressed_hook`), counting into ``comm``."""
    ddp = DDP(
        model,
        device_ids=[env.device] if env.device.type == "cuda" else None,
        bucket_cap_mb=bucket_mb,
        gradient_as_bucket_view=True,
    )
    state = HookState(env.world_size, comm)
    if codec is None or codec.name == "none":
        ddp.register_comm_hook(state, allreduce_hook)
    else:
        state.codec = codec
        state.names = {id(p): n for n, p in model.named_parameters()}
        ddp.register_comm_hook(state, compressed_hook)
    return ddp, state


@dataclass
class AllReduceConfig:
    """[strategy.allreduce]"""

    bucket_mb: float = option(
        25.0, "gradient bucket size in MB for all-reduce overlap", above=0, high=1e5
    )
    compress: str = option(
        "none",
        COMPRESS_HELP + "; allreduce's topk sends each worker's optimizer step (as DGC)",
    )


class AllReduce(Strategy):
    """Synchronous data parallel over ring all-reduce (DDP), gloo or NCCL.

    With ``--compress topk:R`` the gradient is not what travels: each rank steps its
    own optimizer and the update goes out top-k with error feedback
    (:mod:`shoal.strategies.dgc`), outside DDP.
    """

    options: AllReduceConfig
    sparse: SparseUpdates | None = None

    def setup(
        self, model: nn.Module, total_steps: int, example: Batch, activations: ActivationMeter
    ) -> None:
        self.model = model
        self.codec = parse_codec(self.options.compress, seed=self.job.train.seed + self.env.rank)
        self.optimizer = build_optimizer(model.parameters(), self.job.optim)
        self.scheduler = build_scheduler(self.optimizer, self.job.optim, total_steps)
        if isinstance(self.codec, TopK):
            self.sparse = SparseUpdates(model, self.optimizer, self.codec, self.comm)
        if dist.is_initialized():  # (an in-place job's worker joins its group later)
            self.regroup(self.env)

    def release(self) -> None:
        self.ddp = None  # (DDP's reducer holds the group)

    def regroup(self, env: DistEnv) -> None:
        self.env = env
        if self.sparse is not None:
            return  # (no DDP: the default group carries the updates)
        self.ddp, self.hook_state = wrap_ddp(
            self.model, env, self.options.bucket_mb, self.comm, self.codec
        )
        self.hook_state.tolerant = self.in_place

    def _exchanged(self) -> None:
        """After backward: raise if the gradient exchange failed (tolerant hooks)."""
        if self.hook_state.failed:
            raise RuntimeError(f"the gradient exchange failed: {self.hook_state.failed}")

    def train_step(
        self, batch: Batch, loss_fn: LossFn, loss_scale: float, timer: PhaseTimer
    ) -> torch.Tensor:
        if self.sparse is not None:
            return self._sparse_step(self.sparse, batch, loss_fn, loss_scale, timer)
        state = self.hook_state
        state.timer, state.ready, state.blocked, state.failed = timer, 0.0, 0.0, ""
        start = time.perf_counter()
        check = self._exchanged if state.tolerant else None
        loss_sum = self.optimizer_step(self.ddp, batch, loss_fn, loss_scale, timer, check)
        if state.ready:  # backward's own compute ended with its last bucket, and the
            # rest of backward waited for the all-reduce (a slower peer, the exchange)
            computed = state.ready - start
            self.wait_time = max(0.0, self.compute_time - computed)
            self.compute_time = computed
        return loss_sum

    def _sparse_step(
        self,
        sparse: SparseUpdates,
        batch: Batch,
        loss_fn: LossFn,
        loss_scale: float,
        timer: PhaseTimer,
    ) -> torch.Tensor:
        """Forward and backward on this rank's slice, this rank's own optimizer step,
        then the ranks' compressed updates averaged in its place."""
        self.optimizer.zero_grad(set_to_none=True)
        before = timer.totals["forward_backward"]
        with timer.phase("forward_backward"):
            loss_sum = self.forward_backward(self.model, batch, loss_fn, loss_scale)
        self.compute_time = timer.totals["forward_backward"] - before
        with timer.phase("optimizer"):
            sparse.keep()
            self.optimizer.step()
            self.scheduler.step()
        before = timer.totals["comm"]
        with timer.phase("comm"):
            sparse.exchange(self.env.world_size)
        self.wait_time = timer.totals["comm"] - before
        return loss_sum

    def accumulating(self, module: nn.Module) -> contextlib.AbstractContextManager:
        if self.sparse is not None:
            return contextlib.nullcontext()  # (no DDP: nothing is exchanged in backward)
        return self.ddp.no_sync()

    def close(self) -> None:
        if self.sparse is None:
            self.hook_state.timer = None
        self.ddp = None  # releases DDP's reducer, its buckets and pending futures

    # state: the default (error-feedback residuals differ per rank, restart at zero)


class Plugin(plugin.Plugin):
    name = "allreduce"
    description = "synchronous data parallel: DDP, bucketed all-reduce overlapped with backward"
    Config = AllReduceConfig
    runtime = AllReduce
    reads_shards = True
    reads = (*plugin.Plugin.reads, *plugin.IN_PLACE_READS)
    recovers_in_place = True
    balance_modes = ("equal", "static", "auto")
    micro_batching = True
    privacy = "sample"

    def check(self, job: JobConfig) -> None:
        super().check(job)
        if privacy.budget(job.train).enabled:
            t, given = job.train, []
            if t.balance != "equal":
                given.append("--balance")
            if t.max_rank_batch:
                given.append("--max-rank-batch")
            if self.options(job).compress != "none":
                given.append("--compress")
            if given:
                raise UserError(f"DP-SGD (--dp-clip) runs without {' and '.join(given)}")

    def check_model(self, job: JobConfig, model: Any) -> None:
        if privacy.budget(job.train).enabled:
            from opacus.validators import ModuleValidator

            errors = ModuleValidator.validate(model, strict=False)
            if errors:
                raise UserError(f"DP-SGD cannot train this model: {errors[0]}")

    def build(self, job: JobConfig, env: DistEnv) -> Strategy:
        if privacy.budget(job.train).enabled:
            from shoal.strategies.dpsgd import DPSGD

            return DPSGD(job, env)
        return self.runtime(job, env)
