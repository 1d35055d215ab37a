"""The files of a dataset on disk: which they are, their row groups, schemas and
fingerprints, read from the footers alone (see :mod:`shoal.data.disk` for reading rows).

A directory is listed as Spark, pandas, Polars or DuckDB write it: ``*.parquet``
files in path order, in partition subdirectories too, names starting with ``_``
or ``.`` skipped; a directory ``shoal data prepare`` wrote is listed by its index.
A file's fingerprint hashes its name, size and footer, so a file changed or
replaced since a run started is named when the run resumes.
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shoal.config import DataConfig
from shoal.errors import UserError

PREFIX = "parquet:"
META_KEY = b"shoal"
INDEX = "shoal-index.json"
"""The index ``shoal data prepare`` writes beside its Arrow files."""
SKIP = ("_", ".")
"""File and directory names starting with these are not data (``_SUCCESS``, ``.crc``)."""


def _why(e: BaseException) -> str:
    """An exception's message on one line (pyarrow's may span several)."""
    return " ".join(str(e).split())[:300]


def disk_path(name: str) -> str | None:
    """The path of a ``parquet:PATH`` dataset name, else ``None``."""
    return name[len(PREFIX) :] if name.startswith(PREFIX) else None


def _pa() -> Any:
    import pyarrow
    import pyarrow.ipc
    import pyarrow.parquet

    return pyarrow


@dataclass(frozen=True)
class Shard:
    """One file of a dataset."""

    path: Path
    name: str
    """Its path relative to the dataset's root."""
    rows: int
    blocks: tuple[int, ...]
    """Rows of each row group (Parquet) or record batch (Arrow)."""
    size: int
    fingerprint: str
    """Hash of its name, size and footer: a file changed or replaced since differs."""


def list_files(root: Path) -> list[Path]:
    """The data files under ``root`` in path order (or ``[root]`` for a file)."""
    if not root.exists():
        raise UserError(f"{root}: no such file or directory")
    if root.is_file():
        return [root]
    if (root / INDEX).is_file():
        return [root / f["name"] for f in _read_index(root)["files"]]
    files = [
        p
        for p in sorted(root.rglob("*"))
        if p.is_file()
        and not any(part.startswith(SKIP) for part in p.relative_to(root).parts)
        and p.suffix in (".parquet", ".parq", ".pq")
    ]
    if not files:
        raise UserError(f"{root}: no Parquet files (*.parquet) in it")
    return files


def _read_index(root: Path) -> dict[str, Any]:
    try:
        index = json.loads((root / INDEX).read_text())
        assert isinstance(index["files"], list)
        return index
    except (OSError, ValueError, KeyError, AssertionError, TypeError) as e:
        raise UserError(f"{root / INDEX}: not a readable shoal index ({_why(e)})") from None


def _footer_hash(path: Path, size: int, name: str) -> str:
    h = hashlib.sha256(f"{name}\0{size}\0".encode())
    with path.open("rb") as f:
        f.seek(max(0, size - 8))
        tail = f.read(8)
        if len(tail) != 8 or tail[4:] != b"PAR1":
            raise UserError(f"{path}: not a Parquet file, or truncated (no footer)")
        length = int.from_bytes(tail[:4], "little")
        if length + 12 > size:
            raise UserError(f"{path}: truncated Parquet file (footer larger than the file)")
        f.seek(size - 8 - length)
        h.update(f.read(length))
    return h.hexdigest()


class Files:
    """The files of one split (train or test), with their schema and row index."""

    def __init__(self, root: Path) -> None:
        pa = _pa()
        self.root = root
        self.prepared = (root / INDEX).is_file()
        self.shards: list[Shard] = []
        self.schemas: list[Any] = []
        self.footers: dict[int, Any] = {}  # Parquet metadata by shard (statistics)
        index = _read_index(root) if self.prepared else None
        base = root if root.is_dir() else root.parent
        for i, path in enumerate(list_files(root)):
            name = str(path.relative_to(base))
            try:
                size = path.stat().st_size
            except OSError as e:
                raise UserError(f"{path}: {e.strerror} (listed in {root / INDEX})") from None
            if index is not None:
                entry = index["files"][i]
                if size != entry["size"]:
                    raise UserError(f"{path}: {size} bytes, the index says {entry['size']}")
                reader = self._open_arrow(path)
                blocks = tuple(
                    reader.get_batch(b).num_rows for b in range(reader.num_record_batches)
                )
                schema, fingerprint = reader.schema, str(entry["sha256"])
            else:
                fingerprint = _footer_hash(path, size, name)
                try:
                    meta = pa.parquet.ParquetFile(path).metadata
                except (pa.ArrowException, OSError) as e:
                    raise UserError(f"{path}: not a readable Parquet file ({_why(e)})") from None
                blocks = tuple(meta.row_group(g).num_rows for g in range(meta.num_row_groups))
                schema = meta.schema.to_arrow_schema()
                self.footers[len(self.shards)] = meta
            self.shards.append(Shard(path, name, sum(blocks), blocks, size, fingerprint))
            self.schemas.append(schema)
        self.blocks = [b for s in self.shards for b in s.blocks if b > 0]
        # where each block lives: (shard, block within it), and its first row
        self._where = [
            (i, j) for i, s in enumerate(self.shards) for j, b in enumerate(s.blocks) if b > 0
        ]
        self.ends = np.cumsum(self.blocks, dtype=np.int64) if self.blocks else np.zeros(0, np.int64)
        self.rows = int(self.ends[-1]) if len(self.ends) else 0
        if self.rows == 0:
            raise UserError(f"{root}: the files hold no rows")

    @staticmethod
    def _open_arrow(path: Path) -> Any:
        pa = _pa()
        try:
            return pa.ipc.open_file(pa.memory_map(str(path)))
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"{path}: not a readable Arrow file ({_why(e)})") from None

    @property
    def metadata(self) -> dict[str, Any]:
        """The ``shoal`` schema metadata of the first file (empty for others' files)."""
        meta = self.schemas[0].metadata or {}
        raw = meta.get(META_KEY)
        if not raw:
            return {}
        try:
            value = json.loads(raw)
            return value if isinstance(value, dict) else {}
        except ValueError:
            return {}

    def fingerprint(self) -> dict[str, str]:
        """Each file's fingerprint, by name."""
        return {s.name: s.fingerprint for s in self.shards}

    def field(self, column: str) -> Any:
        """The column's type, the same in every file, or one line naming the file that differs."""
        first = None
        for shard, schema in zip(self.shards, self.schemas):
            if column not in schema.names:
                near = difflib.get_close_matches(column, schema.names, n=3)
                hint = f" (did you mean {', '.join(near)}?)" if near else ""
                shown = ", ".join(schema.names[:12]) + (" ..." if len(schema.names) > 12 else "")
                raise UserError(f"{shard.path}: no column {column!r}{hint}; its columns: {shown}")
            kind = schema.field(column).type
            if first is None:
                first = kind
            elif kind != first:
                raise UserError(
                    f"{shard.path}: column {column!r} is {kind}, but {first} in "
                    f"{self.shards[0].path}"
                )
        return first

    def columns(self, patterns: list[str]) -> list[str]:
        """Column names matching ``patterns`` (``*`` wildcards), in the files' order."""
        names = list(self.schemas[0].names)
        out: list[str] = []
        for pattern in patterns:
            if any(c in pattern for c in "*?["):
                hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
                if not hits:
                    raise UserError(f"{self.shards[0].path}: no column matches {pattern!r}")
                out += [h for h in hits if h not in out]
            else:
                self.field(pattern)
                if pattern not in out:
                    out.append(pattern)
        return out

    def null_counts(self, column: str) -> list[tuple[Shard, int]]:
        """Nulls of ``column`` per file, from the Parquet statistics where they exist."""
        out = []
        metas = self.footers
        for i, shard in enumerate(self.shards):
            meta = metas.get(i)
            if meta is None:
                continue
            col = meta.schema.names.index(column) if column in meta.schema.names else None
            if col is None:
                continue
            nulls = 0
            for g in range(meta.num_row_groups):
                stats = meta.row_group(g).column(col).statistics
                if stats is not None and stats.has_null_count:
                    nulls += stats.null_count
            out.append((shard, nulls))
        return out

    def read_block(self, block: int, columns: list[str]) -> Any:
        """Block ``block`` (a row group or record batch) as a pyarrow Table of ``columns``."""
        pa = _pa()
        shard_i, j = self._where[block]
        shard = self.shards[shard_i]
        try:
            if self.prepared:
                batch = self._open_arrow(shard.path).get_batch(j)
                return pa.Table.from_batches([batch]).select(columns)
            return pa.parquet.ParquetFile(shard.path).read_row_group(j, columns=columns)
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"{shard.path}: cannot read row group {j} ({_why(e)})") from None

    def read_all(self, columns: list[str]) -> Any:
        pa = _pa()
        return pa.concat_tables([self.read_block(b, columns) for b in range(len(self.blocks))])


def split_roots(path: str) -> tuple[Path, Path | None]:
    """The training and held-out roots of a ``parquet:PATH`` dataset."""
    root = Path(path).expanduser()
    if root.is_dir() and (root / "train").is_dir() and not (root / INDEX).is_file():
        return root / "train", (root / "test" if (root / "test").is_dir() else None)
    return root, None


def fingerprints(cfg: DataConfig) -> dict[str, str] | None:
    """Each training file's fingerprint (``None`` for data not on disk)."""
    path = disk_path(cfg.name)
    return None if path is None else Files(split_roots(path)[0]).fingerprint()


def check_unchanged(before: dict[str, str], now: dict[str, str], root: str) -> None:
    """One line naming a training file removed, added or changed since ``before``."""
    for name in sorted(before):
        if name not in now:
            raise UserError(f"{root}: {name} was removed since the run started; its samples "
                            "are part of every epoch: put it back or start a new run")  # fmt: skip
        if now[name] != before[name]:
            raise UserError(f"{root}: {name} changed since the run started (its digest "
                            "differs): the samples behind the saved position are not the "
                            "same; restore it or start a new run")  # fmt: skip
    for name in sorted(set(now) - set(before)):
        raise UserError(f"{root}: {name} is new since the run started; the epoch order "
                        "covers the rows the run began with: move it or start anew")  # fmt: skip
