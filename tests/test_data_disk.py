"""Datasets on disk: Parquet as Spark writes it, prepared Arrow files, the generators,
and every bad input as one line before any worker starts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from shoal.cli import main
from shoal.config import DataConfig
from shoal.data import build_dataset, build_order
from shoal.data.disk import DiskRows
from shoal.data.make import make

FILES = [(1100, 500), (900, 300), (1001, 1001)]
"""(rows, row-group size) of each file: three files, row groups of different sizes."""


def spark_style(root: Path, seed: int = 0, files=FILES) -> tuple[np.ndarray, np.ndarray]:
    """A directory as Spark writes it: part files, _SUCCESS, hidden .crc files; nullable
    float columns f0..f7 (no nulls) and a float label y = x.w + noise."""
    rng = np.random.default_rng(seed)
    n = sum(r for r, _ in files)
    x = rng.standard_normal((n, 8)).astype(np.float32)
    y = (x @ rng.standard_normal(8) + 0.1 * rng.standard_normal(n)).astype(np.float32)
    root.mkdir(parents=True)
    start = 0
    for i, (rows, group) in enumerate(files):
        cols = {f"f{j}": x[start : start + rows, j] for j in range(8)}
        table = pa.table({**cols, "y": y[start : start + rows]})
        name = f"part-{i:05d}-3f1c.snappy.parquet"
        pq.write_table(table, root / name, row_group_size=group)
        (root / f".{name}.crc").write_bytes(b"crc")
        start += rows
    (root / "_SUCCESS").write_bytes(b"")
    return x, y


@pytest.fixture(scope="module")
def spark_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "spark"
    spark_style(root)
    return root


def cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(name=f"parquet:{root}", features=kw.pop("features", "f*"),
                      label=kw.pop("label", "y"), **kw)  # fmt: skip


def test_reads_a_spark_style_directory_row_for_row(spark_dir):
    data = build_dataset(cfg(spark_dir), check=True)
    whole = pq.read_table(sorted(spark_dir.glob("part-*.parquet")))
    assert isinstance(data.train, DiskRows)
    assert data.num_train == whole.num_rows == 3001 and data.task == "regression"
    assert data.input_shape == (8,) and data.test is None
    assert data.train.blocks == [500, 500, 100, 300, 300, 300, 1001]
    rows = np.array([3000, 0, 1099, 1100, 17, 2000, 1999, 5])  # any order, across files
    x, y = data.rows.take(rows)
    want_x = np.stack([whole.column(f"f{j}").to_numpy() for j in range(8)], 1)[rows]
    np.testing.assert_array_equal(x.numpy(), want_x)
    np.testing.assert_array_equal(y.numpy(), whole.column("y").to_numpy()[rows])


def test_block_shuffle_follows_the_row_groups(spark_dir):
    data = build_dataset(cfg(spark_dir))
    order = build_order(data, cfg(spark_dir), seed=0)  # auto: block, for Parquet
    assert order.mode == "block"
    first = order.rows(0, np.arange(64))
    ends = np.cumsum(data.train.blocks)
    assert len(set(np.searchsorted(ends, first, side="right"))) <= 7
    full = build_order(data, cfg(spark_dir, shuffle="full"), seed=0)
    assert full.mode == "full"


def test_prepared_arrow_equals_parquet_and_info_describes_it(spark_dir, tmp_path, capsys):
    out = tmp_path / "prepared"
    assert main(["data", "prepare", str(spark_dir), "--out", str(out)]) == 0
    assert main(["data", "info", str(out), "--verify", "--json"]) == 0
    info = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert info["data"]["rows"] == 3001 and info["data"]["files"] == 3
    assert info["data"]["verified"] == "all match"
    a, b = build_dataset(cfg(spark_dir)), build_dataset(cfg(out))
    assert b.train.files.prepared and build_order(b, cfg(out), 0).mode == "full"
    rows = np.random.default_rng(0).permutation(3001)[:500]
    for u, v in zip(a.rows.take(rows), b.rows.take(rows)):
        assert torch.equal(u, v)


@pytest.mark.parametrize("name", ["ctr", "linear", "text"])
def test_generators_write_self_describing_data(tmp_path, name):
    meta = make(name, 3000, tmp_path / name, test_rows=500)
    data = build_dataset(DataConfig(name=f"parquet:{tmp_path / name}"), check=True)
    assert data.num_train == 3000 and data.test is not None and len(data.test[0]) == 500
    assert (tmp_path / name / "_SUCCESS").exists()
    x, y = data.rows.take(np.arange(10))
    if name == "ctr":
        assert data.task == "binary" and x.dtype == torch.int64 and x.shape == (10, 39)
        assert set(y.tolist()) <= {0.0, 1.0} and 0 <= int(x.max()) < DataConfig().table_rows
    elif name == "linear":
        assert data.task == "regression" and x.shape == (10, 32)
        w = np.asarray(meta["true_weights"], dtype=np.float32)
        resid = y.numpy() - (x.numpy() @ w + meta["true_bias"])
        assert np.abs(resid).max() < 0.6  # only the label noise (sd 0.1) is left
    else:
        assert data.task == "language-model" and x.shape == (10, 64) == y.shape
        assert torch.equal(x[:, 1:], y[:, :-1])  # the label is the next character
    # the same rows again: generation depends on the seed and row numbers only
    make(name, 3000, tmp_path / "again", test_rows=500)
    again = build_dataset(DataConfig(name=f"parquet:{tmp_path / 'again'}"))
    assert torch.equal(again.rows.take(np.arange(10))[0], x)


def test_make_leaves_nothing_behind_on_a_mistake(tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_text("x")
    assert main(["data", "make", "ctr", "--rows", "10", "--out", str(tmp_path / "full")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep"]


# --- bad input: one line each, before training -------------------------------------------


def _table(n=40, **override):
    cols = {"a": np.arange(n, dtype=np.float32), "b": np.ones(n, np.float32),
            "y": np.zeros(n, np.float32)}  # fmt: skip
    cols.update(override)
    return pa.table(cols)


def _bad(root: Path, kind: str) -> tuple[Path, list[str]]:
    root.mkdir()
    flags = ["--features", "a,b", "--label", "y"]
    if kind == "missing column":
        pq.write_table(_table(), root / "p.parquet")
        flags = ["--features", "a,bb", "--label", "y"]
    elif kind == "string feature":
        pq.write_table(_table(b=pa.array(["x"] * 40)), root / "p.parquet")
    elif kind == "null labels":
        pq.write_table(
            _table(y=pa.array([None] * 3 + [0.0] * 37, pa.float32())), root / "p.parquet"
        )
    elif kind == "nan labels":
        y = np.zeros(40, np.float32)
        y[33] = np.nan
        pq.write_table(_table(y=y), root / "p.parquet")
    elif kind == "corrupt":
        pq.write_table(_table(), root / "a.parquet")
        (root / "b.parquet").write_bytes(b"PAR1" + b"\x00" * 100 + b"PAR1")
    elif kind == "truncated":
        pq.write_table(_table(), root / "a.parquet")
        data = (root / "a.parquet").read_bytes()
        (root / "a.parquet").write_bytes(data[: len(data) // 2])
    elif kind == "different types":
        pq.write_table(_table(), root / "a.parquet")
        pq.write_table(_table(b=np.ones(40, np.int64)), root / "b.parquet")
    elif kind == "empty":
        (root / "_SUCCESS").write_bytes(b"")
    elif kind == "no label":
        pq.write_table(_table(), root / "p.parquet")
        flags = ["--features", "a,b"]
    elif kind == "transform":
        pq.write_table(_table(), root / "p.parquet")
        flags = ["--features", "a,b", "--label", "y", "--data-transform", "nopkg.mod:fn"]
    return root, flags


BAD = {
    "missing column": "no column 'bb' (did you mean b?)",
    "string feature": "feature column 'b' is string",
    "null labels": "column 'y' has 3 null labels",
    "nan labels": "column 'y' has NaN labels (row 33",
    "corrupt": "b.parquet: not a readable Parquet file",
    "truncated": "a.parquet: not a Parquet file, or truncated",
    "different types": "b.parquet: column 'b' is int64, but float",
    "empty": "no Parquet files (*.parquet) in it",
    "no label": "name the label column with --label",
    "transform": "cannot import --data-transform module 'nopkg.mod'",
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_data_is_one_line_before_training(tmp_path, capsys, kind):
    root, flags = _bad(tmp_path / "d", kind)
    out = tmp_path / "run"
    args = ["--batch-size", "8", "--steps", "2", "--out", str(out), "--no-progress"]
    code = main(["train", "--model", "linear", "--data", f"parquet:{root}", *flags, *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert BAD[kind] in err, err
    assert not out.exists()  # nothing written


def test_missing_path_is_one_line(tmp_path, capsys):
    assert main(["data", "info", str(tmp_path / "nope")]) == 2
    assert "no such file or directory" in capsys.readouterr().err


def test_resume_names_a_file_removed_changed_or_added_since_the_run_started(tmp_path):
    from shoal.config import JobConfig
    from shoal.errors import UserError
    from shoal.run.directory import _check_data_files

    root = tmp_path / "d"
    spark_style(root)
    job = JobConfig()
    job.data.name = f"parquet:{root}"
    out = tmp_path / "run"
    out.mkdir()
    _check_data_files(job, out)  # the run starts: dataset.json keeps the fingerprints
    job.output.resume = True
    _check_data_files(job, out)  # nothing changed
    part = sorted(root.glob("part-*.parquet"))[1]
    table = pq.read_table(part)
    part.unlink()
    with pytest.raises(UserError, match=f"{part.name} was removed since the run started"):
        _check_data_files(job, out)
    changed = table.set_column(0, "f0", pa.array(np.zeros(table.num_rows, np.float32)))
    pq.write_table(changed, part, row_group_size=300)  # same name, rows and row groups
    with pytest.raises(UserError, match=f"{part.name} changed since the run started"):
        _check_data_files(job, out)
    pq.write_table(table, part, row_group_size=300)  # put back as it was
    _check_data_files(job, out)
    pq.write_table(table, root / "part-00009.parquet")
    with pytest.raises(UserError, match=r"part-00009\.parquet is new since the run started"):
        _check_data_files(job, out)
