"""Datasets on disk: Parquet files, or a directory ``shoal data prepare`` wrote,
read a few rows at a time, never whole.

``--data parquet:PATH`` names a file or a directory of them as Spark, pandas,
Polars or DuckDB write it (``part-*.parquet`` files, possibly in partition
subdirectories; ``_SUCCESS``, ``_metadata`` and hidden files are skipped). With
``train/`` and ``test/`` subdirectories, the second is the held-out split. The
files are listed in path order and their rows numbered across them: row
numbers are the samples' identities.

Opening reads only the files' footers (row counts, row groups, schemas,
statistics). A worker then reads the rows of its own share of each step: the
row groups holding them are decoded (only the columns used) and kept in a
bounded cache; files ``shoal data prepare`` wrote are Arrow IPC files mapped
into memory, whose pages are the kernel's to drop and re-read, so a worker's
private memory stays what it trains on.

What a column holds is checked when the dataset opens, so a mistake costs one
line before any worker starts: a missing column (with the closest names), a
type that is not a number, nulls, NaN labels, a truncated or corrupt file.
Files written by ``shoal data make`` carry their defaults (features, label,
task, transform) in the schema's ``shoal`` metadata.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shoal.config import DataConfig
from shoal.data.files import Files, _pa, disk_path, split_roots
from shoal.errors import UserError
from shoal.registry import import_ref

Batch = tuple[torch.Tensor, torch.Tensor]


class BlockCache:
    """Decoded blocks, least recently used dropped first, at most ``limit`` bytes.

    ``decode`` turns a block's table into what the reader gathers rows from; blocks of
    a prepared (memory-mapped) dataset cost nothing here: their pages are the kernel's.
    A lock makes it safe for the loader's background thread and the training thread."""

    def __init__(
        self, files: Files, columns: list[str], limit: int, decode: Callable[[Any], Any]
    ) -> None:
        self.files, self.columns, self.limit, self.decode = files, columns, limit, decode
        self.held: OrderedDict[int, tuple[Any, int]] = OrderedDict()
        self.bytes = 0
        self.reads = 0
        self.lock = threading.Lock()

    def get(self, block: int) -> Any:
        with self.lock:
            hit = self.held.get(block)
            if hit is not None:
                self.held.move_to_end(block)
                return hit[0]
        table = self.files.read_block(block, self.columns)
        decoded = self.decode(table)
        size = 0 if self.files.prepared else table.nbytes
        with self.lock:
            self.reads += 1
            self.held[block] = (decoded, size)
            self.bytes += size
            while self.bytes > self.limit and len(self.held) > 1:
                _, (_, old) = self.held.popitem(last=False)
                self.bytes -= old
        return decoded


Transform = Callable[[Any], tuple[Any, Any]]


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
    kind = col.type
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        offsets = None if pa.types.is_fixed_size_list(kind) else np.diff(col.offsets.to_numpy())
        if offsets is not None and len(offsets) and (offsets != offsets[0]).any():
            raise UserError(f"{where}: column {name!r} holds lists of different lengths")
        values = col.flatten().to_numpy(zero_copy_only=False)
        return values.reshape(len(col), -1)
    return col.to_numpy(zero_copy_only=False).reshape(len(col), 1)


def _numeric(kind: Any) -> str | None:
    """'int', 'float' or 'bool' for a number column (or a list of them), else None."""
    pa = _pa()
    while (
        pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
    ):
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


class Columns:
    """Turns a table of rows into (features, labels) tensors: named columns, or a transform."""

    def __init__(self, features: list[str], label: str, task: str, transform: Transform | None,
                 root: Path) -> None:  # fmt: skip
        self.features, self.label, self.task = features, label, task
        self.transform, self.root = transform, root
        self.float_features = True

    @property
    def read(self) -> list[str]:
        return [*self.features, *([self.label] if self.label not in self.features else [])]

    def decode(self, table: Any) -> Any:
        """A block as the reader keeps it: the table (for a transform), or numpy views of
        each feature column and of the label (copies only where arrow must convert),
        the label checked once here."""
        if self.transform is not None:
            return table
        xs = [_matrix(table.column(c), c, self.root) for c in self.features]
        ys = _matrix(table.column(self.label), self.label, self.root)
        y = ys if self.task == "language-model" else ys[:, 0]
        _label_tensor(torch.from_numpy(np.array(y)), self.task, self.root)  # NaN, fractions
        return xs, y

    def gather(self, pieces: list[tuple[Any, np.ndarray]]) -> Batch:
        """(features, labels) of the rows ``local`` of each decoded block, in order."""
        if self.transform is not None:
            pa = _pa()
            return self(pa.concat_tables([t.take(pa.array(i)) for t, i in pieces]))
        dtype = np.float32 if self.float_features else np.int64
        x = np.concatenate(
            [
                np.concatenate([c[i] for c in xs], axis=1, dtype=dtype, casting="unsafe")
                for (xs, _), i in pieces
            ]
        )
        y = np.concatenate([ys[i] for (_, ys), i in pieces])
        return torch.from_numpy(x), _label_tensor(torch.from_numpy(y), self.task, self.root)

    def __call__(self, table: Any) -> Batch:
        if self.transform is not None:
            try:
                x, y = self.transform(table)
            except UserError:
                raise
            except Exception as e:
                raise UserError(f"--data-transform failed on rows of {self.root}: "
                                f"{type(e).__name__}: {e}") from None  # fmt: skip
            x, y = _tensor(x), _tensor(y)
        else:
            parts = [_matrix(table.column(c), c, self.root) for c in self.features]
            xs = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
            x = _tensor(xs, np.float32 if self.float_features else np.int64)
            ys = _matrix(table.column(self.label), self.label, self.root)
            y = _tensor(ys if self.task == "language-model" else ys[:, 0])
        return x, _label_tensor(y, self.task, self.root)


def _tensor(a: Any, dtype: Any = None) -> torch.Tensor:
    """A tensor owning writable memory (arrow's buffers are read-only)."""
    if torch.is_tensor(a):
        return a
    arr = np.asarray(a, dtype=dtype)
    if not arr.flags.writeable or not arr.flags.c_contiguous:
        arr = np.array(arr, order="C")
    return torch.from_numpy(arr)


def _label_tensor(y: torch.Tensor, task: str, where: Path) -> torch.Tensor:
    if task in ("regression", "binary"):
        y = y.float()
        if torch.isnan(y).any():
            raise UserError(f"{where}: NaN labels in the rows read")
        return y
    if y.is_floating_point():
        if torch.isnan(y).any():
            raise UserError(f"{where}: NaN labels in the rows read")
        if (y != y.round()).any():
            raise UserError(f"{where}: {task} labels must be whole numbers, got fractions")
    return y.long()


class DiskRows:
    """The training rows of a dataset on disk: ``take(rows)`` reads them.

    ``rows`` should be sorted (the sampler's steps are): each block is then
    looked up once per call.
    """

    def __init__(self, files: Files, columns: Columns, cache_bytes: int) -> None:
        self.files, self.columns = files, columns
        self.cache = BlockCache(files, columns.read, cache_bytes, columns.decode)

    def __len__(self) -> int:
        return self.files.rows

    @property
    def blocks(self) -> list[int]:
        return self.files.blocks

    def take(self, rows: np.ndarray) -> Batch:
        """(features, labels) of ``rows``, in the order given."""
        rows = np.asarray(rows, dtype=np.int64)
        ordered = len(rows) < 2 or bool((rows[1:] >= rows[:-1]).all())
        order = None if ordered else np.argsort(rows, kind="stable")
        srt = rows if order is None else rows[order]
        if len(srt) and (srt[0] < 0 or srt[-1] >= self.files.rows):
            raise IndexError(f"row {int(srt[-1])} out of range ({self.files.rows} rows)")
        if not len(srt):
            srt = np.zeros(0, np.int64)
        ends = self.files.ends
        block = np.searchsorted(ends, srt, side="right")
        cuts = np.flatnonzero(np.diff(block)) + 1
        firsts = block[np.r_[0, cuts]] if len(srt) else np.zeros(1, np.int64)
        pieces = []
        for chunk, b in zip(np.split(srt, cuts) if len(srt) else [srt], firsts):
            start = int(ends[b - 1]) if b > 0 else 0
            pieces.append((self.cache.get(int(b)), chunk - start))
        x, y = self.columns.gather(pieces)
        if order is not None:
            back = torch.from_numpy(np.argsort(order, kind="stable"))
            x, y = x[back], y[back]
        return x, y


def _resolve_columns(files: Files, cfg: DataConfig, meta: dict[str, Any]) -> tuple[list[str], str]:
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


def _infer_task(
    cfg: DataConfig, meta: dict[str, Any], label_kind: str | None, is_list: bool
) -> str:
    if cfg.task != "auto":
        return cfg.task
    if meta.get("task"):
        return str(meta["task"])
    if is_list:
        return "language-model"
    return {"float": "regression", "int": "classification", "bool": "binary"}.get(
        label_kind or "", "regression"
    )


def check_labels(files: Files, label: str, task: str) -> int:
    """Scan the label column of every file (nulls, NaN, range); the largest label + 1 for
    classification (1 otherwise). One line naming the file on a bad label."""
    biggest = -1
    for b, (shard_i, _) in enumerate(files._where):
        shard = files.shards[shard_i]
        col = files.read_block(b, [label]).column(label)
        if col.null_count:
            raise UserError(f"{shard.path}: column {label!r} has {col.null_count} null labels")
        values = (
            np.concatenate([_matrix(c, label, shard.path).ravel() for c in col.chunks])
            if col.num_chunks
            else np.zeros(0)
        )
        if values.dtype.kind == "f" and np.isnan(values).any():
            first = int(np.flatnonzero(np.isnan(values))[0])
            raise UserError(f"{shard.path}: column {label!r} has NaN labels (row {first} of "
                            f"row group {files._where[b][1]})")  # fmt: skip
        if task in ("classification", "language-model") and len(values):
            if values.min() < 0:
                raise UserError(f"{shard.path}: column {label!r} has negative class labels")
            biggest = max(biggest, int(values.max()))
    return biggest + 1 if task in ("classification", "language-model") else 1


@dataclass
class Opened:
    """What :func:`open_disk` found: the training rows, the test split, the facts."""

    rows: DiskRows
    test: Batch | None
    test_reference: np.ndarray | None
    """The reference column of the test rows (the true model's probabilities), if any."""
    task: str
    num_outputs: int
    input_shape: tuple[int, ...]
    meta: dict[str, Any]
    fingerprint: dict[str, str]


def _ctr_transform(cfg: DataConfig) -> Transform:
    from shoal.data.ctr import ctr_transform

    return ctr_transform(cfg.table_rows)


BUILTIN_TRANSFORMS: dict[str, Callable[[DataConfig], Transform]] = {"ctr": _ctr_transform}
"""Transforms a generator may name in its metadata."""


def open_disk(cfg: DataConfig, check: bool = False) -> Opened:
    """Open ``cfg.name`` (``parquet:PATH``); ``check`` also scans every label (the launcher
    does, once, so workers need not)."""
    path = disk_path(cfg.name)
    if not path:
        raise UserError("--data parquet:PATH needs a path")
    train_root, test_root = split_roots(path)
    files = Files(train_root)
    meta = files.metadata
    features, label = _resolve_columns(files, cfg, meta)
    transform: Transform | None = None
    if cfg.transform:
        transform = import_ref(cfg.transform, "--data-transform")
    elif meta.get("transform") in BUILTIN_TRANSFORMS:
        transform = BUILTIN_TRANSFORMS[str(meta["transform"])](cfg)
    label_kind = _numeric(files.field(label))
    is_list = _is_list(files.field(label))
    if transform is None:
        if label_kind is None:
            raise UserError(f"{files.shards[0].path}: label column {label!r} is "
                            f"{files.field(label)}; labels must be numbers (or decode them "
                            "with --data-transform)")  # fmt: skip
        kinds = []
        for c in features:
            kind = _numeric(files.field(c))
            if kind is None:
                raise UserError(f"{files.shards[0].path}: feature column {c!r} is "
                                f"{files.field(c)}; shoal trains on numbers: decode it with "
                                "--data-transform package.module:function")  # fmt: skip
            kinds.append(kind)
        for c in [*features, label]:
            for shard, nulls in files.null_counts(c):
                if nulls:
                    what = "labels" if c == label else "values"
                    raise UserError(f"{shard.path}: column {c!r} has {nulls} null {what}")
    task = _infer_task(cfg, meta, label_kind, is_list)
    columns = Columns(features, label, task, transform, train_root)
    if transform is None:
        columns.float_features = any(k == "float" for k in kinds)
    rows = DiskRows(files, columns, cfg.cache_mb << 20)
    classes = check_labels(files, label, task) if check and transform is None else None
    first = rows.take(np.arange(min(64, len(rows))))
    if meta.get("num_outputs"):
        num_outputs = int(meta["num_outputs"])
    elif task in ("classification", "language-model"):
        if transform is not None:
            num_outputs = int(first[1].max()) + 1
        else:
            num_outputs = classes if classes is not None else check_labels(files, label, task)
    else:
        num_outputs = 1
    test = reference = None
    if test_root is not None:
        tfiles = Files(test_root)
        for c in columns.read:
            tfiles.field(c)
        ref = str(meta.get("reference_column", ""))
        extra = [ref] if ref and ref in tfiles.schemas[0].names else []
        table = tfiles.read_all([*columns.read, *extra])
        test = columns(table)
        if extra:
            reference = table.column(ref).to_numpy()
    shape = tuple(first[0].shape[1:])
    return Opened(rows, test, reference, task, num_outputs, shape, meta, files.fingerprint())
