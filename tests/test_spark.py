"""shoal on Spark: a DataFrame built in a local SparkSession, trained by two processes
that PySpark's TorchDistributor starts, ends where ``shoal train`` ends on the same
rows (written by pyarrow, read with the same sample order); so does ``shoal train
--engine spark``."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import (
    max_abs_diff,
    no_argparse,
    params,
    read_summary,
    run_shoal,
    tables,
    train,
)

pytest.importorskip("pyspark", reason="PySpark is an extra: pip install 'shoal[spark]'")
if not shutil.which("java"):
    pytest.skip("Spark needs Java (scripts/setup.sh installs it)", allow_module_level=True)
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("spark")]  # one worker: one JVM

JOB = ["--model", "linear", "--features", "f*", "--label", "y", "--shuffle", "full",
       "--batch-size", "64", "--steps", "100", "--lr", "0.05", "--seed", "5", "--audit-samples",
       "--no-progress", "--no-report"]  # fmt: skip


def rows(n: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((n, 4))
    return x, x @ np.array([1.0, -2.0, 0.5, 3.0]) + 0.1 * rng.standard_normal(n)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The rows written by pyarrow, and ``shoal train`` on them (1 worker)."""
    root = tmp_path_factory.mktemp("spark-ref")
    x, y = rows()
    data = root / "rows.parquet"
    pq.write_table(pa.table({**{f"f{j}": x[:, j] for j in range(4)}, "y": y}), data)
    train(root / "run", *JOB, "--data", f"parquet:{data}", "--workers", "1")
    return data, root / "run"


@pytest.fixture(scope="module")
def spark():
    from pyspark.sql import SparkSession

    session = SparkSession.builder.master("local[2]").appName("shoal-test").getOrCreate()
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.mark.timeout(300)
def test_a_dataframe_trained_through_torch_distributor_matches_shoal_train(
    tmp_path, spark, reference, monkeypatch
):
    """The job as its tables; from there on no argument parser or job file is used."""
    import shoal.spark

    x, y = rows()
    df = spark.createDataFrame(
        [(*map(float, r), float(t)) for r, t in zip(x, y)], ["f0", "f1", "f2", "f3", "y"]
    )
    out = tmp_path / "spark-run"
    job = tables(*JOB, "--out", str(out))
    no_argparse(monkeypatch)
    summary = shoal.spark.train(job, data=df, num_processes=2)
    read = json.loads((out / "dataset.json").read_text())["files"]  # what the run read
    assert len([name for name in read if name.startswith("part-")]) == 2  # local[2]'s partitions
    assert not (tmp_path / "spark-run-data").exists()  # the rows' copy is gone with the run
    assert summary["world_size"] == 2 and summary["steps"] == 100
    assert max_abs_diff(params(out), params(reference[1])) < 1e-6
    assert all(e["exact"] for e in read_summary(out)["epochs"])


@pytest.mark.timeout(300)
def test_shoal_train_engine_spark_runs_the_job_through_torch_distributor(tmp_path, reference):
    data, ref = reference
    out = tmp_path / "run"
    proc = run_shoal("train", *JOB, "--data", f"parquet:{data}", "--workers", "2",
                     "--engine", "spark", "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "run directory" in proc.stdout  # the summary table, in the driver
    assert read_summary(out)["world_size"] == 2
    assert max_abs_diff(params(out), params(ref)) < 1e-6
