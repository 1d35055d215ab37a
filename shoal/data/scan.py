"""What the columns of a dataset on disk hold, checked as it opens: the feature and
label columns named (or stored by their writer), the task their types mean, and with
``check`` every label and list width scanned (see :mod:`shoal.data.disk`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from shoal.config import DataConfig
from shoal.data.files import MAX_OUTPUTS, Files, _pa
from shoal.errors import UserError

if TYPE_CHECKING:
    import torch

    Batch = tuple[torch.Tensor, torch.Tensor]


def _matrix(column: Any, name: str, where: Path) -> np.ndarray:
    """A column as a 2-D numpy array: one value per row, or a list of equal length."""
    pa = _pa()
    if hasattr(column, "num_chunks"):  # one chunk is used as is: no copy of mapped pages
        col = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    else:
        col = column
    if col.null_count:
        raise UserError(f"{where}: column {name!r} has null values; fill them or decode "
                        "them with --data-transform")  # fmt: skip
    if not _is_list(col.type):
        return col.to_numpy(zero_copy_only=False).reshape(len(col), 1)
    if _is_list(col.type.value_type):  # (refused when the dataset opens; never decoded)
        raise UserError(f"{where}: column {name!r} holds lists of lists")
    if pa.types.is_fixed_size_list(col.type):
        width = col.type.list_size
    else:
        lengths = np.diff(col.offsets.to_numpy())
        width = int(lengths[0]) if len(lengths) else 0
        if len(lengths) and (lengths != width).any():
            low, high = int(lengths.min()), int(lengths.max())
            raise UserError(f"{where}: column {name!r} holds lists of different lengths "
                            f"({low} to {high} values); a column has one width")  # fmt: skip
    if width == 0 and len(col):
        raise UserError(f"{where}: column {name!r} holds empty lists")
    values = col.flatten()
    if values.null_count:
        raise UserError(f"{where}: column {name!r} has null values inside its lists")
    return values.to_numpy(zero_copy_only=False).reshape(len(col), -1)


def _numeric(kind: Any) -> str | None:
    """'int', 'float' or 'bool' for a number column or a flat list of numbers, else None
    (lists of lists too: a row's features are one vector)."""
    pa = _pa()
    if _is_list(kind):
        kind = kind.value_type
    if pa.types.is_boolean(kind):
        return "bool"
    if pa.types.is_integer(kind):
        return "int"
    if pa.types.is_floating(kind):
        return "float"
    return None


def _is_list(kind: Any) -> bool:
    pa = _pa()
    return bool(
        pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
    )


def resolve_columns(files: Files, cfg: DataConfig, meta: dict[str, Any]) -> tuple[list[str], str]:
    features = [c.strip() for c in cfg.features.split(",") if c.strip()] or list(
        meta.get("features", [])
    )
    label = cfg.label.strip() or str(meta.get("label", ""))
    where = files.shards[0].path
    if not label:
        raise UserError(f"{where}: name the label column with --label (columns: "
                        f"{', '.join(files.schemas[0].names[:12])})")  # fmt: skip
    if not features:
        raise UserError(f"{where}: name the feature columns with --features (columns: "
                        f"{', '.join(files.schemas[0].names[:12])})")  # fmt: skip
    return files.columns(features), label


def infer_task(cfg: DataConfig, meta: dict[str, Any], label_kind: str | None, is_list: bool) -> str:
    if cfg.task != "auto":
        return cfg.task
    if meta.get("task"):
        return str(meta["task"])
    if is_list:
        return "language-model"
    return {"float": "regression", "int": "classification", "bool": "binary"}.get(
        label_kind or "", "regression"
    )


CLASSES = ("classification", "language-model")
"""Tasks whose labels are class numbers (tokens): the model has one output per class."""


def check_columns(files: Files, features: list[str], label: str) -> list[str]:
    """Each column a number or a flat list of numbers, of one type in every file, without
    nulls where the footers count them; the kinds ('int', 'float', 'bool') of the features."""
    where = files.shards[0].path
    if _numeric(files.field(label)) is None:
        raise UserError(f"{where}: label column {label!r} is {files.field(label)}; labels "
                        "must be numbers (or decode them with --data-transform)")  # fmt: skip
    kinds = []
    for c in features:
        kind = _numeric(files.field(c))
        if kind is None:
            raise UserError(f"{where}: feature column {c!r} is {files.field(c)}; shoal trains "
                            "on numbers and flat lists of numbers: decode it with "
                            "--data-transform package.module:function")  # fmt: skip
        kinds.append(kind)
    for c in [*features, label]:
        for shard, nulls in files.null_counts(c):
            if nulls:
                what = "labels" if c == label else "values"
                raise UserError(f"{shard.path}: column {c!r} has {nulls} null {what}")
    return kinds


def check_task(files: Files, features: list[str], label: str, task: str) -> None:
    """The label's shape fits the task: a sequence of token ids for a language model (whose
    features are token ids too), one number per row otherwise."""
    where = files.shards[0].path
    kind = files.field(label)
    if task == "language-model":
        if not _is_list(kind):
            raise UserError(f"{where}: a language model's label is a sequence of token ids "
                            f"(a list column); {label!r} is {kind}")  # fmt: skip
        for c in features:
            if _numeric(files.field(c)) != "int":
                raise UserError(f"{where}: a language model reads token ids; feature "
                                f"column {c!r} is {files.field(c)}")  # fmt: skip
    elif _is_list(kind):
        raise UserError(f"{where}: label column {label!r} holds lists ({kind}); a {task} "
                        "label is one number per row (sequences of tokens: --task "
                        "language-model)")  # fmt: skip


@dataclass
class Scan:
    """What :func:`scan_rows` found in every row."""

    labels: int
    """The largest class label + 1 (classification, language-model); 1 otherwise."""
    tokens: int
    """The largest token id among the features + 1 (language-model); 0 otherwise."""
    widths: dict[str, int]
    """Values per row of each column read (1 for a number)."""


def scan_rows(files: Files, columns: Any, task: str) -> Scan:
    """Read every row of the label and the list columns once (the launcher does, so that
    workers need not), and refuse in one line naming the file: null, NaN or infinite
    labels, labels the task cannot take, lists whose width differs between rows or files,
    a language model's token ids below 0.
    A prepared file's feature columns are read too, for their null counts (Arrow records
    them: no page is touched); a Parquet file's come from its footer.

    The cost is decoding those columns once: the labels, every list column of variable
    length, and a language model's tokens."""
    pa = _pa()
    label = columns.label
    lists = [  # (a fixed-size list's width is its type's, the same in every file)
        c
        for c in columns.features
        if _is_list(files.field(c)) and not pa.types.is_fixed_size_list(files.field(c))
    ]
    tokens = columns.features if task == "language-model" else []
    values = list(dict.fromkeys([label, *lists, *tokens]))
    counted = columns.features if files.prepared else []
    read = list(dict.fromkeys([*values, *counted]))
    widths: dict[str, tuple[int, str]] = {}
    biggest = most = -1
    for b, (shard_i, group) in enumerate(files._where):
        where = files.shards[shard_i].path
        table = files.read_block(b, read)
        for c in counted:
            if table.column(c).null_count:
                raise UserError(f"{where}: column {c!r} has {table.column(c).null_count} "
                                "null values")  # fmt: skip
        if table.column(label).null_count:
            nulls = table.column(label).null_count
            raise UserError(f"{where}: column {label!r} has {nulls} null labels")
        for c in values:
            m = _matrix(table.column(c), c, where)
            width, first = widths.setdefault(c, (m.shape[1], f"{where} (row group {group})"))
            if m.shape[1] != width:
                raise UserError(f"{where}: column {c!r} holds lists of {m.shape[1]} values in "
                                f"row group {group}, but {width} in {first}; a column has one "
                                "width in every file")  # fmt: skip
            if c == label:
                biggest = max(biggest, _check_labels(m, label, task, where, group))
            elif c in tokens and m.size:
                if m.min() < 0:
                    raise UserError(f"{where}: column {c!r} has negative token ids")
                most = max(most, int(m.max()))
    return Scan(biggest + 1 if task in CLASSES else 1, most + 1,
                {c: w for c, (w, _) in widths.items()})  # fmt: skip


def _check_labels(m: np.ndarray, label: str, task: str, where: Path, group: int) -> int:
    """One block's labels: finite, and what the task takes; the largest class label (-1
    for tasks without classes)."""
    values = m.ravel()
    if not len(values):
        return -1
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        first = int(np.flatnonzero(~np.isfinite(values))[0])
        what = "NaN" if np.isnan(values[first]) else "infinite"
        raise UserError(f"{where}: column {label!r} has {what} labels (row "
                        f"{first // m.shape[1]} of row group {group})")  # fmt: skip
    if task in CLASSES:
        if values.min() < 0:
            raise UserError(f"{where}: column {label!r} has negative class labels")
        if values.dtype.kind == "f" and (values != np.round(values)).any():
            raise UserError(f"{where}: {task} labels must be whole numbers; column "
                            f"{label!r} has fractions")  # fmt: skip
        return int(values.max())
    if task == "binary" and (values.min() < 0 or values.max() > 1):
        raise UserError(f"{where}: column {label!r} has binary labels outside 0..1 "
                        f"({values.min()} to {values.max()})")  # fmt: skip
    return -1


def count_outputs(files: Files, meta: dict[str, Any], task: str, scan: Scan | None,
                 first: Batch) -> int:  # fmt: skip
    """The model's outputs: 1 for regression and binary; for classes, what the metadata
    says (checked against every label and token the scan saw), else the largest + 1. A
    count above MAX_OUTPUTS is refused: it is a wrong column or a corrupt file."""
    where = files.shards[0].path
    claimed = meta.get("num_outputs")  # (its form is checked: 1 to MAX_OUTPUTS)
    if task not in CLASSES:
        if claimed not in (None, 1):
            raise UserError(f"{where}: its metadata says num_outputs = {claimed}, but a "
                            f"{task} model has one output")  # fmt: skip
        return 1
    y = first[1]
    if y.numel() and int(y.min()) < 0:
        raise UserError(f"{where}: negative class labels in the first rows")
    seen = int(y.max()) + 1 if y.numel() else 1
    if scan is not None:
        seen = max(seen, scan.labels, scan.tokens)
    if claimed is None:
        if seen > MAX_OUTPUTS:
            raise UserError(f"{where}: class labels go up to {seen - 1:,}; shoal takes at "
                            f"most {MAX_OUTPUTS:,} classes: is this the label column?")  # fmt: skip
        return seen
    if seen > claimed:
        what = "token ids" if scan is not None and scan.tokens == seen else "labels"
        raise UserError(f"{where}: {what} go up to {seen - 1:,}, but its metadata says "
                        f"num_outputs = {claimed}")  # fmt: skip
    return int(claimed)
