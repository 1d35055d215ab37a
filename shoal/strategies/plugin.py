"""A strategy's declaration: what it is called, its options, its checks, how it runs.

A strategy is one module with two objects: a :class:`Plugin` (this class: the
name, the ``[strategy.NAME]`` section as a dataclass, every check of a job,
how its processes start, its rows in the summary) and the runtime
:class:`~shoal.strategies.base.Strategy` that trains inside each worker. The
command line, the TOML file, ``shoal train`` and the worker only talk to
these two; none of them asks which strategy it is.

Users bring their own the way they bring a model: ``--strategy
package.module:Plugin`` names a subclass (or an instance) of :class:`Plugin`.
See ``docs/STRATEGIES.md``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from shoal.config import JobConfig
from shoal.dist import DistEnv
from shoal.errors import UserError
from shoal.strategies.base import Strategy

IN_PLACE_READS = ("cluster.recovery", "cluster.spares", "strategy.collective_timeout")
"""The settings a strategy that :attr:`Plugin.recovers_in_place` reads."""
RESTART_READS = ("cluster.recovery",)
"""What a collective strategy that recovers only by restart reads: ``--recovery restart``
is accepted, ``inplace`` refused with :attr:`Plugin.restart_only`."""


@dataclasses.dataclass
class NoOptions:
    """The section of a strategy without options of its own."""


class Plugin:
    """One strategy, declared: subclass it and set the class attributes.

    Every method has a default that suits a data-parallel strategy trained by
    torchrun's agent; override what differs.
    """

    name: ClassVar[str]
    """What ``--strategy`` and the ``[strategy.NAME]`` section call it."""
    description: ClassVar[str] = ""
    """One line for ``shoal train --help``."""
    Config: ClassVar[type] = NoOptions
    """The dataclass of its options: each field one flag (``config._f`` gives help,
    ranges and choices) and one key of ``[strategy.NAME]``."""
    runtime: ClassVar[type[Strategy]]
    """The object that trains inside each worker."""
    needs_process_group: ClassVar[bool] = True
    """Whether workers join a torch.distributed process group."""
    default_optimizer: ClassVar[str | None] = None
    """The ``--optimizer`` it uses when none is given."""
    default_lr: ClassVar[float] = 0.05
    """The ``--lr`` that goes with :attr:`default_optimizer` when neither is given."""
    remote_tables: ClassVar[bool] = False
    """Whether embedding tables live elsewhere (built unallocated: ``remote_tables``)."""
    sharded_checkpoints: ClassVar[bool] = False
    """Whether each rank writes its own part of the state (DCP)."""
    reads_shards: ClassVar[bool] = False
    """Whether it resumes from checkpoints a sharded strategy wrote."""
    balance_modes: ClassVar[tuple[str, ...]] = ("equal",)
    """The ``--balance`` modes it runs (see :mod:`shoal.balance`): ``static`` where its
    data-parallel slices may differ in size, ``auto`` where its :attr:`Strategy.wait_time
    <shoal.strategies.base.Strategy.wait_time>` holds a step's waits on data-parallel peers,
    so that the rest of the step is the rank's own work."""
    micro_batching: ClassVar[bool] = False
    """Whether it cuts a slice into micro-batches under ``--max-rank-batch``."""
    recovers_in_place: ClassVar[bool] = False
    """Whether its workers can go on without a lost one (``--recovery inplace``): the
    runtime regroups (:meth:`~shoal.strategies.base.Strategy.regroup`)."""
    reads: ClassVar[tuple[str, ...]] = ("cluster.grace_period",)
    """The shared settings it reads of those only some strategies read (declared
    ``reader="strategy"`` in :mod:`shoal.config`): a value given for one it does not read
    is refused (see :mod:`shoal.run.reads`)."""
    own_data: ClassVar[bool] = False
    """Whether it reads its data itself rather than through ``--data`` (a vertical
    job's parties each read their own files): no dataset is built for the job, and
    :meth:`check_data` is called with ``None``."""
    ignores: ClassVar[tuple[str, ...]] = ()
    """Settings every other strategy reads and this one does not: ``section.field``, or
    a whole ``section``. A value given for one is refused (one from a job file, named
    in a warning), with :attr:`ignores_why`."""
    ignores_why: ClassVar[str] = ""
    privacy: ClassVar[str] = ""
    """The differential privacy it runs under ``--dp-clip``: ``sample`` (DP-SGD),
    ``client`` (each client's update), or none."""

    def options(self, job: JobConfig) -> Any:
        """This strategy's section of ``job`` (resolved by :func:`shoal.strategies.resolve`)."""
        opts = job.strategy.options
        if not isinstance(opts, self.Config):
            raise TypeError(f"job.strategy.options is not resolved for {self.name}")
        return opts

    def check(self, job: JobConfig) -> None:
        """Refuse, with a :class:`~shoal.errors.UserError`, a job this strategy cannot
        run: its own rules, beyond the ones every job shares (its section's ranges,
        privacy, ``--balance``, ``--compress``: :func:`shoal.strategies.check_job` runs
        those first, whatever this method does). Called before anything is written, so a
        mistake leaves no trace. The default: at least one worker."""
        if job.cluster.workers < 1:
            raise UserError(f"--workers must be a positive integer, got {job.cluster.workers}")

    def commits_every(self, job: JobConfig) -> int:
        """The steps between two points where the workers' state is one (the runtime's
        :meth:`~shoal.strategies.base.Strategy.consistent_after`): an in-place job takes
        newcomers in only there. Every step by default."""
        return 1

    codec_rolls_back: ClassVar[bool] = False
    """Whether the runtime keeps its codec's state (error feedback, warm starts) with what
    it goes back to in place, so ``--compress`` may recover in place."""

    restart_only: ClassVar[str] = ""
    """Where it does not :attr:`recover in place <recovers_in_place>`: why (what a rank
    holds that exists nowhere else), said when a lost worker restarts the job."""

    def in_place_refusal(self, job: JobConfig) -> str:
        """Why this job cannot recover in place, beyond the rules every strategy that
        :attr:`recovers_in_place` shares ("" if it can): ``--recovery inplace`` is refused
        with this line, and the default (``auto``) recovers by restart."""
        return ""

    def in_place_replicas(self, job: JobConfig) -> list[list[int]] | None:
        """Where each rank's state exists, if not on every rank (a mesh of a fixed shape,
        sharded): for each shard, the ranks that hold a copy. An in-place job of it then
        needs every rank in each generation (after a loss the others wait for a
        replacement, which receives its shard from a copy), and one that lost every copy
        of a shard starts again from the newest checkpoint. ``None`` by default: every
        rank holds the whole state, and the others go on without a lost one."""
        return None

    def recovery(self, job: JobConfig) -> tuple[str, str]:
        """How a lost worker of ``job`` is recovered: ``("inplace", "")``, or
        ``("restart", why)`` with why not in place ("" where ``--recovery restart`` says
        so). ``--recovery auto``, the default, is in place wherever the job allows it."""
        if job.cluster.recovery == "restart":
            return "restart", ""
        if not self.recovers_in_place:
            why = self.restart_only or f"--strategy {self.name} does not recover in place"
            return "restart", why
        why = _shared_in_place_refusal(self, job) or self.in_place_refusal(job)
        return ("restart", why) if why else ("inplace", "")

    def data_ranks(self, job: JobConfig) -> int:
        """How many slices each global batch is cut into (data-parallel ranks)."""
        return job.world_size

    def check_data(self, job: JobConfig, data: Any) -> None:
        """Refuse data this strategy cannot use; ``data`` is the job's built
        :class:`~shoal.data.Dataset`, before anything is written."""

    def check_model(self, job: JobConfig, model: Any) -> None:
        """Refuse a model this strategy cannot split or run; ``model`` is built on the
        meta device (no memory), before anything is written."""

    def checkpoint_root(self, run_dir: Path) -> Path:
        """Where ``--resume`` finds its checkpoints (in ``ROOT/checkpoints``)."""
        return run_dir

    def launch(self, job: JobConfig, config_path: str) -> None:
        """Start this machine's processes and wait for them (default: torchrun's agent;
        ``--recovery inplace``: shoal's own launcher, see :mod:`shoal.inplace`)."""
        mode, why = self.recovery(job)
        if mode == "inplace":
            from shoal.inplace.launch import launch as launch_in_place

            launch_in_place(job, config_path, self.in_place_replicas(job))
            return
        from shoal.launch import launch

        launch(job.cluster, config_path, restart_why=why)

    def run_role(self, role: str, job: JobConfig, env: DistEnv) -> None:
        """Entry point of a process that is not a training worker (a server, say)."""
        raise ValueError(f"strategy {self.name} has no role {role!r}")

    def run_in_group(self, job: JobConfig, group: DistEnv, train: Callable[[], int]) -> int:
        """A strategy that starts its own processes (``needs_process_group`` false), run
        in a process group another launcher made (torchrun, Ray, TorchDistributor): give
        this rank its role; ``train`` runs a training worker (it reads ``RANK`` and
        ``WORLD_SIZE`` among the workers from the environment). Returns the exit code."""
        raise UserError(f"--strategy {self.name} cannot run under another launcher")

    def build(self, job: JobConfig, env: DistEnv) -> Strategy:
        """The runtime object of one worker."""
        return self.runtime(job, env)

    def summary_rows(self, summary: dict[str, Any]) -> list[tuple[str, str]]:
        """Its own rows in the table ``shoal train`` prints (from ``summary.json``)."""
        return []


def _shared_in_place_refusal(plugin: Plugin, job: JobConfig) -> str:
    """Why ``job`` cannot recover in place, whatever its strategy ("" if it may)."""
    from shoal import privacy

    c = job.cluster
    if privacy.budget(job.train).enabled:
        return "--recovery inplace runs without DP-SGD (--dp-clip) for now"
    if job.train.balance.startswith("static"):
        return (
            "--recovery inplace: --balance static gives each rank a weight, and the "
            "ranks change; use --balance auto (or equal)"
        )
    if c.nnodes > 1 or c.engine != "shoal":
        return (
            "--recovery inplace runs on one machine under shoal's own launcher "
            "for now (no --nnodes, no --engine)"
        )
    if getattr(plugin.options(job), "compress", "none") != "none" and not plugin.codec_rolls_back:
        return (
            "--recovery inplace runs without --compress for now: a codec's error "
            "feedback (and PowerSGD's warm start) would keep what a step cut short sent"
        )
    return ""
