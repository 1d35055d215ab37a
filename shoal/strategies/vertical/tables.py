"""One party's table: its ids, its columns and (at the label party) its labels, read from
its own Parquet files, by that party's process alone.

A party's data is a directory as ``shoal data make clicks`` writes one per party
(``train/`` and ``test/`` beside each other) or a single split (no held-out rows), in
the layout :mod:`shoal.data.files` lists. Its columns are the id column, the feature
columns (the list its writer stored, else every column but the id and the label) and,
at the label party, the label. The whole table is read into memory: a party's
columns of the common samples are what each step indexes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shoal.data.disk import _label_tensor
from shoal.data.files import Files, split_roots
from shoal.data.scan import _matrix, _numeric
from shoal.errors import UserError


@dataclass
class Split:
    """One split of a party's table (train or test)."""

    ids: np.ndarray
    """The id column (int64), one per row."""
    features: torch.Tensor
    """The party's columns as float32, one row per id (width 0: none)."""
    labels: torch.Tensor | None
    """The label column (the label party only)."""


@dataclass
class PartyTable:
    """A party's data: its training split, its held-out split if it has one."""

    name: str
    train: Split
    test: Split | None
    columns: list[str]
    """The feature columns read, in order."""
    task: str
    """binary, regression or classification (from the label; "" at another party)."""
    num_outputs: int
    fingerprint: dict[str, str]

    @property
    def width(self) -> int:
        return int(self.train.features.shape[1])


def _task(meta: dict[str, Any], kind: str | None, where: Path, label: str) -> str:
    if meta.get("task"):
        return str(meta["task"])
    if kind is None:
        raise UserError(f"{where}: label column {label!r} is not a number")
    return {"float": "regression", "int": "classification", "bool": "binary"}[kind]


def _read_split(root: Path, id_column: str, columns: list[str], label: str) -> Split:
    files = Files(root)
    for c in [id_column, *columns, *([label] if label else [])]:
        files.field(c)  # (one line naming a missing column, or one of another type)
    if _numeric(files.field(id_column)) != "int":
        raise UserError(f"{root}: id column {id_column!r} is {files.field(id_column)}, not "
                        "integers")  # fmt: skip
    table = files.read_all([id_column, *columns, *([label] if label else [])])
    ids = np.ascontiguousarray(_matrix(table.column(id_column), id_column, root)[:, 0], np.int64)
    if len(np.unique(ids)) != len(ids):
        raise UserError(f"{root}: id column {id_column!r} holds the same id twice; ids must "
                        "name one row each")  # fmt: skip
    parts = [_matrix(table.column(c), c, root).astype(np.float32) for c in columns]
    x = np.concatenate(parts, axis=1) if parts else np.zeros((len(ids), 0), np.float32)
    if not np.isfinite(x).all():
        raise UserError(f"{root}: the feature columns hold NaN or infinite values")
    labels = None
    if label:
        labels = torch.from_numpy(np.array(_matrix(table.column(label), label, root)[:, 0]))
    return Split(ids, torch.from_numpy(np.ascontiguousarray(x)), labels)


def read_party(name: str, path: str, id_column: str, label: str) -> PartyTable:
    """Party ``name``'s table at ``path``; ``label`` names its label column (the label
    party's; "" for another party, whose files may still hold one: it is not read)."""
    root = Path(path).expanduser()
    if not root.exists():
        raise UserError(f"--parties {name}={path}: no such file or directory")
    train_root, test_root = split_roots(str(root))
    files = Files(train_root)
    meta = files.metadata
    names = list(files.schemas[0].names)
    stored = [c for c in meta.get("features", []) if c in names]
    columns = [c for c in (stored or names) if c not in (id_column, label, meta.get("label"))]
    if id_column not in names:
        raise UserError(f"{train_root}: no id column {id_column!r} (columns: "
                        f"{', '.join(names[:12])}); name it with --id-column")  # fmt: skip
    task, outputs = "", 0
    train = _read_split(train_root, id_column, columns, label)
    if label:
        task = _task(meta, _numeric(files.field(label)), train_root, label)
        train.labels = _label_tensor(train.labels, task, train_root)  # type: ignore[arg-type]
        if task == "classification":
            outputs = int(meta.get("num_outputs") or int(train.labels.max()) + 1)
        else:
            outputs = 1
    test = None
    if test_root is not None:
        test = _read_split(test_root, id_column, columns, label)
        if test.features.shape[1] != train.features.shape[1]:
            raise UserError(f"{test_root}: {test.features.shape[1]} feature values per row, "
                            f"{train.features.shape[1]} in {train_root}")  # fmt: skip
        if label:
            test.labels = _label_tensor(test.labels, task, test_root)  # type: ignore[arg-type]
    return PartyTable(name, train, test, columns, task, outputs, files.fingerprint())
