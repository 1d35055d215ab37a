"""End to end: ``shoal train --strategy allreduce`` as a user runs it.

The main numerical check of the project: with the same seed and global batch,
1, 2 and 4 synchronous workers end at the same parameters; and those are the
least-squares solution.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import LINEAR_JOB, max_abs_diff, params, shared_run, train

pytestmark = pytest.mark.slow  # trains through the launcher: not in the quick tier

LINEAR = [*LINEAR_JOB, "--strategy", "allreduce", "--lr-schedule", "cosine", "--log-every", "20"]


@pytest.fixture(scope="module")
def linear_runs(tmp_path_factory):
    """The same linear job (cosine schedule) on 1, 2 and 4 workers."""
    return {
        workers: shared_run(
            tmp_path_factory,
            f"linear-cosine-w{workers}",
            lambda out, w=workers: train(out, *LINEAR, "--workers", str(w)),
        )
        for workers in (1, 2, 4)
    }


@pytest.mark.timeout(300)
def test_same_parameters_for_1_2_4_workers(linear_runs):
    ref = params(linear_runs[1])
    for workers in (2, 4):
        assert max_abs_diff(params(linear_runs[workers]), ref) < 1e-5


@pytest.mark.timeout(300)
def test_linear_reaches_least_squares(linear_runs):
    for out in linear_runs.values():
        summary = json.loads((out / "summary.json").read_text())
        assert summary["lstsq_rel_error"] < 1e-3
        assert summary["true_weights_rel_error"] < 0.01


@pytest.mark.timeout(300)
def test_run_directory_contents(linear_runs):
    out = linear_runs[4]
    assert {"config.toml", "metrics.jsonl", "summary.json", "model.safetensors", "checkpoints"} <= {
        p.name for p in out.iterdir()
    }
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(20, 201, 20))
    for key in (
        "epoch",
        "samples_per_s",
        "bytes_sent",
        "bytes_received",
        "wall_time",
        "t_wait",
        "t_data",
        "t_forward_backward",
        "t_comm",
        "t_optimizer",
    ):
        assert key in steps[0], key
    assert steps[-1]["loss"] < steps[0]["loss"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 4 and summary["steps"] == 200
    # ring all-reduce of 33 float32 parameters: each rank sends 2*(4-1)/4 of 132 bytes per step
    per_step = 2 * 3 * 132 // 4
    assert [w["bytes_sent"] for w in summary["per_worker"]] == [200 * per_step] * 4
    assert [w["bytes_received"] for w in summary["per_worker"]] == [200 * per_step] * 4


@pytest.mark.timeout(300)
def test_every_sample_accounted_per_epoch(linear_runs):
    summary = json.loads((linear_runs[4] / "summary.json").read_text())
    n, batch, steps = summary["train_samples"], 64, 200
    per_epoch = -(-n // batch)
    expected = {}
    for step in range(steps):
        epoch, s = divmod(step, per_epoch)
        expected[str(epoch)] = expected.get(str(epoch), 0) + min(batch, n - s * batch)
    assert summary["samples_per_epoch"] == expected


@pytest.mark.timeout(300)
def test_digits_mlp_reaches_95_percent(tmp_path):
    out = tmp_path / "digits-mlp"
    train(
        out,
        "--model",
        "mlp",
        "--workers",
        "2",
        "--optimizer",
        "adam",
        "--lr",
        "0.003",
        "--steps",
        "400",
        "--batch-size",
        "64",
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_accuracy"] >= 0.95
