"""shoal in Ray Train: a TorchTrainer (Ray started on this machine) trains a shoal job
to the parameters ``shoal train`` reaches, and Ray's restart of a killed worker
resumes from shoal's checkpoint with every sample counted once."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.conftest import (
    LINEAR_JOB,
    max_abs_diff,
    no_argparse,
    params,
    read_summary,
    run_shoal,
    tables,
)

ray = pytest.importorskip("ray", reason="Ray is an extra: pip install 'shoal[ray]'")
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]  # one worker: one Ray


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=3, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


class WithFault:
    """A train loop run with ``SHOAL_FAULT`` set in each Ray worker (pickled by value:
    Ray's workers do not import this test module)."""

    def __init__(self, loop, fault: str) -> None:
        self.loop, self.fault = loop, fault

    def __call__(self, config=None) -> None:
        os.environ["SHOAL_FAULT"] = self.fault
        self.loop(config)


ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def fit(loop, failures: int = 0, workers: int = 2):
    import ray.train
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        loop,
        scaling_config=ray.train.ScalingConfig(num_workers=workers),
        run_config=ray.train.RunConfig(
            failure_config=ray.train.FailureConfig(max_failures=failures),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )
    try:
        return trainer.fit()
    except Exception as e:  # what the workers said, which the error leaves out
        said = _workers_said()  # (first: Ray's own message is long and gets cut)
        raise AssertionError(f"the workers said:\n{said}\n--- Ray: {str(e)[:600]}") from e


def _workers_said() -> str:
    """shoal's lines and the last lines of each Ray worker's stderr in this session."""
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    said = []
    for err in sorted(logs.glob("worker-*.err"), key=lambda p: p.stat().st_mtime):
        lines = [line for line in err.read_text(errors="replace").splitlines() if line.strip()]
        tail = [line for line in lines if "shoal" in line or "Error" in line][-8:]
        if tail:
            said.append(f"{err.name}:\n  " + "\n  ".join(tail))
    return "\n".join(said) or "(nothing)"


@pytest.mark.timeout(240)
def test_a_torch_trainer_reaches_shoal_trains_parameters_through_a_killed_worker(
    tmp_path, local_ray, linear_reference, monkeypatch
):
    """The job as its tables (from there on no argument parser or job file is used); Ray
    restarts the group after a worker is killed, and the run resumes exactly."""
    import shoal.ray

    out = tmp_path / "run"
    job = tables(*LINEAR_JOB, "--out", str(out), "--no-progress", "--no-report",
                 "--checkpoint-every", "100")  # fmt: skip
    no_argparse(monkeypatch)
    loop = shoal.ray.train_loop(job)
    result = fit(WithFault(loop, "crash:rank=1:step=150"), failures=1)  # SIGKILL after 150
    assert result.error is None
    assert (out / "faults").is_dir()  # (the kill happened)
    s, ref = read_summary(out), read_summary(linear_reference)
    assert s["restarts"] == 1 and s["world_size"] == 2
    assert s["samples_per_epoch"] == ref["samples_per_epoch"] and s["steps"] == 200
    assert all(e["exact"] for e in s["epochs"]), s["epochs"]
    assert max_abs_diff(params(out), params(linear_reference)) < 1e-6


@pytest.mark.timeout(240)
def test_ps_on_ray_takes_roles_from_ranks_and_bsp_equals_allreduce(
    tmp_path, local_ray, linear_reference
):
    """3 Ray workers, --servers 1: rank 0 serves (and coordinates), ranks 1 and 2 train."""
    import shoal.ray

    out = tmp_path / "run"
    job = [*LINEAR_JOB, "--strategy", "ps", "--ps-mode", "bsp", "--servers", "1"]
    loop = shoal.ray.train_loop(tables(*job, "--out", str(out), "--no-progress", "--no-report"))
    assert fit(loop, workers=3).error is None
    s = read_summary(out)
    assert s["world_size"] == 2 and all(e["exact"] for e in s["epochs"])
    assert max_abs_diff(params(out), params(linear_reference)) < 1e-6


def _recorded_by_ray() -> bytes:
    """What the Ray cluster keeps of its jobs and actors (runtime environments included),
    as the bytes of its tables: what any user of the cluster can read back."""
    from ray._private.state import state

    accessor = state._connect_and_get_accessor()
    jobs = accessor.get_job_table(
        skip_submission_job_info_field=False, skip_is_running_tasks_field=True
    )
    return b"".join([*jobs, *accessor.get_actor_table(None, None)])


@pytest.mark.timeout(180)
def test_engine_ray_keeps_the_ps_secret_out_of_the_clusters_records(tmp_path, local_ray):
    """``--engine ray`` on a running cluster (``--address``): shoal's variables reach the
    workers through the job's runtime_env, which Ray keeps; the secret must not."""
    secret, marker = "7a" * 32, "shoal-marker-" + os.urandom(4).hex()
    out = tmp_path / "run"
    proc = run_shoal(
        "train", *LINEAR_JOB, "--steps", "10", "--workers", "1", "--out", str(out),
        "--engine", "ray", "--address", ray.get_runtime_context().gcs_address,
        "--no-report", env={"SHOAL_SECRET": secret, "SHOAL_TEST_MARKER": marker},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    # each line of the worker's once (Ray Train's own print would double them)
    assert proc.stderr.count("steps to run") == 1, proc.stderr
    recorded = _recorded_by_ray()
    assert marker.encode() in recorded  # (the records hold the runtime_env: the test sees it)
    in_ray = secret.encode() in recorded
    assert not in_ray, "the secret is in the Ray cluster's records"
    assert not (out / ".secret").exists()  # the driver took its file back
    leaked = [p for p in out.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert not leaked, leaked


@pytest.mark.timeout(120)
def test_a_mistake_in_the_job_is_one_line_before_ray_starts(tmp_path):
    import shoal.ray
    from shoal.errors import UserError

    with pytest.raises(UserError, match="--batch-size must be >= 1"):
        shoal.ray.train_loop({"train": {"batch_size": 0}, "output": {"out": str(tmp_path / "run")}})
    assert not (tmp_path / "run").exists()
