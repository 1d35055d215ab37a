"""Small dense models: linear/softmax regression, an MLP and a small CNN."""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from shoal.config import ModelConfig
from shoal.data import Dataset
from shoal.errors import UserError


def linear(data: Dataset, cfg: ModelConfig) -> nn.Module:
    """One affine layer: linear regression, or softmax regression on class data."""
    return nn.Sequential(nn.Flatten(), nn.Linear(data.num_features, data.num_outputs))


class Layers(nn.Sequential):
    """Layers in order, and how tensor parallelism splits their linear layers."""

    def tensor_plan(self, tp: int) -> dict[str, Any]:
        """Linear layers in pairs, column-wise then row-wise (one all-reduce per pair);
        an odd last one column-wise with its outputs gathered, or whole on every rank
        when its outputs do not split ``tp`` ways."""
        from torch.distributed.tensor import Replicate
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

        linears = [(n, m) for n, m in self.named_children() if isinstance(m, nn.Linear)]
        plan: dict[str, Any] = {}
        for i, (name, layer) in enumerate(linears):
            if i % 2:
                plan[name] = RowwiseParallel()
                continue
            if i < len(linears) - 1 and layer.out_features % tp:
                raise UserError(f"--hidden {layer.out_features} must be a multiple of tp={tp}")
            if i == len(linears) - 1:
                if layer.out_features % tp == 0:
                    plan[name] = ColwiseParallel(output_layouts=Replicate())
                # else too few outputs to split (a regression's one): whole on every rank
            else:
                plan[name] = ColwiseParallel()
        return plan


def mlp(data: Dataset, cfg: ModelConfig) -> nn.Module:
    """``cfg.layers`` hidden ReLU layers of width ``cfg.hidden``."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = data.num_features
    for _ in range(cfg.layers):
        layers += [nn.Linear(width, cfg.hidden), nn.ReLU()]
        width = cfg.hidden
    layers.append(nn.Linear(width, data.num_outputs))
    return Layers(*layers)


def cnn(data: Dataset, cfg: ModelConfig) -> nn.Module:
    """Two 3x3 convolutions, a 2x2 max-pool and two dense layers, for square grey images."""
    side = math.isqrt(data.num_features)
    if side * side != data.num_features:
        raise UserError(
            f"--model cnn needs square images; {data.name} has {data.num_features} features"
        )
    return nn.Sequential(
        nn.Unflatten(1, (1, side, side)),
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * (side // 2) ** 2, cfg.hidden),
        nn.ReLU(),
        nn.Linear(cfg.hidden, data.num_outputs),
    )
