"""Strategy registry: adding a strategy is one module plus one line here."""

from __future__ import annotations

from shoal.config import JobConfig
from shoal.dist import DistEnv
from shoal.registry import lookup
from shoal.strategies.allreduce import AllReduce
from shoal.strategies.base import Batch, LossFn, Strategy
from shoal.strategies.fsdp import FSDP
from shoal.strategies.periodic import DiLoCo, LocalSGD
from shoal.strategies.pipeline import Pipeline
from shoal.strategies.ps.strategy import ParameterServer
from shoal.strategies.tensor import TensorParallel

STRATEGIES: dict[str, type[Strategy]] = {
    AllReduce.name: AllReduce,
    ParameterServer.name: ParameterServer,
    LocalSGD.name: LocalSGD,
    DiLoCo.name: DiLoCo,
    FSDP.name: FSDP,
    TensorParallel.name: TensorParallel,
    Pipeline.name: Pipeline,
}

__all__ = [
    "STRATEGIES",
    "Batch",
    "LossFn",
    "Strategy",
    "build_strategy",
    "check_strategy_name",
    "strategy_class",
]


def check_strategy_name(name: str) -> None:
    """Raise a :class:`~shoal.errors.UserError` for an unknown strategy."""
    lookup(name, STRATEGIES, "strategy")


def strategy_class(name: str) -> type[Strategy]:
    """The strategy registered under ``name``."""
    return lookup(name, STRATEGIES, "strategy")


def build_strategy(job: JobConfig, env: DistEnv) -> Strategy:
    """Instantiate the strategy named in ``job.strategy.name``."""
    return strategy_class(job.strategy.name)(job, env)
