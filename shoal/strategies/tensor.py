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
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    parallelize_module,
)

from shoal.config import JobConfig
from shoal.errors import UserError
from shoal.memory import local_tensor
from shoal.metrics import PhaseTimer
from shoal.strategies.base import Batch, LossFn
from shoal.strategies.mesh import ModelParallel, mesh_sizes


def transformer_plan(model: nn.Module) -> dict[str, ParallelStyle]:
    """Megatron-style: attention by heads, the MLP by its hidden units."""
    plan: dict[str, ParallelStyle] = {
        "embed.tok": RowwiseParallel(input_layouts=Replicate()),
        "head.out": ColwiseParallel(output_layouts=Replicate()),
    }
    for name, _ in model.named_children():
        if name.startswith("block"):
            for w in ("wq", "wk", "wv"):
                plan[f"{name}.attn.{w}"] = ColwiseParallel()
            plan[f"{name}.attn.wo"] = RowwiseParallel()
            plan[f"{name}.mlp.fc1"] = ColwiseParallel()
            plan[f"{name}.mlp.fc2"] = RowwiseParallel()
    return plan


def mlp_plan(model: nn.Module) -> dict[str, ParallelStyle]:
    """Linear layers in pairs, column-wise then row-wise; an odd last one column-wise
    with its outputs gathered."""
    linears = [n for n, m in model.named_children() if isinstance(m, nn.Linear)]
    plan: dict[str, ParallelStyle] = {}
    for i, name in enumerate(linears):
        if i % 2:
            plan[name] = RowwiseParallel()
        elif i == len(linears) - 1:
            plan[name] = ColwiseParallel(output_layouts=Replicate())
        else:
            plan[name] = ColwiseParallel()
    return plan


PLANS = {"transformer": transformer_plan, "mlp": mlp_plan}


class TensorParallel(ModelParallel):
    """Layers split over ``tp`` ranks (replicated over ``dp``, gradients averaged)."""

    name = "tensor"
    description = "tensor parallel: linear layers split column- and row-wise (DTensor)"
    own_dim = "tp"

    @classmethod
    def check(cls, job: JobConfig) -> None:
        super().check(job)
        if job.model.name not in PLANS:
            plans = " and ".join(PLANS)
            name = job.model.name
            raise UserError(f"--strategy tensor has plans for {plans}, not --model {name}")
        tp = mesh_sizes(job, "tp", job.world_size)["tp"]
        if job.model.name == "transformer" and job.model.heads % tp:
            raise UserError(f"--heads {job.model.heads} must be a multiple of tp={tp}")
        if job.model.hidden % tp:
            raise UserError(f"--hidden {job.model.hidden} must be a multiple of tp={tp}")

    def setup(self, model: nn.Module, total_steps: int) -> None:
        mesh = self.mesh
        self._keep_replica(model)
        plan = PLANS[self.job.model.name](model)
        parallelize_module(model, mesh["tp"], plan)
        self._count_traffic(model, plan)
        self.model = model
        self._optimizer(model.parameters(), total_steps)

    def _count_traffic(self, model: nn.Module, plan: dict[str, ParallelStyle]) -> None:
        """Count the bytes the plan's collectives move, from the outputs' sizes: a
        row-wise layer all-reduces its output in forward, and (but for the embedding,
        whose input is token ids) the input gradient of its column-wise partner in
        backward; a column-wise layer with gathered outputs all-gathers them."""
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
