"""shoal inside other launchers: torchrun starts the processes, shoal trains in them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from shoal.layout import REPORT_FILE
from tests.conftest import LINEAR_JOB, free_port, max_abs_diff, params, read_summary, shoal_env

pytestmark = pytest.mark.slow


def torchrun(
    nproc: int, *args: str, restarts: int = 0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node NPROC -m shoal train ARGS``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", f"--max-restarts={restarts}", "-m", "shoal", "train",
           "--no-progress", *args]  # fmt: skip
    return subprocess.run(cmd, env=shoal_env(env), capture_output=True, text=True, timeout=200)


@pytest.mark.timeout(240)
def test_torchrun_starts_the_workers_and_rank_0_writes_the_run(tmp_path, linear_reference):
    out = tmp_path / "run"
    proc = torchrun(2, "--out", str(out), *LINEAR_JOB, "--checkpoint-every", "100")
    assert proc.returncode == 0, proc.stderr
    assert max_abs_diff(params(out), params(linear_reference)) < 1e-6
    s = read_summary(out)
    assert s["world_size"] == 2 and s["steps"] == 200
    assert all(e["exact"] for e in s["epochs"]), s["epochs"]
    assert (out / REPORT_FILE).is_file()
    assert proc.stdout.count("run directory") == 1  # the summary table, from rank 0 only


@pytest.mark.timeout(240)
def test_torchrun_restarts_a_killed_worker_and_the_run_resumes_exactly(tmp_path, linear_reference):
    out = tmp_path / "run"
    job = ["--out", str(out), *LINEAR_JOB, "--checkpoint-every", "100", "--no-checkpoint-async"]
    proc = torchrun(2, *job, restarts=1, env={"SHOAL_FAULT": "crash:rank=1:step=150"})
    assert proc.returncode == 0, proc.stderr
    assert "shoal: restart 1: 2 workers resume from" in proc.stderr, proc.stderr
    s, ref = read_summary(out), read_summary(linear_reference)
    assert s["samples_per_epoch"] == ref["samples_per_epoch"] and s["steps"] == 200
    assert all(e["exact"] for e in s["epochs"]), s["epochs"]
    assert max_abs_diff(params(out), params(linear_reference)) < 1e-6


@pytest.mark.timeout(240)
def test_under_torchrun_a_mistake_is_said_once_by_rank_0(tmp_path):
    out = tmp_path / "run"
    proc = torchrun(2, "--out", str(out), *LINEAR_JOB, "--workers", "3")
    assert proc.returncode != 0
    said = [line for line in proc.stderr.splitlines() if line.startswith("shoal: error:")]
    assert said == [
        "shoal: error: --workers: under torchrun the launcher starts the processes "
        "(2 in all, 2 on this machine); drop --workers"
    ], proc.stderr
    assert not out.exists()


@pytest.mark.timeout(240)
def test_srun_tasks_that_are_processes_train_as_workers(tmp_path, linear_reference):
    """``srun --ntasks 2 shoal train`` on one node: Slurm's variables, no torch ones."""
    out, port = tmp_path / "run", str(free_port())
    cmd = [sys.executable, "-m", "shoal", "train", "--no-progress", "--no-report", "--out",
           str(out), *LINEAR_JOB, "--checkpoint-every", "100"]  # fmt: skip
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2",
             "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "127.0.0.1",
             "SLURM_NTASKS_PER_NODE": "2", "MASTER_PORT": port}  # fmt: skip
    tasks = [
        subprocess.Popen(cmd, env=shoal_env({**slurm, "SLURM_PROCID": r, "SLURM_LOCALID": r}),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in ("0", "1")
    ]  # fmt: skip
    outputs = [t.communicate(timeout=200) for t in tasks]
    assert [t.returncode for t in tasks] == [0, 0], outputs
    assert max_abs_diff(params(out), params(linear_reference)) < 1e-6
    assert read_summary(Path(out))["world_size"] == 2
    assert "run directory" in outputs[0][0] and "run directory" not in outputs[1][0]


@pytest.mark.timeout(240)
def test_ps_under_torchrun_takes_roles_from_ranks_and_bsp_equals_allreduce(
    tmp_path, linear_reference
):
    """3 processes, --servers 1: rank 0 is the shard (and the coordinator), 1 and 2 train."""
    out = tmp_path / "run"
    proc = torchrun(3, "--out", str(out), *LINEAR_JOB, "--strategy", "ps", "--ps-mode", "bsp",
                    "--no-report")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    s = read_summary(out)
    assert s["world_size"] == 2 and all(e["exact"] for e in s["epochs"])
    assert max_abs_diff(params(out), params(linear_reference)) < 1e-6
