"""A run directory survives careless users: one live job at a time, resumes that could
not continue the run are refused before anything changes, torn files and full disks."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from shoal import checkpoint
from shoal.cli import main
from shoal.metrics import read_metrics
from tests.conftest import LINEAR_JOB, read_summary, run_shoal, start_train, train

pytestmark = pytest.mark.slow  # trains through the launcher: not in the quick tier


def _tree(run: Path) -> dict[str, tuple[int, int]]:
    """Every file of a run directory with its size and modification time."""
    return {
        str(p.relative_to(run)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(run.rglob("*"))
        if p.is_file()
    }


def _one_line(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], lines


@pytest.mark.timeout(180)
def test_a_live_run_directory_is_refused_to_a_second_job(tmp_path):
    """While a job runs, ``--resume`` on its directory (and a new run into it) ends with
    one line naming the holder and touches nothing."""
    out = tmp_path / "live"
    args = [*LINEAR_JOB, "--steps", "120", "--workers", "2", "--checkpoint-every", "20"]
    args += ["--keep-checkpoints", "0"]  # the job deletes none itself
    job = start_train(out, *args, env={"SHOAL_FAULT": "slow:rank=0:ms=100"})
    try:
        deadline = time.monotonic() + 90
        while len(checkpoint.list_checkpoints(out)) < 2:
            assert time.monotonic() < deadline and job.poll() is None, job.stderr.read()
            time.sleep(0.2)
        before = {k: v for k, v in _tree(out).items() if "checkpoints" in k}
        second = run_shoal("train", "--resume", str(out), "--steps", "400", "--no-progress")
        _one_line(second, f"run directory {out} is in use by shoal train (pid {job.pid}")
        again = run_shoal("train", "--out", str(out), *LINEAR_JOB)
        _one_line(again, "is in use by shoal train")
        assert job.poll() is None, "the job ended before the checks: slow it down"
        after = {k: v for k, v in _tree(out).items() if "checkpoints" in k}
        assert set(before) <= set(after), "a checkpoint of the live run was deleted"
        assert job.wait(timeout=120) == 0, job.stderr.read()
    finally:
        job.kill()
    assert read_summary(out)["steps"] == 120


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "flag, value, needle",
    [
        ("--seed", "5", "--seed was 2 in the run and is 5 now"),
        ("--batch-size", "32", "--batch-size was 64 in the run and is 32 now"),
        ("--hidden", "64", "--hidden was 128 in the run and is 64 now"),
    ],
)
@pytest.mark.parametrize("strategy", ["allreduce", "ps"])
def test_resume_refuses_what_would_change_the_run_before_writing(
    strategy, flag, value, needle, tmp_path, linear_reference, ps_bsp_linear, capsys
):
    run = tmp_path / "run"
    shutil.copytree(linear_reference if strategy == "allreduce" else ps_bsp_linear, run)
    if flag == "--hidden":  # a model that has hidden layers (linear ignores --hidden)
        config = run / "config.toml"
        config.write_text(config.read_text().replace('name = "linear"', 'name = "mlp"'))
    before = _tree(run)
    code = main(["train", "--resume", str(run), "--steps", "300", flag, value])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert _tree(run) == before  # config.toml and everything else untouched
    # what may change does (a dry run checks the whole job and writes nothing)
    safe = ["--steps", "300", "--lr", "0.01", "--workers", "3", "--log-every", "5"]
    assert main(["train", "--resume", str(run), *safe, "--dry-run"]) == 0
    assert _tree(run) == before


@pytest.mark.timeout(120)
def test_a_torn_metrics_tail_is_cut_with_a_warning_on_resume(tmp_path, linear_reference):
    run = tmp_path / "torn"
    shutil.copytree(linear_reference, run)
    with (run / "metrics.jsonl").open("ab") as fh:
        fh.write(b'{"step": 210, "loss": 0.0' + b"\0" * 64)  # a crash in mid-record
    proc = train(run, "--resume", str(run), "--steps", "240", "--workers", "2")
    assert "cut off a torn or corrupt tail of 89 bytes" in proc.stderr
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(10, 241, 10))  # one uninterrupted run


@pytest.fixture
def small_disk(tmp_path):
    """A 2.3 MB tmpfs (root only): room for the run, one checkpoint, not two."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2300k", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.timeout(180)
def test_a_full_disk_leaves_no_partial_checkpoint_and_training_finishes(small_disk):
    out = small_disk / "run"
    job = ["--model", "mlp", "--data", "synthetic-linear", "--hidden", "400", "--layers", "2"]
    job += ["--steps", "60", "--optimizer", "momentum", "--checkpoint-every", "20"]
    proc = train(out, *job, "--workers", "2", "--keep-checkpoints", "1")
    assert "was not written (No space left on device); training goes on" in proc.stderr
    summary = read_summary(out)
    assert summary["steps"] == 60 and summary["checkpoints"]["failed"] >= 1
    names = [p.name for p in (out / "checkpoints").iterdir()]
    assert names and all(n.startswith("step-") for n in names), names  # no partial files
    assert checkpoint.load_latest(out) is not None
