"""``shoal bench faults``: its bookkeeping of kills, and its refusals."""

from __future__ import annotations

import pytest

from shoal.cli.bench_faults import _events
from tests.conftest import run_shoal
from tests.test_bad_input import assert_one_line_error

pytestmark = pytest.mark.slow  # trains through the launcher: not in the quick tier


def test_each_kill_gets_the_first_naming_and_resume_after_it():
    kills = [10.0, 30.0, 50.0]
    lines = [
        (5.0, "shoal: restart 9: before any kill, ignored"),
        (10.4, "shoal: error: worker rank 1 on vm (pid 7) was killed by SIGKILL"),
        (19.0, "shoal: restart 1: 4 workers resume from checkpoints/step-00000100"),
        (30.2, "shoal: error: worker rank 3 on vm (pid 9) was killed by SIGKILL"),
        # the third kill fell while the job was ending: nobody named it
    ]
    events = _events(kills, lines)
    assert events[0] == {"detect_s": pytest.approx(0.4), "recover_s": pytest.approx(9.0)}
    assert events[1] == {"detect_s": pytest.approx(0.2), "recover_s": None}
    assert events[2] == {"detect_s": None, "recover_s": None}


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "args, needle",
    [
        (["--workers", "1"], "needs a survivor"),
        (["--", "--model", "linear"], "the job needs --checkpoint-every N"),
        (["--", "--strategy", "ps", "--checkpoint-every", "5"], "--strategy ps is not one"),
    ],
)
def test_bench_faults_refuses_in_one_line(tmp_path, args, needle):
    out = tmp_path / "bench"
    proc = run_shoal("bench", "faults", "--out", str(out), *args)
    assert_one_line_error(proc, needle)
    assert not out.exists()
