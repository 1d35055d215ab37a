"""End to end: ``shoal train --strategy allreduce`` as a user runs it.

The main numerical check of the project: with the same seed and global batch,
1, 2 and 4 synchronous workers end at the same parameters; and those are the
least-squares solution.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import max_abs_diff, params, train

LINEAR = [
    "--model",
    "linear",
    "--strategy",
    "allreduce",
    "--steps",
    "200",
    "--batch-size",
    "64",
    "--lr",
    "0.05",
    "--schedule",
    "cosine",
    "--seed",
    "3",
    "--log-every",
    "20",
]


@pytest.fixture(scope="module")
def linear_runs(session_tmp):
    """The same linear job on 1, 2 and 4 workers (2 with checkpoints every 100 steps)."""
    runs = {}
    for workers in (1, 2, 4):
        out = session_tmp / f"linear-w{workers}"
        extra = ["--checkpoint-every", "100"] if workers == 2 else []
        train(out, *LINEAR, "--workers", str(workers), *extra)
        runs[workers] = out
    return runs


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
def test_resume_after_crash_matches_uninterrupted(linear_runs, session_tmp):
    """With no restarts allowed, a SIGKILL at step 150 ends the run; --resume finishes it."""
    out = session_tmp / "linear-crash"
    crashed = train(
        out,
        *LINEAR,
        "--workers",
        "2",
        "--checkpoint-every",
        "100",
        "--max-restarts",
        "0",
        env={"SHOAL_FAULT": "crash:rank=1:step=150"},
        check=False,
    )
    assert crashed.returncode != 0
    assert "worker rank 1" in crashed.stderr and "SIGKILL" in crashed.stderr
    assert not (out / "summary.json").exists()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000100"]

    resumed = train(out, "--resume", str(out))
    assert resumed.returncode == 0
    assert max_abs_diff(params(out), params(linear_runs[2])) < 1e-6
    summary = json.loads((out / "summary.json").read_text())
    reference = json.loads((linear_runs[2] / "summary.json").read_text())
    assert summary["samples_per_epoch"] == reference["samples_per_epoch"]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps.count(120) == 1


@pytest.mark.timeout(300)
def test_digits_mlp_reaches_95_percent(session_tmp):
    out = session_tmp / "digits-mlp"
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
