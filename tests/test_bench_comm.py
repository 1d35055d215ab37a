"""``shoal bench comm`` end to end on two namespace hosts with a capped link."""

from __future__ import annotations

import json
import subprocess

import pytest

from shoal import netns
from tests.conftest import run_shoal

pytestmark = pytest.mark.slow  # trains through the launcher: not in the quick tier


def _our_namespaces() -> list[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=20)
    return [line for line in listing.stdout.splitlines() if line.startswith(netns.PREFIX)]


@pytest.mark.netns
@pytest.mark.timeout(300)
def test_bench_comm_runs_the_matrix_and_cleans_up(tmp_path):
    reason = netns.unavailable()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "bench"
    proc = run_shoal(
        "bench",
        "comm",
        "--out",
        str(out),
        "--rates",
        "1gbit",
        "--runs",
        "allreduce:none,allreduce:fp16,local-sgd:none",
        "--target",
        "1.0",
        "--",
        "--model",
        "linear",
        "--steps",
        "64",
        "--lr",
        "0.05",
        "--log-every",
        "4",
        timeout=280,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert [(r["strategy"], r["codec"]) for r in results] == [
        ("allreduce", "none"),
        ("allreduce", "fp16"),
        ("local-sgd", "none"),
    ]
    full, half, local = (r["bytes_sent_total"] for r in results)
    assert half * 2 == full and local * 8 == full  # fp16; local SGD every 8 of 64 steps
    assert all(r["time_to_target_s"] is not None for r in results)
    assert results[0]["speedup"] == 1.0
    assert "| 1gbit | allreduce | fp16 |" in (out / "results.md").read_text()
    assert (out / "1gbit" / "report.html").exists() and (
        out / "1gbit" / "loss_vs_bytes.png"
    ).exists()
    assert _our_namespaces() == []  # every namespace it made is gone


@pytest.mark.timeout(60)
def test_bench_comm_refuses_bad_input(tmp_path):
    for args, needle in (
        (["--rates", "fast"], "must look like 100mbit"),
        (["--runs", "magic:none"], "unknown strategy 'magic'"),
        (["--runs", "allreduce:zip"], "unknown codec 'zip'"),
        (["--hosts", "9"], "--hosts must be 2, 3 or 4"),
    ):
        proc = run_shoal("bench", "comm", "--out", str(tmp_path / "b"), *args)
        assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
        assert proc.stderr.count("\n") == 1, proc.stderr


@pytest.mark.timeout(30)
def test_time_to_target_leaves_every_evaluation_out(tmp_path):
    """An evaluation's record says when it began and how long it took (eval_s): the time
    to the target is the records' wall time less each evaluation, whole."""
    import argparse

    from shoal.cli.bench import _measure

    step = {"loss": 2.0, "step_time_s": 0.1, "bytes_sent": 100, "t_forward_backward": 0.09}
    records = [
        {**step, "step": 10, "wall_time": 1.0, "syncs": 1},
        {"step": 10, "wall_time": 1.2, "eval_s": 3.0, "eval": {"test_perplexity": 12.0}},
        {**step, "step": 20, "wall_time": 5.2, "syncs": 2, "bytes_sent": 300},
        {"step": 20, "wall_time": 5.3, "eval_s": 3.0, "eval": {"test_perplexity": 9.0}},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    args = argparse.Namespace(target_perplexity=9.5, target=None)
    got = _measure(tmp_path, args)
    # 5.3 s of wall less 0.2 + 3.0 (the first evaluation) and 0.1 (the second's start)
    assert got["time_to_target_s"] == pytest.approx(2.0)
    assert got["step_at_target"] == 20 and got["bytes_to_target"] == 300
    assert got["compute_utilisation"] == [pytest.approx(0.9)]
