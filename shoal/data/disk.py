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
type that is not a number or a flat list of numbers, nulls, a truncated or
corrupt file; with ``check`` (the launcher) every row of the label and list
columns too: NaN or infinite labels, labels the task cannot take, a list width
that differs between rows or files, and the model's outputs (a writer's
``num_outputs`` included) against every label. See docs/DATA.md.
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
from shoal.data.scan import (
    CLASSES,
    _is_list,
    _matrix,
    _numeric,
    check_columns,
    check_task,
    count_outputs,
    infer_task,
    resolve_columns,
    scan_rows,
)
from shoal.errors import UserError
from shoal.registry import import_ref, reads

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


class Columns:
    """Turns a table of rows into (features, labels) tensors: named columns, or a transform."""

    def __init__(self, features: list[str], label: str, task: str, transform: Transform | None,
                 root: Path) -> None:  # fmt: skip
        self.features, self.label, self.task = features, label, task
        self.transform, self.root = transform, root
        self.float_features = True
        self.widths: dict[str, int] = {}
        """Values per row of each column, from the first rows decoded (or the launcher's
        scan): rows of another width are one line, not a failed concatenation."""

    @property
    def read(self) -> list[str]:
        return [*self.features, *([self.label] if self.label not in self.features else [])]

    def _matrix(self, table: Any, name: str, where: Path) -> np.ndarray:
        m = _matrix(table.column(name), name, where)
        want = self.widths.setdefault(name, m.shape[1])
        if m.shape[1] != want:
            raise UserError(f"{where}: column {name!r} holds {m.shape[1]} values per row, "
                            f"{want} in the rows read before; a column has one width in "
                            "every file")  # fmt: skip
        return m

    def decode(self, table: Any) -> Any:
        """A block as the reader keeps it: the table (for a transform), or numpy views of
        each feature column and of the label (copies only where arrow must convert),
        the label checked once here."""
        if self.transform is not None:
            return table
        xs = [self._matrix(table, c, self.root) for c in self.features]
        ys = self._matrix(table, self.label, self.root)
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

    def __call__(self, table: Any, where: Path | None = None) -> Batch:
        """(features, labels) of a table's rows; ``where`` names them in an error (the
        training files' root by default)."""
        where = where or self.root
        if self.transform is not None:
            try:
                x, y = self.transform(table)
            except UserError:
                raise
            except Exception as e:
                raise UserError(f"--data-transform failed on rows of {where}: "
                                f"{type(e).__name__}: {e}") from None  # fmt: skip
            x, y = _tensor(x), _tensor(y)
        else:
            parts = [self._matrix(table, c, where) for c in self.features]
            xs = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
            x = _tensor(xs, np.float32 if self.float_features else np.int64)
            ys = self._matrix(table, self.label, where)
            y = _tensor(ys if self.task == "language-model" else ys[:, 0])
        return x, _label_tensor(y, self.task, where)


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


@reads("features", "label", "transform", "task", "table_rows", "cache_mb")
def open_disk(cfg: DataConfig, check: bool = False) -> Opened:
    """Open ``cfg.name`` (``parquet:PATH``); ``check`` also scans every label and list
    column (the launcher does, once, so workers need not)."""
    path = disk_path(cfg.name)
    if not path:
        raise UserError("--data parquet:PATH needs a path")
    train_root, test_root = split_roots(path)
    files = Files(train_root)
    meta = files.metadata
    features, label = resolve_columns(files, cfg, meta)
    transform: Transform | None = None
    if cfg.transform:
        transform = import_ref(cfg.transform, "--data-transform")
    elif meta.get("transform") in BUILTIN_TRANSFORMS:
        transform = BUILTIN_TRANSFORMS[str(meta["transform"])](cfg)
    label_kind = _numeric(files.field(label))
    task = infer_task(cfg, meta, label_kind, _is_list(files.field(label)))
    columns = Columns(features, label, task, transform, train_root)
    scan = None
    if transform is None:
        kinds = check_columns(files, features, label)
        check_task(files, features, label, task)
        columns.float_features = any(k == "float" for k in kinds)
        if check or (task in CLASSES and "num_outputs" not in meta):
            scan = scan_rows(files, columns, task)
            columns.widths.update(scan.widths)
    rows = DiskRows(files, columns, cfg.cache_mb << 20)
    first = rows.take(np.arange(min(64, len(rows))))
    if task == "language-model" and transform is None and first[0].shape != first[1].shape:
        raise UserError(f"{files.shards[0].path}: a language model predicts a token for "
                        f"each input token, but the features hold {first[0].shape[1]} per "
                        f"row and the label {first[1].shape[1]}")  # fmt: skip
    num_outputs = count_outputs(files, meta, task, scan, first)
    test = reference = None
    if test_root is not None:
        test, reference = _open_test(test_root, columns, meta, first, num_outputs)
    shape = tuple(first[0].shape[1:])
    return Opened(rows, test, reference, task, num_outputs, shape, meta, files.fingerprint())


def _open_test(root: Path, columns: Columns, meta: dict[str, Any], first: Batch,
               num_outputs: int) -> tuple[Batch, np.ndarray | None]:  # fmt: skip
    """The held-out split, read whole, in the shapes of the training rows, its labels
    (and a language model's tokens) within the model's outputs."""
    tfiles = Files(root)
    if columns.transform is None:
        check_columns(tfiles, columns.features, columns.label)
    else:
        for c in columns.read:
            tfiles.field(c)
    ref = str(meta.get("reference_column", ""))
    extra = [ref] if ref and ref in tfiles.schemas[0].names else []
    table = tfiles.read_all([*columns.read, *extra])
    test = columns(table, root)
    for got, want, what in zip(test, first, ("features", "labels")):
        if got.shape[1:] != want.shape[1:]:
            raise UserError(f"{root}: its {what} have shape {tuple(got.shape[1:])} per row, "
                            f"{tuple(want.shape[1:])} in the training files")  # fmt: skip
    if columns.task in CLASSES:
        ids = [test[1], *([test[0]] if columns.task == "language-model" else [])]
        for t in ids:
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_outputs):
                raise UserError(f"{root}: its rows hold class or token ids from {int(t.min())} "
                                f"to {int(t.max())}; the model has {num_outputs} outputs "
                                "(from the training files)")  # fmt: skip
    return test, (table.column(ref).to_numpy() if extra else None)
