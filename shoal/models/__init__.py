"""Built-in workloads: a model builder plus the dataset it trains on by default.

Adding a workload is one entry in :data:`MODELS`. A builder takes the
:class:`~shoal.data.Dataset` (for input shape and output count) and the
:class:`~shoal.config.ModelConfig`, and returns an ``nn.Module``. User code
(``--model package.module:function``) has the same signature.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from shoal.config import ModelConfig
from shoal.data import Dataset
from shoal.errors import UserError
from shoal.models import simple
from shoal.models.sparse import LogisticCTR
from shoal.models.transformer import transformer
from shoal.registry import import_ref, is_user_ref, lookup


@dataclass(frozen=True)
class ModelSpec:
    build: Callable[[Dataset, ModelConfig], nn.Module]
    default_data: str
    description: str
    reads: tuple[str, ...] = ()
    """The fields of :class:`~shoal.config.ModelConfig` it reads besides ``name``."""


MODELS: dict[str, ModelSpec] = {
    "linear": ModelSpec(simple.linear, "synthetic-linear", "linear regression"),
    "softmax": ModelSpec(simple.linear, "digits", "softmax (multinomial logistic) regression"),
    "mlp": ModelSpec(simple.mlp, "digits", "multi-layer perceptron", ("hidden", "layers")),
    "cnn": ModelSpec(
        simple.cnn, "digits", "small convolutional network for square images", ("hidden",)
    ),
    "ctr": ModelSpec(
        lambda data, cfg: LogisticCTR.for_data(data),
        "ctr",
        "click-through logistic regression on a hashed embedding table",
    ),
    "transformer": ModelSpec(
        transformer,
        "text",
        "small decoder-only transformer (GPT-style)",
        ("hidden", "layers", "heads"),
    ),
}

USER_DEFAULT_DATA = "digits"


def default_data(model_name: str) -> str:
    """The dataset a model trains on when ``--data`` is not given."""
    if is_user_ref(model_name):
        return USER_DEFAULT_DATA
    return lookup(model_name, MODELS, "model").default_data


def model_reads(name: str) -> tuple[str, ...] | None:
    """The :class:`~shoal.config.ModelConfig` fields the model ``name`` reads besides its
    name; ``None`` for the user's own (it may read any)."""
    if is_user_ref(name):
        return None
    return lookup(name, MODELS, "model").reads


def check_model_name(name: str) -> None:
    """Fail early, in the launcher, on a model name that cannot resolve."""
    if is_user_ref(name):
        import_ref(name, "model")
    else:
        lookup(name, MODELS, "model")


def build_model(cfg: ModelConfig, data: Dataset) -> nn.Module:
    """Build the model named by ``cfg.name`` for ``data``."""
    if is_user_ref(cfg.name):
        model = import_ref(cfg.name, "model")(data, cfg)
    else:
        model = lookup(cfg.name, MODELS, "model").build(data, cfg)
    if not isinstance(model, nn.Module):
        raise UserError(f"model {cfg.name!r} returned {type(model).__name__}, not an nn.Module")
    return model
