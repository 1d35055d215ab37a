"""Datasets, and the sampler that shards one seeded epoch permutation."""

from __future__ import annotations

from shoal.config import DataConfig
from shoal.data.ctr import ctr
from shoal.data.datasets import BUILTIN, Dataset
from shoal.data.sampler import GlobalBatchSampler, StepWork, Task, Work, split_sizes
from shoal.data.text import text
from shoal.errors import UserError
from shoal.registry import import_ref, is_user_ref, lookup

DATASETS = {**BUILTIN, "ctr": ctr, "text": text}
"""Built-in datasets by name."""

__all__ = [
    "DATASETS",
    "Dataset",
    "GlobalBatchSampler",
    "StepWork",
    "Task",
    "Work",
    "build_dataset",
    "split_sizes",
]


def check_dataset_name(name: str) -> None:
    """Fail early, in the launcher, on a dataset name that cannot resolve."""
    if is_user_ref(name):
        import_ref(name, "dataset")
    else:
        lookup(name, DATASETS, "dataset")


def build_dataset(cfg: DataConfig) -> Dataset:
    """Build the dataset named by ``cfg.name`` (a built-in or user code).

    User code is called with the :class:`~shoal.config.DataConfig` and must
    return a :class:`Dataset`.
    """
    if is_user_ref(cfg.name):
        dataset = import_ref(cfg.name, "dataset")(cfg)
        if not isinstance(dataset, Dataset):
            raise UserError(
                f"dataset {cfg.name!r} returned {type(dataset).__name__}, not a shoal Dataset"
            )
        return dataset
    return lookup(cfg.name, DATASETS, "dataset")(cfg)
