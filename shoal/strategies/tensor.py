"""Tensor (parameter) parallel: layers split column- and row-wise over ``tp`` ranks.

Built on ``torch.distributed.tensor.parallel``: a plan maps module names to
``ColwiseParallel`` (the weight's output features split: each rank computes
some of the outputs) and ``RowwiseParallel`` (input features split: partial
outputs, summed by an all-reduce). Pairing a column-wise layer with a row-wise
one (attention's ``wq``/``wk``/``wv`` with ``wo``, the MLP's ``fc1`` with
``fc2``) needs one all-reduce per pair in forward and one in backward; the
attention heads are split with their projections. The token embedding is
split by vocabulary rows and the output projection by vocabulary columns.
With ``--mesh dp=D,tp=T`` each of the D replicas is split T ways and the
gradients are averaged over ``dp``.

The plan is the model's: a model declares ``tensor_plan(tp)``, returning the
module names and their styles (the built-in ``mlp`` and ``transformer`` do),
and refuses a ``tp`` it cannot be split by.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from shoal.config import JobConfig
from shoal.errors import UserError
from shoal.memory import ActivationMeter, local_tensor
from shoal.metrics import PhaseTimer
from shoal.strategies.base import Batch, LossFn
from shoal.strategies.mesh import MeshPlugin, ModelParallel

if TYPE_CHECKING:
    from torch.distributed.tensor.parallel import ParallelStyle


def plan_of(model: nn.Module, tp: int) -> dict[str, ParallelStyle]:
    """The model's own tensor-parallel plan (``model.tensor_plan(tp)``), checked."""
    declare = getattr(model, "tensor_plan", None)
    if not callable(declare):
        raise UserError(
            f"--strategy tensor needs a model that declares how to split it "
            f"(a tensor_plan(tp) method: see docs/STRATEGIES.md); a {type(model).__name__} "
            "does not (the built-in mlp and transformer do)"
        )
    return declare(tp)


class TensorParallel(ModelParallel):
    """Layers split over ``tp`` ranks (replicated over ``dp``, gradients averaged)."""

    def setup(
        self, model: nn.Module, total_steps: int, example: Batch, activations: ActivationMeter
    ) -> None:
        from torch.distributed.tensor.parallel import parallelize_module  # (slow to import)

        mesh = self.mesh
        self._keep_replica(model)
        plan = plan_of(model, self.sizes["tp"])
        parallelize_module(model, mesh["tp"], plan)
        self._count_traffic(model, plan)
        self.model = model
        self._optimizer(model.parameters(), total_steps)

    def _count_traffic(self, model: nn.Module, plan: dict[str, ParallelStyle]) -> None:
        """Count the bytes the plan's collectives move, from the outputs' sizes: a
        row-wise layer all-reduces its output in forward, and (but for the embedding,
        whose input is token ids) the input gradient of its column-wise partner in
        backward; a column-wise layer with gathered outputs all-gathers them."""
        from torch.distributed.tensor import Replicate
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

        tp = self.sizes["tp"]

        def hook(times: float):
            def count(module: nn.Module, args: Any, output: torch.Tensor) -> None:
                size = local_tensor(output).numel() * output.element_size()
                moved = int(times * size)
                self.comm.add(sent=moved, received=moved)

            return count

        for name, style in plan.items():
            module = model.get_submodule(name)
            if isinstance(style, RowwiseParallel):
                factor = 1 if isinstance(module, nn.Embedding) else 2
                module.register_forward_hook(hook(factor * 2 * (tp - 1) / tp))
            elif isinstance(style, ColwiseParallel) and style.output_layouts == (Replicate(),):
                module.register_forward_hook(hook((tp - 1) / tp))

    @property
    def reports(self) -> bool:
        return self.mesh["tp"].get_local_rank() == 0

    def train_step(self, batch: Batch, loss_fn: LossFn, loss_scale: float, timer: PhaseTimer):
        return self._step(batch, loss_fn, loss_scale, timer)


class Plugin(MeshPlugin):
    name = "tensor"
    description = "tensor parallel: linear layers split column- and row-wise (DTensor)"
    runtime = TensorParallel
    own_dim = "tp"
    restart_only = "each rank's shard of the split layers exists nowhere else"
    # a replica's forward and backward hold only its own tp collectives: its speed
    balance_modes = ("equal", "static", "auto")
    micro_batching = True

    def check_model(self, job: JobConfig, model: Any) -> None:
        plan_of(model, self.sizes(job)["tp"])
