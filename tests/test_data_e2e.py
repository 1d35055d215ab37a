"""Training from Parquet end to end: any number of workers gives the same model, kills
and resizes lose or repeat no sample (audited id by id), memory stays bounded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shoal.data.loader import read_audit
from shoal.data.order import range_digest
from tests.conftest import max_abs_diff, params, read_summary, shared_run, train
from tests.test_data_disk import spark_style

pytestmark = pytest.mark.slow

STEPS = 120
"""Two whole epochs of the 3,001 rows in batches of 64 (47 steps each), and part of a third."""


@pytest.fixture(scope="module")
def parquet_job(tmp_path_factory):
    root = shared_run(tmp_path_factory, "parquet-spark-style", spark_style)
    return ["--model", "linear", "--data", f"parquet:{root}", "--features", "f*", "--label",
            "y", "--batch-size", "64", "--steps", str(STEPS), "--lr", "0.05", "--seed", "3",
            "--audit-samples"]  # fmt: skip


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory, parquet_job):
    job = [*parquet_job, "--workers", "1"]
    return shared_run(tmp_path_factory, "parquet-one-worker", lambda out: train(out, *job))


def _exact_epochs(summary: dict) -> None:
    epochs = summary["epochs"]
    assert [e["samples"] for e in epochs] == [3001, 3001, (STEPS - 94) * 64]
    assert all(e["exact"] for e in epochs), epochs
    assert epochs[0]["expected"] == f"{range_digest(0, 3001):016x}"


@pytest.mark.timeout(240)
def test_one_and_three_workers_end_at_the_same_parameters(tmp_path, parquet_job, one_worker):
    out = tmp_path / "three"
    train(out, *parquet_job, "--workers", "3")  # 3 does not divide the batch of 64
    assert max_abs_diff(params(out), params(one_worker)) < 1e-5
    ref, got = read_audit(one_worker), read_audit(out)
    assert sorted(got) == list(range(STEPS))
    assert all(np.array_equal(got[s], ref[s]) for s in ref)
    _exact_epochs(read_summary(out))
    _exact_epochs(read_summary(one_worker))


@pytest.mark.timeout(300)
def test_killed_on_4_resumed_on_3_killed_resumed_on_2_consumes_every_sample_once(
    tmp_path, parquet_job, one_worker
):
    out = tmp_path / "run"
    # (written before training goes on: a kill 10 steps after a background write may beat it)
    crash = ["--checkpoint-every", "20", "--max-restarts", "0", "--no-checkpoint-async"]
    crash += ["--recovery", "restart"]  # (in place, the 3 others would go on)
    first = train(out, *parquet_job, "--workers", "4", *crash,
                  env={"SHOAL_FAULT": "crash:rank=2:step=30"}, check=False)  # fmt: skip
    assert first.returncode != 0 and "worker rank 2" in first.stderr
    second = train(out, "--resume", str(out), "--workers", "3", *crash,
                   env={"SHOAL_FAULT": "crash:rank=1:step=70"}, check=False)  # fmt: skip
    assert second.returncode != 0 and "worker rank 1" in second.stderr
    train(out, "--resume", str(out), "--workers", "2")
    s = read_summary(out)
    assert s["world_size"] == 2 and s["resumed_from_step"] == 60
    ref, got = read_audit(one_worker), read_audit(out)
    assert sorted(got) == sorted(ref) == list(range(STEPS))
    for step in ref:  # the ids of every step, as the single worker trained them
        assert np.array_equal(got[step], ref[step]), step
    _exact_epochs(s)
    assert max_abs_diff(params(out), params(one_worker)) < 1e-5


@pytest.mark.timeout(300)
def test_parameter_server_rereads_a_killed_workers_part(tmp_path, parquet_job, one_worker):
    out = tmp_path / "ps"
    job = [*parquet_job, "--strategy", "ps", "--ps-mode", "bsp", "--workers", "2"]
    # rank 0 slowed: the run outlasts rank 1's start on a busy machine (alone, it has done
    # all 120 steps before rank 1 took a task)
    fault = "crash:rank=1:step=50;slow:rank=0:ms=25"
    proc = train(out, *job, "--servers", "1", env={"SHOAL_FAULT": fault})
    s = read_summary(out)
    assert s["ps"]["failed_workers"] == [1], proc.stderr
    ref, got = read_audit(one_worker), read_audit(out)
    assert sorted(got) == list(range(STEPS))
    for step in ref:
        assert np.array_equal(got[step], ref[step]), step
    _exact_epochs(s)
    assert max_abs_diff(params(out), params(one_worker)) < 1e-5  # bsp: synchronous


def write_big(root: Path, gigabytes: float, features: int = 256) -> int:
    """At least ``gigabytes`` of uncompressed Parquet (64k-row blocks of one random
    block, shifted), in files of 16 row groups of 8k rows; its size in bytes."""
    block = np.random.default_rng(0).standard_normal((1 << 16, features), dtype=np.float32)
    w = np.random.default_rng(1).standard_normal(features).astype(np.float32)
    rows_per_file, written, i = 1 << 17, 0, 0
    root.mkdir(parents=True)
    while written < gigabytes * 1e9:
        x = block + np.float32(i)
        table = pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), features),
                          "y": x @ w})  # fmt: skip
        path = root / f"part-{i:05d}.parquet"
        pq.write_table(pa.concat_tables([table, table]).slice(0, rows_per_file), path,
                       row_group_size=1 << 13, compression="none")  # fmt: skip
        written += path.stat().st_size
        i += 1
    return written


@pytest.mark.timeout(300)
def test_private_memory_stays_a_fraction_of_a_dataset_of_2_gb(tmp_path):
    root = tmp_path / "big"
    size = write_big(root, 2.0)
    assert size > 2e9
    out = tmp_path / "run"
    train(out, "--model", "linear", "--data", f"parquet:{root}", "--features", "x", "--label",
          "y", "--workers", "2", "--batch-size", "2048", "--steps", "300", "--data-cache-mb",
          "64", "--shuffle-window", "8", "--eval-every", "0")  # fmt: skip
    s = read_summary(out)
    assert s["epochs"][0]["samples"] == 300 * 2048 and s["epochs"][0]["exact"]
    for worker in s["per_worker"]:  # 300 MB of it is torch's own, before any data
        assert 0 < worker["memory"]["private"] < size / 4, worker["memory"]
    assert s["memory"]["private"] == max(w["memory"]["private"] for w in s["per_worker"])


@pytest.mark.timeout(240)
def test_fsdp_reads_parquet_to_the_same_parameters(tmp_path, parquet_job, one_worker):
    out = tmp_path / "fsdp"
    train(out, *parquet_job, "--strategy", "fsdp", "--workers", "2")
    assert max_abs_diff(params(out), params(one_worker)) < 1e-5
    _exact_epochs(read_summary(out))


@pytest.mark.timeout(240)
def test_tensor_and_pipeline_ranks_share_a_slice_and_end_at_the_same_parameters(
    tmp_path, parquet_job
):
    """An MLP (its one regression output too few to split: whole on every rank)."""
    job = [*parquet_job, "--model", "mlp", "--hidden", "32", "--steps", "30"]
    train(tmp_path / "one", *job, "--workers", "1")
    ref = read_audit(tmp_path / "one")
    assert sorted(ref) == list(range(30))
    for strategy in (["tensor"], ["pipeline", "--split-at", "3"]):
        out = tmp_path / strategy[0]
        train(out, *job, "--strategy", *strategy, "--workers", "2")
        assert max_abs_diff(params(out), params(tmp_path / "one")) < 1e-5, strategy
        got = read_audit(out)
        assert sorted(got) == sorted(ref) and all(np.array_equal(got[s], ref[s]) for s in ref)
        epoch = read_summary(out)["epochs"][0]
        assert epoch["samples"] == 30 * 64 and epoch["exact"], epoch
