"""``shoal bench chaos``: its bookkeeping and its refusals (the bench itself is long)."""

from __future__ import annotations

import pytest

from shoal.cli.bench_chaos import Fault, _failures, _table
from tests.conftest import run_shoal
from tests.test_bad_input import assert_one_line_error

pytestmark = pytest.mark.slow  # trains through the launcher: not in the quick tier


def test_the_table_counts_only_faults_of_finished_jobs_that_recovered():
    faults = [
        Fault("ps", "shard-kill", 1.0, detect_s=0.3, recover_s=4.0),
        Fault("ps", "shard-kill", 9.0, detect_s=0.5, recover_s=None),  # never trained again
        Fault("ps", "worker-stop", 9.0, note="no worker", injected=False),
        Fault("allreduce", "worker-kill", 2.0, detect_s=0.4, recover_s=9.0),
    ]
    stall = {"seconds": 3.5, "line": "shoal: warning: worker 1 sent no heartbeat"}
    jobs = {
        "ps": {
            "finished": True,
            "samples_lost": 0,
            "samples_twice": 0,
            "max_param_diff": 1e-7,
            "longest_stall": stall,
        },
        "allreduce": {"finished": False, "exit": 1, "log": "x.log"},
    }
    table = _table({"mtbf_s": 5, "seed": 0, "jobs": jobs, "skipped": []}, faults)
    assert "| ps | shard-kill | 2 | 1 | 0.40 / 0.50 | 4.00 / 4.00 |" in table
    assert "worker-stop" not in table  # never injected: not in the table
    assert "| allreduce | worker-kill | 1 | 0 | 0.40 / 0.40 | 9.00 / 9.00 |" in table
    assert "| ps | yes | 0 | 0 | 1.00e-07 | 3.5 | shoal: warning: worker 1 sent no" in table
    assert "| allreduce | no (exit 1, see x.log)" in table


def test_the_bench_fails_on_every_shortfall():
    good = {"finished": True, "samples_lost": 0, "samples_twice": 0, "max_param_diff": 0.0}
    assert _failures({"jobs": {"ps": good}}) == []
    bad = {
        "ps": {**good, "missing": ["worker-stop"], "unnamed_stalls": [[40.0, 95.0]]},
        "allreduce": {**good, "samples_lost": 3, "max_param_diff": 0.1},
        "ps, 2 machines": {"finished": False, "exit": -9, "log": "n0.log"},
    }
    failed = "\n".join(_failures({"jobs": bad}))
    assert "ps: not injected: worker-stop" in failed
    assert "ps: 95.0 s without progress from +40.0 s, unnamed" in failed
    assert "allreduce: 3 samples lost and 0 counted twice" in failed
    assert "allreduce: ended 1.00e-01 from the reference" in failed
    assert "ps, 2 machines did not finish (exit -9; see n0.log)" in failed


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "args, needle",
    [
        (["--workers", "1"], "needs a survivor"),
        (["--mtbf", "0"], "--mtbf"),
        (["--jobs", "ps,nope"], "--jobs must name"),
    ],
)
def test_bench_chaos_refuses_in_one_line(tmp_path, args, needle):
    out = tmp_path / "bench"
    assert_one_line_error(run_shoal("bench", "chaos", "--out", str(out), *args), needle)
    assert not out.exists()
