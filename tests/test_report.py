"""``shoal report`` on real run directories."""

from __future__ import annotations

import pytest

from tests.conftest import run_shoal


@pytest.mark.timeout(240)
def test_report_compares_runs(tmp_path, linear_reference, local_sgd_reference):
    runs = [str(linear_reference), str(local_sgd_reference)]
    target = tmp_path / "cmp"
    proc = run_shoal("report", *runs, "--out", str(target))
    assert proc.returncode == 0, proc.stderr
    page = (target / "report.html").read_text()
    for name in ("loss_vs_step.png", "loss_vs_time.png", "throughput.png"):
        assert (target / name).stat().st_size > 5000
        assert name in page
    assert "allreduce x2" in page and "local-sgd x2" in page and "test loss" in page
