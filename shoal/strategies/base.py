"""The strategy protocol: the one seam between the trainer and distribution.

A strategy owns the model replica (or shard), the optimizer and the
communication. The trainer hands it batches and asks for its state; it never
asks which strategy it is talking to.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from shoal import checkpoint
from shoal.config import JobConfig
from shoal.data import GlobalBatchSampler, StepWork, Work
from shoal.dist import CollectiveGatherer, DistEnv
from shoal.memory import ActivationMeter, state_bytes
from shoal.metrics import CommCounter, Gatherer, PhaseTimer

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]
"""Maps (model, batch) to the loss of every sample in the batch."""


class Strategy(ABC):
    """One way of spreading training over processes.

    Lifecycle: ``__init__`` -> :meth:`setup` -> (:meth:`load_state_dict`) ->
    :meth:`work` -> :meth:`train_step` per task it hands out -> :meth:`close`. Implementations count
    the bytes they put on and take off the wire in :attr:`comm`.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    needs_process_group: ClassVar[bool] = True
    """Whether workers join a torch.distributed process group (collective strategies)."""
    default_optimizer: ClassVar[str | None] = None
    """The ``--optimizer`` this strategy uses when none is given."""
    remote_tables: ClassVar[bool] = False
    """Whether embedding tables live elsewhere (built unallocated: see ``remote_tables``)."""
    prefetches: ClassVar[bool] = False
    """Whether :meth:`prefetch` wants to see the next batch while this one computes."""

    @classmethod  # noqa: B027 - an optional hook: most strategies accept every job
    def check(cls, job: JobConfig) -> None:
        """Refuse, with a :class:`~shoal.errors.UserError`, a job this strategy cannot run.

        Called before anything is written, so a mistake leaves no trace.
        """

    @classmethod
    def checkpoint_root(cls, run_dir: Path) -> Path:
        """Where ``--resume`` finds this strategy's checkpoints (in ``ROOT/checkpoints``)."""
        return run_dir

    @classmethod
    def launch(cls, job: JobConfig, config_path: str) -> None:
        """Start this node's processes and wait for them (default: torchrun's agent)."""
        from shoal.launch import launch

        launch(job.cluster, config_path)

    @classmethod
    def run_role(cls, role: str, job: JobConfig, env: DistEnv) -> None:
        """Entry point of a process that is not a training worker (a server, say)."""
        raise ValueError(f"strategy {cls.name} has no role {role!r}")

    sharded_checkpoints: ClassVar[bool] = False
    """Whether each rank writes its own part of the state (DCP, :meth:`save_shards`)."""
    reads_shards: ClassVar[bool] = False
    """Whether it can resume from a checkpoint a sharded strategy wrote (:meth:`load_shards`)."""

    def __init__(self, job: JobConfig, env: DistEnv) -> None:
        self.job = job
        self.env = env
        self.comm = CommCounter()
        self.activations = ActivationMeter()
        """Measures the activations each forward saves for backward (see the trainer)."""

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
    def setup(self, model: nn.Module, total_steps: int) -> None:
        """Take ownership of ``model`` (already on ``env.device``) and build the optimizer."""

    @abstractmethod
    def train_step(
        self, batch: Batch, loss_fn: LossFn, loss_scale: float, timer: PhaseTimer
    ) -> torch.Tensor:
        """Run one task: this rank's part of a global step's batch.

        ``loss_scale`` turns the part's loss *sum* into its share of the global
        mean (see :attr:`shoal.data.Task.loss_scale`). Returns the detached loss
        sum over the part's samples, for logging.
        """

    @abstractmethod
    def eval_model(self) -> nn.Module:
        """The full, unwrapped model as a plain module, for evaluation and export."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: model, optimizer, schedule, extras."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    @property
    @abstractmethod
    def lr(self) -> float:
        """The learning rate of the step about to run."""

    def work(self, sampler: GlobalBatchSampler, step: int, total_steps: int) -> Work:
        """What this worker computes; by default its own slice of every global step."""
        return StepWork(sampler, step, total_steps, self.job.train.log_every)

    def prefetch(self, batch: Batch) -> None:  # noqa: B027 - optional hook
        """Start fetching what the next step's ``batch`` will need (see :attr:`prefetches`)."""

    example: Batch | None = None
    """A few training samples, set by the trainer before :meth:`setup`, for strategies
    that measure the model before they split it."""

    def totals(self) -> list[float]:
        """Figures of this rank for the summary, gathered at the end (see :meth:`summarize`)."""
        return []

    def summarize(self, rows: torch.Tensor) -> dict[str, Any]:
        """Entries for ``summary.json`` from every rank's :meth:`totals` (one row each)."""
        return {}

    def gatherer(self) -> Gatherer:
        """Where per-rank telemetry goes; by default a collective to rank 0."""
        return CollectiveGatherer(self.env)

    def close(self) -> None:  # noqa: B027 - optional hook, most strategies hold nothing
        """Release sockets, threads and hooks."""
