"""The strategy protocol: the one seam between the trainer and distribution.

A strategy owns the model replica (or shard), the optimizer and the
communication. The trainer hands it batches and asks for its state; it never
asks which strategy it is talking to.
"""

from __future__ import annotations

import contextlib
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from shoal import checkpoint
from shoal.config import JobConfig
from shoal.data import GlobalBatchSampler, StepWork, Work
from shoal.dist import INPLACE_STORE_ENV, CollectiveGatherer, DistEnv
from shoal.memory import ActivationMeter, state_bytes
from shoal.metrics import CommCounter, Gatherer, PhaseTimer
from shoal.telemetry import Totals

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]
"""Maps (model, batch) to the loss of every sample in the batch."""


class Strategy(ABC):
    """The runtime side of one way of spreading training over processes: what trains
    inside each worker (its declaration is a :class:`~shoal.strategies.plugin.Plugin`).

    Lifecycle: ``__init__`` -> :meth:`setup` -> (:meth:`load_state_dict`) ->
    :meth:`work` -> :meth:`train_step` per task it hands out -> :meth:`close`. Implementations count
    the bytes they put on and take off the wire in :attr:`comm`.
    """

    model: nn.Module
    """This rank's model (replica, shard or stages), set by :meth:`setup`."""
    optimizer: torch.optim.Optimizer
    """The optimizer of :attr:`model`'s parameters, built by :meth:`setup`."""
    scheduler: torch.optim.lr_scheduler.LRScheduler
    """The learning-rate schedule of :attr:`optimizer`."""
    prefetches: ClassVar[bool] = False
    """Whether :meth:`prefetch` wants to see the next batch once this step is done."""
    draws_global_batches: ClassVar[bool] = True
    """Whether its steps are the sampler's global batches (counted per epoch and checked
    by digest); federated rounds draw clients instead."""
    micro_batches: int = 1
    """Micro-batches the next step's slice is cut into, its gradients accumulating (set
    by the trainer from ``--max-rank-batch``: the same on every rank)."""
    data: Any = None
    """The training data (a :class:`~shoal.data.Dataset`), set by the trainer before
    :meth:`setup`: for strategies that choose their own rows (federated clients)."""
    compute_time: float = 0.0
    """Seconds this rank computed in its last step, forward and backward, not waiting
    for its peers (what the ``slow`` fault scales)."""
    wait_time: float = 0.0
    """Seconds of the last step spent in the gradient exchange after this rank's own
    compute: waiting for slower peers, and the exchange itself. ``--balance auto``
    leaves it out of the rank's busy time."""

    def __init__(self, job: JobConfig, env: DistEnv) -> None:
        self.job = job
        self.env = env
        self.options: Any = job.strategy.options
        """This strategy's section of the job (its plugin's ``Config``)."""
        self.comm = CommCounter()

    @property
    def data_rank(self) -> tuple[int, int]:
        """(index, count) of this rank's slice of each global batch: ranks that hold
        parts of one model replica (pipeline stages, tensor shards) share a slice."""
        return self.env.rank, self.env.world_size

    @property
    def reports(self) -> bool:
        """Whether this rank's loss and sample counts stand for its slice (one rank of
        those sharing a slice does)."""
        return True

    def memory(self) -> dict[str, int]:
        """Bytes of parameters, gradients and optimizer state this rank holds."""
        return state_bytes(self.model.parameters(), getattr(self, "optimizer", None))

    def save_shards(self, directory: Path) -> None:
        """Write the model and optimizer with DCP, each rank its own part. Collective."""
        checkpoint.write_shards(directory, self.model, self.optimizer)

    def load_shards(self, directory: Path) -> None:
        """Load a DCP checkpoint written under any layout into this one. Collective."""
        checkpoint.read_shards(directory, self.model, self.optimizer)

    @abstractmethod
    def setup(
        self, model: nn.Module, total_steps: int, example: Batch, activations: ActivationMeter
    ) -> None:
        """Take ownership of ``model`` (already on ``env.device``) and build the optimizer.

        ``example`` is a few training samples, for strategies that measure the model
        before they split it; ``activations`` is the trainer's meter of what forward
        saves for backward, for strategies that run the model themselves."""

    @abstractmethod
    def train_step(
        self, batch: Batch, loss_fn: LossFn, loss_scale: float, timer: PhaseTimer
    ) -> torch.Tensor:
        """Run one task: this rank's part of a global step's batch.

        ``loss_scale`` turns the part's loss *sum* into its share of the global
        mean (see :attr:`shoal.data.Task.loss_scale`). Returns the detached loss
        sum over the part's samples, for logging.
        """

    def optimizer_step(
        self,
        module: nn.Module,
        batch: Batch,
        loss_fn: LossFn,
        loss_scale: float,
        timer: PhaseTimer,
        sync: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        """The step most strategies share: zero the gradients, forward and the scaled
        backward of ``module`` on ``batch``, ``sync`` (a gradient exchange, timed as
        ``comm``), then the optimizer and scheduler step. Returns the loss sum."""
        self.optimizer.zero_grad(set_to_none=True)
        before = timer.totals["forward_backward"]
        with timer.phase("forward_backward"):
            loss_sum = self.forward_backward(module, batch, loss_fn, loss_scale)
        self.compute_time = timer.totals["forward_backward"] - before
        self.wait_time = 0.0
        if sync is not None:
            before = timer.totals["comm"]
            with timer.phase("comm"):
                sync()
            self.wait_time = timer.totals["comm"] - before
        with timer.phase("optimizer"):
            self.optimizer.step()
            self.scheduler.step()
        return loss_sum

    def forward_backward(
        self, module: nn.Module, batch: Batch, loss_fn: LossFn, loss_scale: float
    ) -> torch.Tensor:
        """Forward and the scaled backward of ``batch``, as :attr:`micro_batches` whose
        gradients accumulate (the gradient exchange deferred to the last one by
        :meth:`accumulating`). Returns the loss sum, detached."""
        parts = self.micro_batches
        if parts <= 1:
            loss_sum = loss_fn(module, batch).sum()
            (loss_sum * loss_scale).backward()
            return loss_sum.detach()
        total = torch.zeros((), dtype=torch.float64, device=batch[1].device)
        pieces = zip(*(t.tensor_split(parts) for t in batch))
        for i, piece in enumerate(pieces):
            with self.accumulating(module) if i < parts - 1 else contextlib.nullcontext():
                loss_sum = loss_fn(module, piece).sum()  # type: ignore[arg-type]
                (loss_sum * loss_scale).backward()
            total += loss_sum.detach()
        return total

    def accumulating(self, module: nn.Module) -> contextlib.AbstractContextManager:
        """A context in which backward accumulates gradients without exchanging them
        (DDP's ``no_sync``); by default nothing: the exchange comes after backward."""
        return contextlib.nullcontext()

    def eval_model(self) -> nn.Module:
        """The full, unwrapped model as a plain module, for evaluation and export."""
        return self.model

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly (by default model, optimizer, schedule)."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (the model and optimizer may come
        from a sharded checkpoint instead: see :meth:`load_shards`)."""
        if "model" in state:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def release(self) -> None:  # noqa: B027 - optional hook
        """Let go of the process group (``--recovery inplace``: the group is about to
        end; nothing of this strategy may hold it, or its connections stay open)."""

    @property
    def in_place(self) -> bool:
        """Whether a lost worker is recovered in place (this process runs under shoal's
        in-place launcher): the state :meth:`rollback` needs is kept."""
        return INPLACE_STORE_ENV in os.environ

    def regroup(self, env: DistEnv) -> None:
        """Go on in the process group now current (``--recovery inplace``), as rank
        ``env.rank`` of ``env.world_size``; the model and optimizer stay."""
        raise NotImplementedError(f"{type(self).__name__} cannot change its group")

    def lent_state(self) -> dict[str, Any] | None:
        """What :meth:`state_dict` would say, made of tensors that stay as they are while
        training goes on, until :meth:`lend`'s send is done (``--recovery inplace``: a
        newcomer's state then travels while this replica trains); None (the default)
        when there are none, and the state is sent while this replica waits."""
        return None

    def lend(self, posted: Any) -> None:
        """``posted`` (a :class:`shoal.inplace.state.Posted`) sends :meth:`lent_state`:
        keep its tensors as they are until it is done (by default: wait for it now)."""
        posted.wait()

    def rollback(self) -> None:  # noqa: B027 - optional hook
        """Go back to the state after the newest step :meth:`consistent_after` holds for
        (``--recovery inplace``: the steps after it are trained again, in the next
        generation; by default nothing: every step is consistent, and a failed exchange
        leaves nothing of its step applied)."""

    @property
    def lr(self) -> float:
        """The learning rate of the step about to run."""
        return self.optimizer.param_groups[0]["lr"]

    def work(self, sampler: GlobalBatchSampler, step: int, total_steps: int) -> Work:
        """What this worker computes; by default its own slice of every global step."""
        return StepWork(sampler, step, total_steps, self.job.train.log_every)

    def consistent_after(self, step: int) -> bool:
        """Whether a checkpoint after global ``step`` holds one consistent model, so a
        preemption may stop there, and an in-place job that loses a member goes on from
        there (strategies whose replicas meet every H steps: only then)."""
        return True

    def prefetch(self, batch: Batch) -> None:  # noqa: B027 - optional hook
        """Start fetching what the next step's ``batch`` will need (see :attr:`prefetches`)."""

    def totals(self) -> dict[str, float]:
        """Figures of this rank for the summary, gathered at the end (see :meth:`summarize`)."""
        return {}

    def summarize(self, totals: list[Totals]) -> dict[str, Any]:
        """Entries for ``summary.json`` from every rank's totals (:meth:`totals` is their
        ``own``)."""
        return {}

    def metrics(self) -> dict[str, float]:
        """Figures of the whole job for each metrics record and the progress line (the
        same on every rank), such as the privacy budget spent so far."""
        return {}

    def gatherer(self) -> Gatherer:
        """Where per-rank telemetry goes; by default a collective to rank 0."""
        return CollectiveGatherer(self.env)

    def close(self) -> None:  # noqa: B027 - optional hook, most strategies hold nothing
        """Release sockets, threads and hooks."""
