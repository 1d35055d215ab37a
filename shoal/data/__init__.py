"""Datasets, and the sampler that shards one seeded epoch permutation."""

from __future__ import annotations

from shoal.config import DataConfig
from shoal.data.ctr import auc_reference, ctr
from shoal.data.datasets import BUILTIN, Dataset, linear_reference
from shoal.data.disk import DiskRows, open_disk
from shoal.data.files import disk_path
from shoal.data.order import Order
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
    "build_order",
    "forget_datasets",
    "split_sizes",
]


def data_reads(name: str) -> tuple[str, ...] | None:
    """The :class:`~shoal.config.DataConfig` fields that the dataset ``name`` reads, of
    those a dataset declares (``reader="data"``); ``None`` for the user's own (it may
    read any)."""
    if disk_path(name) is not None:
        return open_disk.reads  # type: ignore[attr-defined]
    if is_user_ref(name):
        return None
    return lookup(name, DATASETS, "dataset").reads  # type: ignore[attr-defined]


def build_dataset(cfg: DataConfig, check: bool = False) -> Dataset:
    """Build the dataset named by ``cfg.name`` (a built-in, files on disk, or user code).

    User code is called with the :class:`~shoal.config.DataConfig` and must
    return a :class:`Dataset`. Files on disk are opened, not read; ``check`` scans
    their labels too (the launcher does).
    """
    global _LAST
    if disk_path(cfg.name) is not None or is_user_ref(cfg.name):
        return _build(cfg, check)  # (files may change, user code may differ each call)
    key = repr(cfg)
    if _LAST is None or _LAST[0] != key:
        _LAST = (key, _build(cfg, check))
    return _LAST[1]  # (the launcher checks the job, then starts it: one build)


_LAST: tuple[str, Dataset] | None = None
"""The built-in dataset this process generated last, and its settings (a function of
them alone)."""


def forget_datasets() -> None:
    """Let go of the dataset :func:`build_dataset` keeps (a long-lived caller's memory)."""
    global _LAST
    _LAST = None


def _build(cfg: DataConfig, check: bool) -> Dataset:
    if disk_path(cfg.name) is not None:
        return disk_dataset(cfg, check)
    if is_user_ref(cfg.name):
        dataset = import_ref(cfg.name, "dataset")(cfg)
        if not isinstance(dataset, Dataset):
            raise UserError(
                f"dataset {cfg.name!r} returned {type(dataset).__name__}, not a shoal Dataset"
            )
        return dataset
    return lookup(cfg.name, DATASETS, "dataset")(cfg)


def disk_dataset(cfg: DataConfig, check: bool = False) -> Dataset:
    """A ``parquet:PATH`` dataset (see :mod:`shoal.data.disk`)."""
    opened = open_disk(cfg, check)
    reference = None
    if opened.test is not None and opened.test_reference is not None and opened.task == "binary":
        reference = auc_reference(opened.test[0], opened.test[1].numpy(), opened.test_reference)
    elif opened.meta.get("generator") == "linear":
        reference = linear_reference(opened.meta)
    return Dataset(
        name=cfg.name,
        task=opened.task,
        train=opened.rows,
        test=opened.test,
        num_outputs=opened.num_outputs,
        input_shape=opened.input_shape,
        reference=reference,
        info={"table_rows": cfg.table_rows, "files": opened.fingerprint,
              **{k: v for k, v in opened.meta.items() if k in ("generator", "vocab", "context")}},
    )  # fmt: skip


def build_order(data: Dataset, cfg: DataConfig, seed: int) -> Order:
    """The epoch order ``cfg.shuffle`` asks for (see :mod:`shoal.data.order`)."""
    rows = data.train
    on_disk = isinstance(rows, DiskRows)
    mode = cfg.shuffle
    if mode == "auto":
        mode = "block" if on_disk and not rows.files.prepared else "full"
    if mode == "full":
        return Order(data.num_train, seed)
    n = data.num_train
    if cfg.shuffle_block or not on_disk:
        size = cfg.shuffle_block or 1024
        blocks = [size] * (n // size) + ([n % size] if n % size else [])
    else:
        blocks = rows.blocks
    return Order(n, seed, "block", blocks, cfg.shuffle_window)
