"""``shoal bench faults``: its bookkeeping of kills, and its refusals."""

from __future__ import annotations

import pytest

from shoal.cli.bench_faults import _events
from tests.conftest import run_shoal
from tests.test_bad_input import assert_one_line_error

pytestmark = pytest.mark.slow  # trains through the launcher: not in the quick tier


def test_each_kill_gets_the_first_naming_and_step_after_it():
    kills = [10.0, 30.0, 50.0]
    lines = [
        (5.0, "shoal: went on at step 1"),  # (before any kill: ignored)
        (10.4, "shoal: error: worker rank 1 on vm (pid 7) was killed by SIGKILL"),
        (19.0, "shoal: restart 1: 4 workers resume from checkpoints/step-00000100"),
        (19.5, "shoal: went on at step 101"),
        (19.6, "shoal: went on at step 101"),
        (30.2, "shoal: worker 3.0 (slot 3) was killed by SIGKILL; the others go on without it"),
        # the third kill fell while the job was ending: nobody named it, no step after it
    ]
    events = _events(kills, lines)
    assert events[0] == {"detect_s": pytest.approx(0.4), "recover_s": pytest.approx(9.5)}
    assert events[1] == {"detect_s": pytest.approx(0.2), "recover_s": None}
    assert events[2] == {"detect_s": None, "recover_s": None}


def test_torchft_s_commits_count_samples_twice_and_never(tmp_path):
    """The accounting of torchft's commits against the job's global batches: a step
    two quorums committed counts its samples twice, a step nobody committed never."""
    from shoal.cli.bench_faults import resolve_job_args
    from shoal.cli.bench_torchft import _accounting, _sampler

    job = resolve_job_args(["--model", "linear", "--steps", "3", "--batch-size", "8"], 2)
    sampler, total = _sampler(job)
    assert total == 3
    batch = [sampler.global_indices(0, s).tolist() for s in range(3)]
    whole = [(s, 0.0, b[:4]) for s, b in enumerate(batch)] + [
        (s, 0.0, b[4:]) for s, b in enumerate(batch)
    ]
    assert _accounting(job, whole) == {"samples_twice": 0, "samples_never": 0}
    again = [*whole, (1, 1.0, batch[1][:4])]  # step 1's first half committed twice
    assert _accounting(job, again) == {"samples_twice": 4, "samples_never": 0}
    lost = [c for c in whole if not (c[0] == 2 and c[2] == batch[2][4:])]
    assert _accounting(job, lost) == {"samples_twice": 0, "samples_never": 4}


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "args, needle",
    [
        (["--workers", "1"], "needs a survivor"),
        (["--", "--model", "linear"], "the job needs --checkpoint-every N"),
        (["--", "--strategy", "ps", "--checkpoint-every", "5"], "--strategy ps is not one"),
        (["--", "--checkpoint-every", "5", "--recovery", "inplace"], "not the job"),
        (["--recovery", "inplace,ddp", "--", "--checkpoint-every", "5"], "'ddp' is not one"),
        (
            ["--recovery", "inplace", "--", "--checkpoint-every", "5", "--strategy", "tensor"],
            "recovers only by restart",
        ),
    ],
)
def test_bench_faults_refuses_in_one_line(tmp_path, args, needle):
    out = tmp_path / "bench"
    proc = run_shoal("bench", "faults", "--out", str(out), *args)
    assert_one_line_error(proc, needle)
    assert not out.exists()
