"""Small dense models: linear/softmax regression and an MLP."""

from __future__ import annotations

from torch import nn

from shoal.config import ModelConfig
from shoal.data import Dataset


def linear(data: Dataset, cfg: ModelConfig) -> nn.Module:
    """One affine layer: linear regression, or softmax regression on class data."""
    return nn.Sequential(nn.Flatten(), nn.Linear(data.num_features, data.num_outputs))


def mlp(data: Dataset, cfg: ModelConfig) -> nn.Module:
    """``cfg.layers`` hidden ReLU layers of width ``cfg.hidden``."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = data.num_features
    for _ in range(cfg.layers):
        layers += [nn.Linear(width, cfg.hidden), nn.ReLU()]
        width = cfg.hidden
    layers.append(nn.Linear(width, data.num_outputs))
    return nn.Sequential(*layers)
