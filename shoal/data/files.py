"""The files of a dataset on disk: which they are, their row groups, schemas and
fingerprints, read from the footers alone (see :mod:`shoal.data.disk` for reading rows).

A directory is listed as Spark, pandas, Polars or DuckDB write it: ``*.parquet``
files in path order, in partition subdirectories too, names starting with ``_``
or ``.`` skipped; a directory ``shoal data prepare`` wrote is listed by its index.
A file's fingerprint hashes its name, size and footer (Parquet's, or the Arrow
file's), so a file changed or replaced since a run started is named when the run
resumes.

Nothing read here is taken on trust: an index entry must name a plain file inside
its directory, with the size and rows it claims; the SHA-256 it records is what
:meth:`Files.verify` (``shoal data info --verify``) recomputes; the ``shoal``
metadata a writer left in a schema must have the shape :func:`shoal_meta` states.
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import json
from collections.abc import Callable
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
INDEX_FORMAT = 1
"""The version of the index this code writes and reads."""
TASKS = ("regression", "classification", "binary", "language-model")
MAX_OUTPUTS = 1 << 22
"""The most outputs (classes, vocabulary) a dataset may ask the model for: beyond this
a head is gigabytes of parameters, and a label column or metadata claiming more is a
mistake (a wrong column, a corrupt file), not a request."""


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
        return [_inside(root, f["name"]) for f in read_index(root)["files"]]
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


def read_index(root: Path) -> dict[str, Any]:
    """The index of a prepared directory, every entry checked for its form: a plain
    file name (once), a size, a row count and a SHA-256. One line on anything else."""
    where = root / INDEX
    try:
        index = json.loads(where.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise UserError(f"{where}: not a readable shoal index ({_why(e)})") from None
    if not isinstance(index, dict) or not isinstance(index.get("files"), list):
        raise UserError(f"{where}: not a shoal index (no list of files)")
    if index.get("format", INDEX_FORMAT) != INDEX_FORMAT:
        raise UserError(f"{where}: index format {index.get('format')!r}; this shoal reads "
                        f"format {INDEX_FORMAT}: prepare the data again")  # fmt: skip
    seen: set[str] = set()
    for i, entry in enumerate(index["files"]):
        what = f"{where}: entry {i}"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise UserError(f"{what} has no file name")
        name = entry["name"]
        if not _plain_name(name):
            raise UserError(f"{what} names {name!r}; an index names files inside its own "
                            "directory, by name alone (no '/', no '..')")  # fmt: skip
        if name in seen:
            raise UserError(f"{what} names {name} a second time: its rows would count twice")
        seen.add(name)
        for key in ("size", "rows"):
            if not _count(entry.get(key)):
                raise UserError(f"{what} ({name}): {key} {entry.get(key)!r} is not a count")
        digest = entry.get("sha256")
        if not (isinstance(digest, str) and len(digest) == 64 and _is_hex(digest)):
            raise UserError(f"{what} ({name}): sha256 {digest!r} is not a SHA-256 digest")
    return index


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


def _plain_name(name: str) -> bool:
    """A file name with no directory part (nothing that could point elsewhere), and no
    control characters (it is shown in one-line errors)."""
    return bool(name) and name not in (".", "..") and not any(c in "/\\" or c < " " for c in name)


def _inside(root: Path, name: str) -> Path:
    """``root / name``, refused if a symbolic link takes it out of ``root``."""
    path = root / name
    real, home = path.resolve(), root.resolve()
    if real == home or not real.is_relative_to(home):
        raise UserError(f"{path}: listed in {root / INDEX}, but it leads to {real}, outside "
                        f"{root}; a prepared directory holds its own files")  # fmt: skip
    return path


def _footer_hash(path: Path, size: int, name: str) -> str:
    """Hash of a Parquet file's name, size and footer."""
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


ARROW_MAGIC = b"ARROW1"


def _arrow_footer_hash(path: Path, size: int, name: str) -> str:
    """Hash of an Arrow IPC file's name, size and footer (its schema and where each record
    batch lies): what a Parquet file's fingerprint covers, at the same cost."""
    h = hashlib.sha256(f"{name}\0{size}\0".encode())
    with path.open("rb") as f:
        f.seek(max(0, size - 10))
        tail = f.read(10)
        if len(tail) != 10 or tail[4:] != ARROW_MAGIC:
            raise UserError(f"{path}: not an Arrow file, or truncated (no footer)")
        length = int.from_bytes(tail[:4], "little", signed=True)
        if length <= 0 or length + 10 + 8 > size:
            raise UserError(f"{path}: truncated Arrow file (footer of {length} bytes)")
        f.seek(size - 10 - length)
        h.update(f.read(length))
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file's bytes, read 4 MiB at a time."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


META_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    **{
        key: ("a string", lambda v: isinstance(v, str))
        for key in ("generator", "label", "transform", "reference_column", "vocab", "split")
    },
    **{key: ("a count", _count) for key in ("seed", "context", "distinct_rows")},
    **{key: ("a number", _number) for key in ("true_bias", "noise")},
    "features": ("a list of column names", _names),
    "true_weights": ("a list of numbers", lambda v: isinstance(v, list) and all(map(_number, v))),
    "task": ("one of " + ", ".join(TASKS), lambda v: v in TASKS),
    "num_outputs": (
        f"a number of outputs from 1 to {MAX_OUTPUTS}",
        lambda v: _count(v) and 1 <= v <= MAX_OUTPUTS,
    ),
}
"""The ``shoal`` metadata fields a generator may write: what each must be, its check.
Fields not named here are ignored."""


def shoal_meta(schema: Any, where: Path) -> dict[str, Any]:
    """The ``shoal`` metadata of a schema (``{}`` if none), its fields checked: what a
    generator writes there steers training (columns, task, the model's outputs), so a
    field of the wrong kind is one line here rather than a crash in every worker."""
    raw = (schema.metadata or {}).get(META_KEY)
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError):
        meta = None
    if not isinstance(meta, dict):
        raise UserError(f"{where}: its '{META_KEY.decode()}' schema metadata is not a JSON "
                        "object; rewrite the file, or remove that key")  # fmt: skip

    def bad(key: str, want: str) -> UserError:
        shown = json.dumps(meta[key])
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        return UserError(f"{where}: its metadata says {key} = {shown}, not {want}")

    for key, (want, ok) in META_FIELDS.items():
        if key in meta and not ok(meta[key]):
            raise bad(key, want)
    if "true_weights" in meta and "true_bias" not in meta:
        raise UserError(f"{where}: its metadata has true_weights but no true_bias")
    return meta


class Files:
    """The files of one split (train or test), with their schema and row index."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.prepared = (root / INDEX).is_file()
        self.shards: list[Shard] = []
        self.schemas: list[Any] = []
        self.footers: dict[int, Any] = {}  # Parquet metadata by shard (statistics)
        self.checksums: dict[int, str] = {}  # SHA-256 by shard, as the index records it
        base = root if root.is_dir() else root.parent
        if self.prepared:
            for entry in read_index(root)["files"]:
                self._add_arrow(_inside(root, entry["name"]), entry)
        else:
            for path in list_files(root):
                self._add_parquet(path, str(path.relative_to(base)))
        self.blocks = [b for s in self.shards for b in s.blocks if b > 0]
        # where each block lives: (shard, block within it), and its first row
        self._where = [
            (i, j) for i, s in enumerate(self.shards) for j, b in enumerate(s.blocks) if b > 0
        ]
        self.ends = np.cumsum(self.blocks, dtype=np.int64) if self.blocks else np.zeros(0, np.int64)
        self.rows = int(self.ends[-1]) if len(self.ends) else 0
        if self.rows == 0:
            raise UserError(f"{root}: the files hold no rows")
        self.metadata = shoal_meta(self.schemas[0], self.shards[0].path)
        """The ``shoal`` schema metadata of the first file (empty for others' files)."""
        for shard, schema in zip(self.shards[1:], self.schemas[1:]):
            shoal_meta(schema, shard.path)  # each file's, checked: any may come first later

    def _add_parquet(self, path: Path, name: str) -> None:
        pa = _pa()
        size = path.stat().st_size
        fingerprint = _footer_hash(path, size, name)
        try:
            meta = pa.parquet.ParquetFile(path).metadata
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"{path}: not a readable Parquet file ({_why(e)})") from None
        blocks = tuple(meta.row_group(g).num_rows for g in range(meta.num_row_groups))
        self.footers[len(self.shards)] = meta
        self.shards.append(Shard(path, name, sum(blocks), blocks, size, fingerprint))
        self.schemas.append(meta.schema.to_arrow_schema())

    def _add_arrow(self, path: Path, entry: dict[str, Any]) -> None:
        """A file a prepared index lists, held to what the index says of it."""
        listed = f"listed in {self.root / INDEX}"
        try:
            if not path.is_file():
                raise UserError(f"{path}: not a file ({listed})")
            size = path.stat().st_size
        except OSError as e:
            raise UserError(f"{path}: {e.strerror} ({listed})") from None
        if size != entry["size"]:
            raise UserError(f"{path}: {size} bytes, the index says {entry['size']}")
        fingerprint = _arrow_footer_hash(path, size, path.name)
        reader = self._open_arrow(path)
        try:
            blocks = tuple(reader.get_batch(b).num_rows for b in range(reader.num_record_batches))
        except (_pa().ArrowException, OSError) as e:
            raise UserError(f"{path}: not a readable Arrow file ({_why(e)})") from None
        if sum(blocks) != entry["rows"]:
            raise UserError(f"{path}: {sum(blocks)} rows, the index says {entry['rows']}")
        self.checksums[len(self.shards)] = entry["sha256"]
        self.shards.append(Shard(path, path.name, sum(blocks), blocks, size, fingerprint))
        self.schemas.append(reader.schema)

    @staticmethod
    def _open_arrow(path: Path) -> Any:
        pa = _pa()
        try:
            return pa.ipc.open_file(pa.memory_map(str(path)))
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"{path}: not a readable Arrow file ({_why(e)})") from None

    def verify(self) -> None:
        """Read every byte of a prepared directory's files against the SHA-256 its index
        records (``shoal data info --verify``); one line naming the first that differs.
        Training does not do this at each start: it reads every byte of the dataset."""
        for i, shard in enumerate(self.shards):
            if i in self.checksums and sha256_file(shard.path) != self.checksums[i]:
                raise UserError(f"{shard.path}: its SHA-256 differs from the one "
                                f"{self.root / INDEX} records: the file changed or is "
                                "corrupt; prepare it again")  # fmt: skip

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
