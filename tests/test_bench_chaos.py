"""``shoal bench chaos``: its bookkeeping and its refusals (the bench itself is long)."""

from __future__ import annotations

import pytest

from shoal.cli.bench_chaos import Fault, _table
from tests.conftest import run_shoal
from tests.test_bad_input import assert_one_line_error

pytestmark = pytest.mark.slow  # trains through the launcher: not in the quick tier


def test_the_table_counts_only_faults_of_finished_jobs_that_recovered():
    faults = [
        Fault("ps", "shard-kill", 1.0, detect_s=0.3, recover_s=4.0),
        Fault("ps", "shard-kill", 9.0, detect_s=0.5, recover_s=None),  # never trained again
        Fault("allreduce", "worker-kill", 2.0, detect_s=0.4, recover_s=9.0),
    ]
    jobs = {
        "ps": {"finished": True, "samples_lost": 0, "samples_twice": 0, "max_param_diff": 1e-7},
        "allreduce": {"finished": False, "exit": 1, "log": "x.log"},
    }
    table = _table({"mtbf_s": 5, "seed": 0, "jobs": jobs, "skipped": []}, faults)
    assert "| ps | shard-kill | 2 | 1 | 0.40 | 4.00 |" in table
    assert "| allreduce | worker-kill | 1 | 0 | 0.40 | 9.00 |" in table  # its job failed
    assert "| ps | yes | 0 | 0 | 1.00e-07 |" in table
    assert "| allreduce | no (exit 1, see x.log)" in table


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "args, needle", [(["--workers", "1"], "needs a survivor"), (["--mtbf", "0"], "--mtbf")]
)
def test_bench_chaos_refuses_in_one_line(tmp_path, args, needle):
    out = tmp_path / "bench"
    assert_one_line_error(run_shoal("bench", "chaos", "--out", str(out), *args), needle)
    assert not out.exists()
