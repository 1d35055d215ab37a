"""``shoal report`` on real run directories."""

from __future__ import annotations

import pytest

from shoal.metrics import read_metrics
from shoal.report import load_run
from shoal.telemetry import Totals
from tests.conftest import run_shoal

pytestmark = pytest.mark.slow  # trains through the launcher: not in the quick tier


@pytest.mark.timeout(240)
def test_report_compares_runs(tmp_path, linear_reference, local_sgd_reference):
    runs = [str(linear_reference), str(local_sgd_reference)]
    target = tmp_path / "cmp"
    proc = run_shoal("report", *runs, "--out", str(target))
    assert proc.returncode == 0, proc.stderr
    page = (target / "report.html").read_text()
    for name in ("loss_vs_step.png", "loss_vs_time.png", "throughput.png", "time_per_worker.png"):
        assert (target / name).stat().st_size > 5000
        assert name in page
    assert "allreduce x2" in page and "local-sgd x2" in page and "test loss" in page
    # the settings the runs differ in are rows of the table
    assert "<td>strategy.name</td><td>allreduce</td><td>local-sgd</td>" in page, page


@pytest.mark.timeout(120)
def test_a_run_without_a_held_out_split_says_so(tmp_path):
    """A single Parquet file has no test/ beside it: the summary and the report say that
    nothing was evaluated, rather than leaving the rows out."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    x = [float(i % 7) for i in range(256)]
    pq.write_table(pa.table({"f0": x, "y": [2 * v for v in x]}), tmp_path / "one.parquet")
    out = tmp_path / "run"
    proc = run_shoal("train", "--out", str(out), "--model", "linear", "--features", "f0",
                     "--label", "y", "--data", f"parquet:{tmp_path / 'one.parquet'}",
                     "--steps", "5", "--workers", "1", "--no-progress")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "none: the dataset has no held-out split" in proc.stdout, proc.stdout
    assert "none: no held-out split" in (out / "report.html").read_text()


@pytest.mark.timeout(120)
def test_ps_and_allreduce_runs_are_written_by_one_writer(linear_reference, ps_bsp_linear):
    """The coordinator and rank 0 feed the same RunWriter: one reader, the same keys."""
    runs = [load_run(linear_reference), load_run(ps_bsp_linear)]
    window_keys = [set(r.steps[0]) for r in runs]
    assert window_keys[0] == window_keys[1] and {"loss", "t_comm", "memory"} <= window_keys[0]
    assert [set(r.evals[-1]) for r in runs] == [{"step", "wall_time", "eval", "eval_s"}] * 2
    shared = {
        "strategy", "model", "data", "world_size", "steps", "global_batch_size",
        "num_parameters", "final_loss", "test_loss", "wall_time_s", "samples_per_s",
        "bytes_sent_total", "bytes_received_total", "samples_per_epoch", "train_samples",
        "per_worker", "memory", "resumed_from_step",
    }  # fmt: skip
    for run in runs:
        assert shared <= set(run.summary), shared - set(run.summary)
        for worker in run.summary["per_worker"]:
            named = {f for f in Totals.__dataclass_fields__ if f != "own"}
            assert named <= set(worker), worker  # host is a name, not a number
            assert isinstance(worker["host"], str) and worker["host"]
            assert set(worker["time"]) == {"wait", "data", "forward_backward", "comm", "optimizer"}
    assert runs[0].summary["final_loss"] == runs[0].steps[-1]["loss"]
    assert runs[1].summary["final_loss"] == runs[1].steps[-1]["loss"]


@pytest.mark.timeout(120)
def test_tensorboard_events_hold_the_metrics_losses(linear_reference, ps_bsp_linear):
    """--tensorboard: event files that tensorboard's own reader reads back with the
    losses of metrics.jsonl, for a collective run and a parameter-server run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for run in (linear_reference, ps_bsp_linear):
        events = EventAccumulator(str(run / "tensorboard"))
        events.Reload()
        tags = set(events.Tags()["scalars"])
        assert {"train/loss", "train/lr", "time/comm", "memory/params", "eval/test_loss"} <= tags
        assert {"worker0/loss", "worker1/time_forward_backward"} <= tags
        losses = {e.step: e.value for e in events.Scalars("train/loss")}
        records = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
        assert sorted(losses) == [r["step"] for r in records]
        for r in records:
            assert losses[r["step"]] == pytest.approx(r["loss"], rel=1e-6)  # (float32 events)
