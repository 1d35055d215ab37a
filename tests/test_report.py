"""``shoal report`` on real run directories."""

from __future__ import annotations

import pytest

from tests.conftest import run_shoal, train


@pytest.mark.timeout(240)
def test_report_compares_runs(tmp_path):
    runs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        train(out, "--model", "softmax", "--workers", str(workers), "--steps", "40", "--lr", "0.5")
        runs.append(str(out))
    target = tmp_path / "cmp"
    proc = run_shoal("report", *runs, "--out", str(target))
    assert proc.returncode == 0, proc.stderr
    page = (target / "report.html").read_text()
    for name in ("loss_vs_step.png", "loss_vs_time.png", "throughput.png"):
        assert (target / name).stat().st_size > 5000
        assert name in page
    assert "allreduce x1" in page and "allreduce x2" in page and "test accuracy" in page
