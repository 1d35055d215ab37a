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
from shoal.data.order import splitmix64
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


class _Files:
    """Parquet files of one split under ``out``, written as row groups arrive: each file
    appears under its final name only once whole; :meth:`abort` leaves no partial one."""

    def __init__(self, out: Path, file_rows: int, compression: str) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.out, self.file_rows, self.compression = out, file_rows, compression
        self.writer: Any = None
        self.path = self.tmp = None
        self.in_file = self.index = 0

    def write(self, table: Any) -> None:
        import pyarrow.parquet as pq

        if not table.num_rows:
            return
        pieces = -(-table.nbytes // ROW_GROUP_BYTES)  # row groups of about equal size
        group = max(1024, -(-table.num_rows // max(1, pieces)))
        if self.writer is None:
            self.path = self.out / f"part-{self.index:05d}.parquet"
            self.tmp = self.path.with_name("." + self.path.name + ".tmp")
            self.writer = pq.ParquetWriter(self.tmp, table.schema, compression=self.compression)
        self.writer.write_table(table, row_group_size=group)
        self.in_file += table.num_rows
        if self.in_file >= self.file_rows:
            self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            os.replace(self.tmp, self.path)  # type: ignore[arg-type]
            self.writer, self.in_file, self.index = None, 0, self.index + 1

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.tmp is not None and self.tmp.exists():
            self.tmp.unlink()


def write_split(
    name: str, rows: int, out: Path, split: int, seed: int, opts: dict[str, Any],
    file_rows: int, compression: str, progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Write one split of generator ``name`` under ``out``; its metadata."""
    chunks, meta = GENERATORS[name](rows, split, seed, opts)
    meta = {**meta, "seed": seed, "split": "train" if split == 0 else "test"}
    files = _Files(out, file_rows, compression)
    try:
        for columns in chunks:
            table = _table(columns, meta)
            files.write(table)
            if progress is not None:
                progress(table.num_rows)
        files.close()
    finally:
        files.abort()
    return meta


CLICK_DIM, CLICK_USERS, CLICK_ITEMS = 8, 2000, 500
"""The clicks generator: features per user and per item, and how many of each."""
PARTIES = ("user", "item")
"""The clicks generator's parties: ``user`` holds the user columns, ``item`` the item
columns and the label."""


def click_truth(seed: int) -> dict[str, Any]:
    """The clicks generator's profiles and true model: every user's and item's features,
    and ``M``, ``b`` of ``P(click) = sigmoid(u^T M v + b)``."""
    rng = np.random.default_rng([seed, 7])
    users = rng.standard_normal((CLICK_USERS, CLICK_DIM)).astype(np.float32)
    items = rng.standard_normal((CLICK_ITEMS, CLICK_DIM)).astype(np.float32)
    m = (rng.standard_normal((CLICK_DIM, CLICK_DIM)) / np.sqrt(CLICK_DIM)).astype(np.float32)
    return {"users": users, "items": items, "M": m, "b": -0.8}


def click_columns(
    seed: int, split: int, start: int, n: int, overlap: float
) -> tuple[Columns, Columns]:
    """Rows ``start .. start+n`` of split ``split``: the user party's columns and the item
    party's, each only for the samples that party holds (a share ``overlap`` of them,
    drawn independently per party)."""
    truth = click_truth(seed)
    rows = np.arange(start, start + n, dtype=np.int64)
    ids = splitmix64(rows + (split << 40) + (seed << 44)).view(np.int64)  # unique: a bijection
    rng = np.random.default_rng([seed, split, start])
    user = rng.integers(0, CLICK_USERS, n)
    item = rng.integers(0, CLICK_ITEMS, n)
    u, v = truth["users"][user], truth["items"][item]
    logit = np.einsum("nd,de,ne->n", u, truth["M"], v) + truth["b"]
    click = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    held = [rng.random(n) < overlap for _ in PARTIES]
    return (
        {"id": ids[held[0]], "user": u[held[0]]},
        {"id": ids[held[1]], "item": v[held[1]], "click": click[held[1]]},
    )


def _make_clicks(
    rows: int, test_rows: int, out: Path, seed: int, overlap: float, file_rows: int,
    compression: str, progress: Callable[[int], None] | None,
) -> dict[str, Any]:  # fmt: skip
    """A vertically split click log: ``out/user`` (id and user columns) and ``out/item``
    (id, item columns and the click label), each a dataset with train/ and test/."""
    if not 0 < overlap <= 1:
        raise UserError("--overlap must be in (0, 1]")
    truth = click_truth(seed)
    common = {"generator": "clicks", "id": "id", "seed": seed, "overlap": overlap}
    metas = {
        "user": {**common, "party": "user", "features": ["user"], "label": ""},
        "item": {**common, "party": "item", "features": ["item"], "label": "click",
                 "task": "binary", "num_outputs": 1, "true_M": truth["M"].tolist(),
                 "true_b": truth["b"]},
    }  # fmt: skip
    for split, n in ((0, rows), (1, test_rows)):
        name = "train" if split == 0 else "test"
        files = {p: _Files(out / p / name, file_rows, compression) for p in PARTIES}
        try:
            for start in range(0, n, CHUNK):
                size = min(CHUNK, n - start)
                parts = click_columns(seed, split, start, size, overlap)
                for party, columns in zip(PARTIES, parts):
                    files[party].write(_table(columns, {**metas[party], "split": name}))
                if progress is not None:
                    progress(size)
            for f in files.values():
                f.close()
        finally:
            for f in files.values():
                f.abort()
    return {**metas["item"], "parties": list(PARTIES)}


def default_test_rows(rows: int) -> int:
    """Held-out rows when none are asked for: a tenth, between 1,000 and 100,000."""
    return max(1_000, min(rows // 10, 100_000))


def make(
    name: str, rows: int, out: Path, *, seed: int = 1234, test_rows: int | None = None,
    file_rows: int = 1 << 20, compression: str = "snappy", options: dict[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Write dataset ``name`` with ``rows`` training rows to ``out`` (train/, test/; for
    the vertically split ``clicks``, a dataset per party: user/, item/)."""
    if name not in (*GENERATORS, "clicks"):
        raise UserError(
            f"unknown generator {name!r}; built-in: {', '.join([*GENERATORS, 'clicks'])}"
        )
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out}: not empty; shoal data make writes a new directory")
    if test_rows is None:
        test_rows = default_test_rows(rows)
    opts = {"features": 32, "noise": 0.1, "context": 64, **(options or {})}
    try:
        if name == "clicks":
            overlap = float(opts.get("overlap", 1.0))
            meta = _make_clicks(rows, test_rows, out, seed, overlap, file_rows, compression,
                                progress)  # fmt: skip
            (out / "_SUCCESS").write_text("")
            return {**meta, "rows": rows, "test_rows": test_rows}
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
