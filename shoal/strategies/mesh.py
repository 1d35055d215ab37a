"""What the model-parallel strategies share: the device mesh and sharded state.

The workers form a ``DeviceMesh`` with named dimensions: ``dp`` (data
parallel replicas: each coordinate along it sees its own slice of the global
batch), ``fsdp`` (the shards of fully sharded data parallel, each with a slice of
its own too), ``pp`` (pipeline stages) and ``tp`` (tensor-parallel shards).
``--mesh dp=2,pp=2`` spells one out; each strategy fills in what is not given
(all workers along its own dimension); ``--mesh dp=2,fsdp=2`` is hybrid sharding
(HSDP: two replicas, each sharded over two workers). Ranks that differ only in ``pp`` or ``tp``
see the same data, and one of them (the last stage, tensor rank 0) reports
the slice's loss and samples.

Their state is sharded, so checkpoints go through ``torch.distributed.checkpoint``
(DCP) under the model's own parameter names (see
:func:`shoal.checkpoint.save_sharded`): any layout can resume any other's, a
plain data-parallel run included. For evaluation and the exported model the
full parameters are gathered to global rank 0, which keeps an unsharded
replica for the purpose (not counted in the memory figures).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn

from shoal.config import JobConfig, option
from shoal.dist import DistEnv
from shoal.errors import UserError
from shoal.memory import local_tensor
from shoal.metrics import PhaseTimer
from shoal.optim import build_optimizer, build_scheduler
from shoal.strategies import plugin
from shoal.strategies.base import Batch, LossFn, Strategy
from shoal.strategies.collectives import ring_allreduce_bytes

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

MESH_DIMS = ("dp", "fsdp", "pp", "tp")
"""Mesh dimensions, outermost first: data-parallel replicas, fully sharded data
parallel, pipeline, tensor parallel."""


def parse_mesh(spec: str) -> dict[str, int]:
    """``"dp=2,pp=2"`` -> ``{"dp": 2, "pp": 2}``; a :class:`UserError` for anything else."""
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in MESH_DIMS:
            raise UserError(
                f"--mesh {spec}: unknown dimension {name!r} (use {', '.join(MESH_DIMS)})"
            )
        if name in sizes:
            raise UserError(f"--mesh {spec}: {name} given twice")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise UserError(f"--mesh {spec}: {part!r} is not NAME=SIZE") from None
        if sizes[name] < 1:
            raise UserError(f"--mesh {spec}: {name} must be at least 1")
    return sizes


@dataclass
class MeshConfig:
    """[strategy.fsdp], [strategy.tensor]"""

    mesh: str = option(
        "",
        "the workers as a mesh, e.g. dp=2,pp=2 (pipeline), dp=2,tp=2 (tensor) or "
        "dp=2,fsdp=2 (fsdp: 2 replicas of 2 shards each, HSDP); empty: every worker "
        "along the strategy's own dimension",
    )


def mesh_sizes(options: MeshConfig, own: str, world: int, strategy: str = "") -> dict[str, int]:
    """The mesh of a job whose strategy parallelizes along ``own`` (``"fsdp"``,
    ``"pp"``, ``"tp"``): ``--mesh`` as given, the strategy's dimension taking the
    workers ``dp`` leaves (all of them by default)."""
    spec = options.mesh
    given = parse_mesh(spec)
    foreign = sorted(set(given) - {"dp", own})
    if foreign:
        raise UserError(
            f"--mesh {spec}: --strategy {strategy} has no {foreign[0]} dimension "
            f"(it takes dp and {own})"
        )
    stages = getattr(options, "stages", 0)
    if own == "pp" and stages:
        given.setdefault("pp", stages)
    size = given.get(own) or max(1, world // given.get("dp", 1))
    sizes = {"dp": given.get("dp") or max(1, world // size), own: size}
    needed = 1
    for v in sizes.values():
        needed *= v
    if needed != world:
        shape = ",".join(f"{k}={v}" for k, v in sizes.items())
        raise UserError(f"the mesh {shape} needs {needed} workers, and there are {world}")
    return sizes


class MeshPlugin(plugin.Plugin):
    """What the model-parallel plugins share: the mesh, sharded checkpoints."""

    Config: ClassVar[type] = MeshConfig
    own_dim: ClassVar[str] = "fsdp"
    """The mesh dimension this strategy parallelizes along."""
    sharded_checkpoints = True
    reads_shards = True
    reads = (*plugin.Plugin.reads, *plugin.RESTART_READS)

    def sizes(self, job: JobConfig) -> dict[str, int]:
        """The job's mesh, checked."""
        return mesh_sizes(self.options(job), self.own_dim, job.world_size, self.name)

    def check(self, job: JobConfig) -> None:
        self.sizes(job)
        super().check(job)

    def data_ranks(self, job: JobConfig) -> int:
        return self.sizes(job)["dp"]

    def build(self, job: JobConfig, env: DistEnv) -> Strategy:
        return self.runtime(job, env, self.own_dim)


class ModelParallel(Strategy):
    """Base of the strategies whose model state is spread over ranks."""

    def __init__(self, job: JobConfig, env: DistEnv, own_dim: str) -> None:
        super().__init__(job, env)
        self.own_dim = own_dim
        self.sizes = mesh_sizes(self.options, own_dim, env.world_size, job.strategy.name)
        if dist.is_initialized():  # (an in-place job's worker forms it as it joins)
            self.mesh = self._form_mesh()

    def _form_mesh(self) -> DeviceMesh:
        """The mesh over the process group now current."""
        names = tuple(d for d in MESH_DIMS if d in self.sizes)
        from torch.distributed.device_mesh import init_device_mesh  # (slow to import)

        return init_device_mesh(
            self.env.device.type, tuple(self.sizes[d] for d in names), mesh_dim_names=names
        )

    def _keep_replica(self, model: nn.Module) -> None:
        """Rank 0 keeps an unsharded copy of ``model`` to evaluate and export."""
        self.replica = copy.deepcopy(model) if self.env.rank == 0 else None

    @property
    def data_rank(self) -> tuple[int, int]:
        return self.mesh["dp"].get_local_rank(), self.sizes["dp"]

    def full_state(self) -> dict[str, torch.Tensor]:
        """Every parameter whole, on rank 0 (empty elsewhere). Collective."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        return get_model_state_dict(
            self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )

    def eval_model(self) -> nn.Module:  # collective
        state = self.full_state()
        if self.replica is None:
            return self.model  # not rank 0: nothing to evaluate here
        self.replica.load_state_dict(state)
        return self.replica

    def state_dict(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict()}  # the rest: save_shards, load_shards

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state["scheduler"])

    def _optimizer(self, params: Any, total_steps: int) -> None:
        self.optimizer = build_optimizer(params, self.job.optim)
        self.scheduler = build_scheduler(self.optimizer, self.job.optim, total_steps)

    def _step(self, batch: Batch, loss_fn: LossFn, loss_scale: float, timer: PhaseTimer) -> Any:
        """Forward and backward of this rank's batch, the data-parallel gradient sync
        (:meth:`_sync_grads`), the optimizer step; the loss sum for logging."""
        return self.optimizer_step(self.model, batch, loss_fn, loss_scale, timer, self._sync_grads)

    def _sync_grads(self) -> None:
        """Average gradients over ``dp`` where this strategy replicates along it."""
        group = self.mesh["dp"].get_group() if self.sizes["dp"] > 1 else None
        if group is None:
            return
        grads = [local_tensor(p.grad) for p in self.model.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        flat.div_(self.sizes["dp"])
        dist.all_reduce(flat, group=group)
        wire = ring_allreduce_bytes(flat.numel() * flat.element_size(), self.sizes["dp"])
        self.comm.add(sent=wire, received=wire)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
