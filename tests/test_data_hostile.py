"""Hostile files on disk: each crafted with pyarrow, each refused in one line naming the
problem when the dataset resolves, before any worker starts; ``shoal data`` refuses what
it reads the same way."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shoal.cli import main
from shoal.config import DataConfig
from shoal.data import build_dataset
from shoal.data.files import INDEX, MAX_OUTPUTS, Files
from shoal.errors import UserError
from tests.conftest import run_shoal

N = 40


def floats(n: int = N, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32)


def vectors(width: int, n: int = N) -> pa.Array:
    """``n`` rows of ``width`` floats as a variable-length list column, as Spark writes
    an array column."""
    return pa.array(np.ones((n, width), np.float32).tolist(), pa.list_(pa.float32()))


def with_meta(table: pa.Table, **meta) -> pa.Table:
    return table.replace_schema_metadata({b"shoal": json.dumps(meta).encode()})


def classes(n: int = N, top: int = 3) -> pa.Table:
    """Two float features ``a``, ``b`` and integer class labels ``y`` from 0 to ``top``."""
    return pa.table({"a": floats(n), "b": floats(n, 1), "y": np.arange(n, dtype=np.int64) % top})


# --- Parquet: each function writes a hostile directory under ``root``; flags to train it --


def nested_lists(root: Path) -> list[str]:
    x = pa.array([[[1.0, 2.0], [3.0]]] * N, pa.list_(pa.list_(pa.float32())))
    pq.write_table(pa.table({"x": x, "y": floats()}), root / "p.parquet")
    return ["--features", "x", "--label", "y"]


def nested_label(root: Path) -> list[str]:
    y = pa.array([[[1]]] * N, pa.list_(pa.list_(pa.int64())))
    pq.write_table(pa.table({"a": floats(), "y": y}), root / "p.parquet")
    return ["--features", "a", "--label", "y"]


def widths_between_files(root: Path) -> list[str]:
    pq.write_table(pa.table({"x": vectors(2), "y": floats()}), root / "part-0.parquet")
    pq.write_table(pa.table({"x": vectors(3), "y": floats()}), root / "part-1.parquet")
    return ["--features", "x", "--label", "y"]


def widths_between_row_groups(root: Path) -> list[str]:
    """One file, each row group uniform: only a scan of every row group sees it."""
    table = pa.concat_tables([pa.table({"x": vectors(4), "y": floats()}),
                              pa.table({"x": vectors(5), "y": floats()})])  # fmt: skip
    pq.write_table(table, root / "p.parquet", row_group_size=N)
    return ["--features", "x", "--label", "y"]


def widths_within_rows(root: Path) -> list[str]:
    x = pa.array([[1.0, 2.0]] * (N - 1) + [[1.0]], pa.list_(pa.float32()))
    pq.write_table(pa.table({"x": x, "y": floats()}), root / "p.parquet")
    return ["--features", "x", "--label", "y"]


def split_widths_differ(root: Path) -> list[str]:
    (root / "train").mkdir()
    (root / "test").mkdir()
    pq.write_table(pa.table({"x": vectors(2), "y": floats()}), root / "train" / "p.parquet")
    pq.write_table(pa.table({"x": vectors(3), "y": floats()}), root / "test" / "p.parquet")
    return ["--features", "x", "--label", "y"]


def huge_num_outputs(root: Path) -> list[str]:
    pq.write_table(with_meta(classes(), features=["a", "b"], label="y", num_outputs=2**33),
                   root / "p.parquet")  # fmt: skip
    return []


def num_outputs_below_labels(root: Path) -> list[str]:
    pq.write_table(with_meta(classes(top=7), features=["a", "b"], label="y", num_outputs=3),
                   root / "p.parquet")  # fmt: skip
    return []


def num_outputs_not_a_count(root: Path) -> list[str]:
    pq.write_table(with_meta(classes(), features=["a", "b"], label="y", num_outputs="10"),
                   root / "p.parquet")  # fmt: skip
    return []


def num_outputs_for_regression(root: Path) -> list[str]:
    table = pa.table({"a": floats(), "y": floats()})
    pq.write_table(with_meta(table, features=["a"], label="y", task="regression", num_outputs=5),
                   root / "p.parquet")  # fmt: skip
    return []


def huge_class_label(root: Path) -> list[str]:
    table = classes().set_column(2, "y", pa.array([0] * (N - 1) + [2**33], pa.int64()))
    pq.write_table(table, root / "p.parquet", row_group_size=N // 2)
    return ["--features", "a,b", "--label", "y"]


def tokens_beyond_vocabulary(root: Path) -> list[str]:
    tokens = np.arange(N * 4, dtype=np.int32).reshape(N, 4) % 5
    tokens[-1, 0] = 9  # an input token the model's 5-row embedding does not have
    col = pa.FixedSizeListArray.from_arrays(pa.array(tokens.ravel()), 4)
    nxt = pa.FixedSizeListArray.from_arrays(pa.array(((tokens + 1) % 5).ravel()), 4)
    table = with_meta(pa.table({"t": col, "next": nxt}), features=["t"], label="next",
                      task="language-model", num_outputs=5)  # fmt: skip
    pq.write_table(table, root / "p.parquet")
    return []


def unknown_task(root: Path) -> list[str]:
    pq.write_table(with_meta(classes(), features=["a", "b"], label="y", task="telepathy"),
                   root / "p.parquet")  # fmt: skip
    return []


def features_not_names(root: Path) -> list[str]:
    pq.write_table(with_meta(classes(), features=7, label="y"), root / "p.parquet")
    return []


def metadata_not_json(root: Path) -> list[str]:
    table = classes().replace_schema_metadata({b"shoal": b"{features: [a, b"})
    pq.write_table(table, root / "p.parquet")
    return ["--features", "a,b", "--label", "y"]


def infinite_label(root: Path) -> list[str]:
    y = floats()
    y[17] = np.inf
    pq.write_table(pa.table({"a": floats(), "y": y}), root / "p.parquet")
    return ["--features", "a", "--label", "y"]


PARQUET: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    "nested lists": (nested_lists, "feature column 'x' is list<element: list<element: float>>"),
    "nested label": (nested_label, "label column 'y' is list<element: list<element: int64>>"),
    "widths between files": (
        widths_between_files,
        "part-1.parquet: column 'x' holds lists of 3 values in row group 0, but 2 in ",
    ),
    "widths between row groups": (
        widths_between_row_groups,
        "p.parquet: column 'x' holds lists of 5 values in row group 1, but 4 in ",
    ),
    "widths within rows": (widths_within_rows, "column 'x' holds lists of different lengths"),
    "test split width": (
        split_widths_differ,
        "test: column 'x' holds 3 values per row, 2 in the rows",
    ),
    "num_outputs 2^33": (
        huge_num_outputs,
        f"num_outputs = 8589934592, not a number of outputs from 1 to {MAX_OUTPUTS}",
    ),
    "num_outputs below labels": (
        num_outputs_below_labels,
        "labels go up to 6, but its metadata says num_outputs = 3",
    ),
    "num_outputs a string": (num_outputs_not_a_count, 'num_outputs = "10", not a number'),
    "num_outputs for regression": (
        num_outputs_for_regression,
        "num_outputs = 5, but a regression model has one output",
    ),
    "class label 2^33": (huge_class_label, "class labels go up to 8,589,934,592; shoal takes"),
    "tokens beyond the vocabulary": (
        tokens_beyond_vocabulary,
        "token ids go up to 9, but its metadata says num_outputs = 5",
    ),
    "unknown task": (unknown_task, 'task = "telepathy", not one of regression, classification'),
    "features not names": (features_not_names, "features = 7, not a list of column names"),
    "metadata not JSON": (metadata_not_json, "its 'shoal' schema metadata is not a JSON object"),
    "infinite label": (infinite_label, "column 'y' has infinite labels (row 17"),
}


def _cfg(root: Path, flags: list[str]) -> DataConfig:
    opts = dict(zip(flags[::2], flags[1::2]))
    return DataConfig(name=f"parquet:{root}", features=opts.get("--features", ""),
                      label=opts.get("--label", ""))  # fmt: skip


def assert_refused(root: Path, flags: list[str], needle: str) -> None:
    """``build_dataset(check=True)`` (what ``shoal train`` resolves before it launches)
    refuses in one line holding ``needle``."""
    with pytest.raises(UserError) as e:
        build_dataset(_cfg(root, flags), check=True)
    assert "\n" not in str(e.value) and needle in str(e.value), str(e.value)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", list(PARQUET))
def test_hostile_parquet_is_refused_when_the_dataset_resolves(tmp_path, kind):
    write, needle = PARQUET[kind]
    root = tmp_path / "d"
    root.mkdir()
    assert_refused(root, write(root), needle)


def _train_in_process(tmp_path: Path, root: Path, flags: list[str], capsys) -> str:
    """``shoal train`` through the command's own ``main``: its exit code and stderr."""
    out = tmp_path / "run"
    args = ["--model", "mlp", "--batch-size", "8", "--steps", "2", "--out", str(out)]
    code = main(["train", *args, "--no-progress", "--data", f"parquet:{root}", *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("shoal: error: ")
    assert not out.exists()  # no run directory: nothing launched
    return err


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["nested lists", "num_outputs 2^33", "widths between files"])
def test_shoal_train_refuses_hostile_parquet_in_one_line(tmp_path, capsys, kind):
    write, needle = PARQUET[kind]
    root = tmp_path / "d"
    root.mkdir()
    assert needle in _train_in_process(tmp_path, root, write(root), capsys)


@pytest.mark.timeout(60)
def test_shoal_data_refuses_hostile_metadata(tmp_path, capsys):
    root = tmp_path / "d"
    root.mkdir()
    huge_num_outputs(root)
    for args in (["info", str(root)], ["prepare", str(root), "--out", str(tmp_path / "p")]):
        assert main(["data", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "num_outputs = 8589934592" in err, err
    assert not (tmp_path / "p").exists()


# --- a prepared directory: its index names files, sizes, rows and checksums --------------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A prepared directory of three Arrow files (a regression on columns a, b)."""
    base = tmp_path_factory.mktemp("prepared")
    src = base / "src"
    src.mkdir()
    for i in range(3):
        table = pa.table({"a": floats(seed=i), "b": floats(seed=10 + i), "y": floats(seed=20 + i)})
        pq.write_table(table, src / f"part-{i}.parquet")
    assert main(["data", "prepare", str(src), "--out", str(base / "arrow")]) == 0
    return base / "arrow"


def _tampered(prepared: Path, tmp_path: Path, change: Callable[[Path, list[dict]], None]) -> Path:
    """A copy of ``prepared`` whose index ``change(root, entries)`` rewrote."""
    root = tmp_path / "data"
    shutil.copytree(prepared, root)
    index = json.loads((root / INDEX).read_text())
    change(root, index["files"])
    (root / INDEX).write_text(json.dumps(index))
    return root


def _elsewhere(root: Path, entries: list[dict]) -> None:
    shutil.copy(root / entries[1]["name"], root.parent / "elsewhere.arrow")
    entries[1]["name"] = "../elsewhere.arrow"  # a real Arrow file, of the size listed


def _absolute(root: Path, entries: list[dict]) -> None:
    shutil.copy(root / entries[1]["name"], root.parent / "elsewhere.arrow")
    entries[1]["name"] = str(root.parent / "elsewhere.arrow")


def _subdirectory(root: Path, entries: list[dict]) -> None:
    (root / "sub").mkdir()
    shutil.move(root / entries[1]["name"], root / "sub" / "x.arrow")
    entries[1]["name"] = "sub/x.arrow"


def _symlink_out(root: Path, entries: list[dict]) -> None:
    outside = root.parent / "elsewhere.arrow"
    shutil.move(root / entries[1]["name"], outside)
    (root / entries[1]["name"]).symlink_to(outside)  # same name, same bytes: only the link


def _newline(root: Path, entries: list[dict]) -> None:
    entries[1]["name"] = "part-00001.arrow\nshoal: all is well"


def _twice(root: Path, entries: list[dict]) -> None:
    entries[2] = dict(entries[1])


def _rows(root: Path, entries: list[dict]) -> None:
    entries[0]["rows"] += 1


def _size(root: Path, entries: list[dict]) -> None:
    entries[0]["size"] = "many"


def _digest(root: Path, entries: list[dict]) -> None:
    entries[0]["sha256"] = "trust me"


INDEXES: dict[str, tuple[Callable[[Path, list[dict]], None], str]] = {
    "../ name": (_elsewhere, "entry 1 names '../elsewhere.arrow'; an index names files inside"),
    "absolute name": (_absolute, "elsewhere.arrow'; an index names files inside its own"),
    "name in a subdirectory": (_subdirectory, "entry 1 names 'sub/x.arrow'"),
    "symlink out of the folder": (_symlink_out, "part-00001.arrow: listed in "),
    "a newline in a name": (_newline, "entry 1 names 'part-00001.arrow\\nshoal: all is well'"),
    "a name twice": (_twice, "entry 2 names part-00001.arrow a second time"),
    "rows claimed": (_rows, "part-00000.arrow: 40 rows, the index says 41"),
    "size not a count": (_size, "size 'many' is not a count"),
    "sha256 not a digest": (_digest, "sha256 'trust me' is not a SHA-256 digest"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", list(INDEXES))
def test_hostile_index_is_refused_by_train_and_shoal_data(prepared, tmp_path, capsys, kind):
    change, needle = INDEXES[kind]
    root = _tampered(prepared, tmp_path, change)
    assert_refused(root, ["--features", "a,b", "--label", "y"], needle)
    for args in (["info", str(root)], ["info", str(root), "--verify"],
                 ["prepare", str(root), "--out", str(tmp_path / "again")]):  # fmt: skip
        assert main(["data", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "again").exists()


@pytest.mark.timeout(60)
def test_a_prepared_files_fingerprint_is_computed_and_its_checksum_verified(
    prepared, tmp_path, capsys
):
    """The fingerprint a run keeps is the file's own (name, size, Arrow footer), not the
    index's word; the SHA-256 the index records is what ``data info --verify`` checks."""
    before = Files(prepared).fingerprint()
    assert sorted(before) == ["part-00000.arrow", "part-00001.arrow", "part-00002.arrow"]
    claimed = {e["name"]: e["sha256"] for e in json.loads((prepared / INDEX).read_text())["files"]}
    assert not set(before.values()) & set(claimed.values())

    def lie(root: Path, entries: list[dict]) -> None:
        entries[1]["sha256"] = "0" * 64  # well formed, and false

    root = _tampered(prepared, tmp_path, lie)
    assert Files(root).fingerprint() == before  # a claim changes nothing it covers
    assert main(["data", "info", str(root)]) == 0  # (footers only)
    capsys.readouterr()
    assert main(["data", "info", str(root), "--verify"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "part-00001.arrow: its SHA-256 differs from" in err

    # the same rows rewritten as two record batches, the index made to agree on size and
    # rows: a resumed run names the file (its footer changed)
    path = prepared / "part-00001.arrow"
    table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    changed = tmp_path / "changed"
    shutil.copytree(prepared, changed)
    with (
        pa.OSFile(str(changed / path.name), "wb") as sink,
        pa.ipc.new_file(sink, table.schema) as writer,
    ):
        for batch in table.to_batches(max_chunksize=N // 2):
            writer.write_batch(batch)
    index = json.loads((changed / INDEX).read_text())
    index["files"][1]["size"] = (changed / path.name).stat().st_size
    (changed / INDEX).write_text(json.dumps(index))
    now = Files(changed).fingerprint()
    assert (
        now[path.name] != before[path.name]
        and now["part-00000.arrow"] == before["part-00000.arrow"]
    )


@pytest.mark.timeout(120)
@pytest.mark.slow
def test_shoal_train_command_refuses_hostile_data_before_any_worker(prepared, tmp_path):
    """The real command, end to end: one line, no traceback, no run directory."""
    bad = tmp_path / "widths"
    bad.mkdir()
    escaping = _tampered(prepared, tmp_path, _elsewhere)
    cases = [
        (bad, widths_between_files(bad), PARQUET["widths between files"][1]),
        (escaping, ["--features", "a,b", "--label", "y"], INDEXES["../ name"][1]),
    ]
    for i, (root, flags, needle) in enumerate(cases):
        out = tmp_path / f"run{i}"
        proc = run_shoal("train", "--model", "linear", "--data", f"parquet:{root}", *flags,
                         "--steps", "2", "--batch-size", "8", "--out", str(out),
                         "--no-progress", timeout=100)  # fmt: skip
        err = proc.stderr.strip()
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
        assert len(err.splitlines()) == 1 and needle in err, err
        assert not out.exists() and not (tmp_path / "runs").exists()
