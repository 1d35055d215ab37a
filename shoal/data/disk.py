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
from shoal.data.files import MAX_OUTPUTS, Files, _pa, disk_path, split_roots
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


CLASSES = ("classification", "language-model")
"""Tasks whose labels are class numbers (tokens): the model has one output per class."""


def _check_columns(files: Files, features: list[str], label: str) -> list[str]:
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


def _check_task(files: Files, features: list[str], label: str, task: str) -> None:
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


def scan_rows(files: Files, columns: Columns, task: str) -> Scan:
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


def _num_outputs(files: Files, meta: dict[str, Any], task: str, scan: Scan | None,
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
    features, label = _resolve_columns(files, cfg, meta)
    transform: Transform | None = None
    if cfg.transform:
        transform = import_ref(cfg.transform, "--data-transform")
    elif meta.get("transform") in BUILTIN_TRANSFORMS:
        transform = BUILTIN_TRANSFORMS[str(meta["transform"])](cfg)
    label_kind = _numeric(files.field(label))
    task = _infer_task(cfg, meta, label_kind, _is_list(files.field(label)))
    columns = Columns(features, label, task, transform, train_root)
    scan = None
    if transform is None:
        kinds = _check_columns(files, features, label)
        _check_task(files, features, label, task)
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
    num_outputs = _num_outputs(files, meta, task, scan, first)
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
        _check_columns(tfiles, columns.features, columns.label)
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
