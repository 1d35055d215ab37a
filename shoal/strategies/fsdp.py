"""Sharded data parallel: PyTorch's ``fully_shard`` (FSDP2), with or without replicas.

Each unit of the model (a child module with parameters: ``embed``, each
``blockN``, ``head``; the layers of an MLP) is sharded on its own, so only one
unit's parameters are whole at a time: they are all-gathered just before the
unit runs (forward, and again for backward) and freed after, and gradients are
reduce-scattered, so each rank keeps 1/S of the parameters, gradients and
optimizer state. The optimizer steps on the local shards.

``--mesh dp=R,fsdp=S`` is hybrid sharding (HSDP): R replicas, each sharded over
S workers; gradients are reduce-scattered within a replica and all-reduced
across replicas, so every shard exists R times. Every worker trains its own
slice of the global batch either way.

With replicas, a lost worker is recovered in place (``--recovery auto``): the
others keep their shards, a newcomer takes the lost worker's place and receives
its shard of the parameters and optimizer state from a replica of it, and the
model is wrapped again on the new group. A step commits when every worker has
its gradients (a one-number all-reduce after backward, before the optimizer
steps), so a worker lost in a step leaves either nothing of it applied or every
worker able to apply it: one that missed the end of that all-reduce applies the
step as it joins the next generation.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from shoal.config import JobConfig
from shoal.dist import DistEnv
from shoal.inplace import state as inplace_state
from shoal.memory import ActivationMeter, nbytes
from shoal.metrics import PhaseTimer
from shoal.strategies import plugin
from shoal.strategies.base import Batch, LossFn
from shoal.strategies.collectives import ring_allreduce_bytes
from shoal.strategies.mesh import MeshPlugin, ModelParallel

# shoal's models never write into a unit's output in place, the case this warns of
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


class FSDP(ModelParallel):
    """Parameters, gradients and optimizer state sharded within each replica."""

    def setup(
        self, model: nn.Module, total_steps: int, example: Batch, activations: ActivationMeter
    ) -> None:
        self.total_steps = total_steps
        self._keep_replica(model)
        self.full_bytes = sum(nbytes(p) for p in model.parameters())
        self.model = model
        self.pending = False  # (in place) gradients every worker has, not yet applied
        self.held: dict[str, Any] | None = None  # (in place) this rank's shard, between groups
        self.template: nn.Module | None = None
        if self.in_place:  # the model wrapped again on each new group: from a copy of no size
            self.template = copy.deepcopy(model).to("meta")
        if dist.is_initialized():  # (an in-place job's worker wraps it as it joins)
            self._wrap(model)
            self._optimizer(model.parameters(), total_steps)

    def _wrap(self, model: nn.Module) -> None:
        """Shard ``model`` over the mesh (a replica's shards with HSDP), unit by unit."""
        from torch.distributed.fsdp import fully_shard  # (slow to import: when used)

        mesh = self.mesh if self.sizes["dp"] > 1 else self.mesh["fsdp"]
        for unit in model.children():
            if any(p.requires_grad for p in unit.parameters()):
                fully_shard(unit, mesh=mesh)
        fully_shard(model, mesh=mesh)
        self.names = [n for n, _ in model.named_parameters()]  # (sharded now, in this order)

    @property
    def data_rank(self) -> tuple[int, int]:
        return self.env.rank, self.env.world_size  # (every worker has a slice of its own)

    def train_step(self, batch: Batch, loss_fn: LossFn, loss_scale: float, timer: PhaseTimer):
        loss = self._step(batch, loss_fn, loss_scale, timer)
        # what the collectives moved: parameters gathered for forward and for backward,
        # gradients reduce-scattered, each (S-1)/S of the whole per rank; with replicas,
        # a shard's gradient all-reduced across them
        s, r = self.sizes["fsdp"], self.sizes["dp"]
        moved = int(3 * self.full_bytes * (s - 1) / s)
        moved += ring_allreduce_bytes(self.full_bytes // s, r) if r > 1 else 0
        self.comm.add(sent=moved, received=moved)
        return loss

    def _sync_grads(self) -> None:
        """fully_shard reduce-scatters (and with HSDP all-reduces) the gradients during
        backward. In place, every worker then says it has them (see the module's
        docstring): this all-reduce completing anywhere means every worker entered it."""
        if self.template is None:
            return
        self.pending = True
        dist.all_reduce(torch.ones(1))

    def optimizer_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        loss = super().optimizer_step(*args, **kwargs)
        self.pending = False
        return loss

    @contextlib.contextmanager
    def accumulating(self, module: nn.Module) -> Iterator[None]:
        """Micro-batches before the last keep their gradients unsharded, unreduced."""
        module.set_requires_gradient_sync(False)  # type: ignore[operator]
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)  # type: ignore[operator]

    # --- in place ------------------------------------------------------------------------

    def release(self) -> None:
        """Keep this rank's shard (parameters, buffers, gradients where a step is pending,
        optimizer and schedule) as plain tensors, and let go of everything that holds the
        group: the wrapped model, the optimizer's sharded state, the mesh."""
        if not hasattr(self, "optimizer"):
            return  # (never wrapped: a newcomer that has not joined yet)
        self.held = self._shard(with_grads=self.pending)
        del self.model, self.optimizer, self.scheduler, self.mesh
        _forget_meshes()

    def regroup(self, env: DistEnv) -> None:
        """Wrap a model on the new group's mesh and fill it with this rank's shard: its
        own (a step every worker finished is applied first), or, for a newcomer, the one a
        replica of it sends."""
        self.env = env
        self.mesh = self._form_mesh()
        held, self.held = self.held, None
        if held is None:  # a newcomer, or the first generation: the model as built
            self._wrap(self.model)
            self._optimizer(self.model.parameters(), self.total_steps)
        else:  # a copy of the model, wrapped on the new mesh, filled with the kept shard
            self.model = copy.deepcopy(self.template)
            self._wrap(self.model)
            self.model.to_empty(device=env.device)
            self._optimizer(self.model.parameters(), self.total_steps)
            self._fill(held)
        self._hand_over(held is not None)

    def state_dict(self) -> dict[str, Any]:
        if self.held is not None:  # (between groups: a source of the generic state)
            return {"scheduler": self.held["scheduler"]}
        return super().state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.template is not None and (self.held is not None or not hasattr(self, "scheduler")):
            return  # (in place, between groups: the schedule comes with the shard)
        super().load_state_dict(state)

    def rollback(self) -> None:
        """The step cut short is trained again: its gradients, if kept, are dropped."""
        if self.held is not None:
            self.held["grads"] = {}
        self.pending = False

    def _fill(self, held: dict[str, Any]) -> None:
        """Put a shard kept by :meth:`release` (or sent by a replica) into the model."""
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, p in params.items():
                _local(p).copy_(held["params"][n])
            for n, b in self.model.named_buffers():
                b.copy_(held["buffers"][n])
        order = list(params.values())
        state = {
            int(i): {k: _like(v, order[int(i)]) for k, v in kept.items()}
            for i, kept in held["optim"]["state"].items()
        }
        groups = held["optim"]["param_groups"]
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        self.scheduler.load_state_dict(held["scheduler"])
        if held["grads"]:  # a step every worker had the gradients of: applied now
            for n, p in params.items():
                if n in held["grads"]:
                    p.grad = _like(held["grads"][n], p)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.pending = False

    def _hand_over(self, holds: bool) -> None:
        """Each rank without a shard of its own (a newcomer) receives it from a rank that
        holds the same shard in another replica."""
        who = [None] * self.env.world_size
        dist.all_gather_object(who, holds)
        fsdp = self.sizes["fsdp"]
        for rank, has in enumerate(who):
            if has or self.template is None or all(who) or not any(who):
                continue
            same = [r for r in range(rank % fsdp, len(who), fsdp) if who[r]]
            if not same:
                raise RuntimeError(
                    f"no worker holds shard {rank % fsdp} any more (every replica of it was "
                    "lost): resume the run from its newest checkpoint"
                )
            if self.env.rank == same[0]:
                self.sent = inplace_state.send(self._shard(), [rank])
            elif self.env.rank == rank:
                self._fill(inplace_state.receive(same[0]))

    def _shard(self, with_grads: bool = False) -> dict[str, Any]:
        """This rank's shard as plain tensors: parameters, buffers, the optimizer's state
        and the schedule (and the gradients of a step not yet applied)."""
        # the sharded parameters, as the optimizer holds them (a step cut short in forward
        # may leave the module's own attributes the gathered, whole ones)
        sharded = [p for group in self.optimizer.param_groups for p in group["params"]]
        params = dict(zip(self.names, sharded, strict=True))
        optim = self.optimizer.state_dict()
        grads = {n: _local(p.grad) for n, p in params.items() if p.grad is not None}
        kept = {i: {k: _local(v) for k, v in st.items()} for i, st in optim["state"].items()}
        return {
            "params": {n: _local(p).detach() for n, p in params.items()},
            "grads": grads if with_grads else {},
            "buffers": {n: b.detach() for n, b in self.model.named_buffers()},
            "optim": {"state": kept, "param_groups": optim["param_groups"]},
            "scheduler": self.scheduler.state_dict(),
        }


def _forget_meshes() -> None:
    """Drop what still holds the old mesh, and with it the old group's sockets (whose
    peers, waiting in a collective with this process, see it break only once they
    close): DTensor's caches of sharding decisions and redistribution plans (Python's
    ``lru_cache`` and its C++ twin) keep the meshes of what they saw."""
    import functools

    from torch.distributed.tensor import DTensor, _redistribute

    gc.collect()
    for f in gc.get_objects():  # (type(): some of torch's objects warn on isinstance)
        cached = type(f) is functools._lru_cache_wrapper
        if cached and getattr(f, "__module__", "").startswith("torch.distributed"):
            f.cache_clear()
    DTensor._op_dispatcher.sharding_propagator.propagate_op_sharding.cache_clear()
    for clear in (
        getattr(torch._C, "_clear_DTensor_sharding_propagator_cache", None),
        getattr(_redistribute, "clear_redistribute_planner_cache", None),
    ):
        if clear is not None:
            clear()
    gc.collect()  # (and the cycles in FSDP's state)


def _local(t: Any) -> Any:
    """A DTensor's local shard; anything else as it is."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _like(local: Any, param: Any) -> Any:
    """A local shard (of a parameter, its gradient or its optimizer state) as a DTensor
    laid out as ``param`` is; a number or a scalar (Adam's step) as it is."""
    from torch.distributed.tensor import DTensor

    if not (isinstance(local, torch.Tensor) and local.dim() > 0 and isinstance(param, DTensor)):
        return local
    return DTensor.from_local(
        local, param.device_mesh, param.placements, shape=param.shape, stride=param.stride(),
        run_check=False,
    )  # fmt: skip


class Plugin(MeshPlugin):
    name = "fsdp"
    description = "sharded data parallel (fully_shard): parameters, gradients, optimizer split"
    runtime = FSDP
    own_dim = "fsdp"
    # auto: its collectives run inside forward and backward, so a rank's time there
    # includes waiting for its peers and says nothing of its own speed
    balance_modes = ("equal", "static")
    micro_batching = True
    recovers_in_place = True
    reads = (*plugin.Plugin.reads, *plugin.IN_PLACE_READS)

    def data_ranks(self, job: JobConfig) -> int:
        return job.world_size

    def in_place_refusal(self, job: JobConfig) -> str:
        if self.sizes(job)["dp"] < 2:
            return (
                "--recovery inplace: --strategy fsdp without replicas keeps each shard of "
                "the parameters and optimizer state on one rank only; give it a replicated "
                "dimension (--mesh dp=2,fsdp=N) or recover by restart"
            )
        return ""

    def in_place_replicas(self, job: JobConfig) -> list[list[int]] | None:
        sizes = self.sizes(job)
        s = sizes["fsdp"]
        return [[i + d * s for d in range(sizes["dp"])] for i in range(s)]
