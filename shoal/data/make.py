"""``shoal data make``: the built-in generators written as Parquet, at any size, in
bounded memory.

Rows are made ``CHUNK`` at a time and written as they come (one row group per
chunk, a new file every ``--file-rows``), to ``OUT/train`` and ``OUT/test``;
files appear under their final names only once whole (written to ``.tmp``
names, then renamed), and ``_SUCCESS`` marks a finished dataset, as Spark does.
What the data is (feature and label columns, task, transform, the true model)
rides in each file's schema metadata, so ``--data parquet:OUT`` needs no flags.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from shoal.data.ctr import CTR_META, ctr_columns
from shoal.data.datasets import linear_columns, linear_truth
from shoal.data.files import META_KEY
from shoal.data.text import text_columns
from shoal.errors import UserError

CHUNK = 1 << 16
"""Rows generated at once, at most."""
ROW_GROUP_BYTES = 8 << 20
"""Decoded bytes per row group, about: a worker decodes whole row groups, so smaller
ones let a block shuffle's window fit in its cache."""

Columns = dict[str, np.ndarray]


def _ctr(
    rows: int, split: int, seed: int, opts: dict[str, Any]
) -> tuple[Iterator[Columns], dict[str, Any]]:
    def chunks() -> Iterator[Columns]:
        for start in range(0, rows, CHUNK):
            yield ctr_columns(seed, start, min(CHUNK, rows - start), split)

    return chunks(), dict(CTR_META)


def _linear(
    rows: int, split: int, seed: int, opts: dict[str, Any]
) -> tuple[Iterator[Columns], dict[str, Any]]:
    d, noise = int(opts["features"]), float(opts["noise"])
    w, b = linear_truth(seed, d)

    def chunks() -> Iterator[Columns]:
        for i, start in enumerate(range(0, rows, CHUNK)):
            yield linear_columns(seed, i, min(CHUNK, rows - start), split, d, noise)

    meta = {"generator": "linear", "features": ["x"], "label": "label", "task": "regression",
            "num_outputs": 1, "true_weights": w.tolist(), "true_bias": b,
            "noise": noise}  # fmt: skip
    return chunks(), meta


def _text(
    rows: int, split: int, seed: int, opts: dict[str, Any]
) -> tuple[Iterator[Columns], dict[str, Any]]:
    context = int(opts["context"])
    _, meta = text_columns(context, 0, 1, split)

    def chunks() -> Iterator[Columns]:
        for start in range(0, rows, CHUNK):
            yield text_columns(context, start, min(CHUNK, rows - start), split)[0]

    return chunks(), {"generator": "text", "features": ["tokens"], "label": "next",
                      "task": "language-model", "context": context, **meta}  # fmt: skip


GENERATORS: dict[str, Callable[..., tuple[Iterator[Columns], dict[str, Any]]]] = {
    "ctr": _ctr,
    "linear": _linear,
    "text": _text,
}
"""Generators by name: ``(rows, split, seed, options) -> (column chunks, metadata)``."""


def _table(columns: Columns, meta: dict[str, Any]) -> Any:
    import pyarrow as pa

    arrays, names = [], []
    for name, values in columns.items():
        if values.ndim == 2:
            flat = pa.array(values.reshape(-1))
            arrays.append(pa.FixedSizeListArray.from_arrays(flat, values.shape[1]))
        else:
            arrays.append(pa.array(values))
        names.append(name)
    return pa.table(arrays, names=names, metadata={META_KEY: json.dumps(meta).encode()})


def write_split(
    name: str, rows: int, out: Path, split: int, seed: int, opts: dict[str, Any],
    file_rows: int, compression: str, progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Write one split of generator ``name`` under ``out``; its metadata."""
    import pyarrow.parquet as pq

    chunks, meta = GENERATORS[name](rows, split, seed, opts)
    meta = {**meta, "seed": seed, "split": "train" if split == 0 else "test"}
    out.mkdir(parents=True, exist_ok=True)
    writer = None
    path = tmp = None
    in_file = file_index = 0
    try:
        for columns in chunks:
            table = _table(columns, meta)
            pieces = -(-table.nbytes // ROW_GROUP_BYTES)  # row groups of about equal size
            group = max(1024, -(-table.num_rows // max(1, pieces)))
            if writer is None:
                path = out / f"part-{file_index:05d}.parquet"
                tmp = path.with_name("." + path.name + ".tmp")
                writer = pq.ParquetWriter(tmp, table.schema, compression=compression)
            writer.write_table(table, row_group_size=group)
            in_file += table.num_rows
            if progress is not None:
                progress(table.num_rows)
            if in_file >= file_rows:
                writer.close()
                os.replace(tmp, path)
                writer, in_file, file_index = None, 0, file_index + 1
        if writer is not None:
            writer.close()
            os.replace(tmp, path)
            writer = None
    finally:
        if writer is not None:
            writer.close()
        if tmp is not None and tmp.exists():
            tmp.unlink()
    return meta


def default_test_rows(rows: int) -> int:
    """Held-out rows when none are asked for: a tenth, between 1,000 and 100,000."""
    return max(1_000, min(rows // 10, 100_000))


def make(
    name: str, rows: int, out: Path, *, seed: int = 1234, test_rows: int | None = None,
    file_rows: int = 1 << 20, compression: str = "snappy", options: dict[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Write dataset ``name`` with ``rows`` training rows to ``out`` (train/, test/)."""
    if name not in GENERATORS:
        raise UserError(f"unknown generator {name!r}; built-in: {', '.join(GENERATORS)}")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out}: not empty; shoal data make writes a new directory")
    if test_rows is None:
        test_rows = default_test_rows(rows)
    opts = {"features": 32, "noise": 0.1, "context": 64, **(options or {})}
    try:
        meta = write_split(
            name, rows, out / "train", 0, seed, opts, file_rows, compression, progress
        )
        if test_rows:
            write_split(
                name, test_rows, out / "test", 1, seed, opts, file_rows, compression, progress
            )
        (out / "_SUCCESS").write_text("")
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # nothing half-written that looks whole
        raise
    return {**meta, "rows": rows, "test_rows": test_rows}
