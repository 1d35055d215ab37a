"""Sharded data parallel: PyTorch's ``fully_shard`` (FSDP2) over every worker.

Each unit of the model (a child module with parameters: ``embed``, each
``blockN``, ``head``; the layers of an MLP) is sharded on its own, so only one
unit's parameters are whole at a time: they are all-gathered just before the
unit runs (forward, and again for backward) and freed after, and gradients are
reduce-scattered, so each rank keeps 1/P of the parameters, gradients and
optimizer state. The optimizer steps on the local shards.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

from torch import nn

from shoal.memory import ActivationMeter, nbytes
from shoal.metrics import PhaseTimer
from shoal.strategies.base import Batch, LossFn
from shoal.strategies.mesh import MeshPlugin, ModelParallel

# shoal's models never write into a unit's output in place, the case this warns of
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


class FSDP(ModelParallel):
    """Parameters, gradients and optimizer state sharded over the data-parallel ranks."""

    def setup(
        self, model: nn.Module, total_steps: int, example: Batch, activations: ActivationMeter
    ) -> None:
        from torch.distributed.fsdp import fully_shard  # (slow to import: when used)

        mesh = self.mesh
        self._keep_replica(model)
        self.full_bytes = sum(nbytes(p) for p in model.parameters())
        for unit in model.children():
            if any(p.requires_grad for p in unit.parameters()):
                fully_shard(unit, mesh=mesh)
        fully_shard(model, mesh=mesh)
        self.model = model
        self._optimizer(model.parameters(), total_steps)

    def train_step(self, batch: Batch, loss_fn: LossFn, loss_scale: float, timer: PhaseTimer):
        loss = self._step(batch, loss_fn, loss_scale, timer)
        # what the collectives moved: parameters gathered for forward and for backward,
        # gradients reduce-scattered, each (P-1)/P of the whole per rank
        p = self.sizes["dp"]
        moved = int(3 * self.full_bytes * (p - 1) / p)
        self.comm.add(sent=moved, received=moved)
        return loss

    def _sync_grads(self) -> None:
        """fully_shard reduce-scatters the gradients during backward."""

    @contextlib.contextmanager
    def accumulating(self, module: nn.Module) -> Iterator[None]:
        """Micro-batches before the last keep their gradients unsharded, unreduced."""
        module.set_requires_gradient_sync(False)  # type: ignore[operator]
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)  # type: ignore[operator]


class Plugin(MeshPlugin):
    name = "fsdp"
    description = "sharded data parallel (fully_shard): parameters, gradients, optimizer split"
    runtime = FSDP
    own_dim = "dp"
    restart_only = "each rank's shard of the parameters and optimizer state exists nowhere else"
    # auto: its collectives run inside forward and backward, so a rank's time there
    # includes waiting for its peers and says nothing of its own speed
    balance_modes = ("equal", "static")
    micro_batching = True
