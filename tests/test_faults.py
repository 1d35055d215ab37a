"""Fault tolerance end to end: real SIGKILLs, SIGSTOPs, cut links and corrupt files.

Every failed run is compared with an unfailed one: the same samples in every
epoch (none lost, none counted twice, work redone after a restart counted
once), the same parameters where the strategy is deterministic, and a final
loss within 5%.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests import forkserve, netns
from tests.conftest import (
    FRESH,
    LINEAR_JOB,
    NOISE_FLOOR,
    PS_ASYNC_JOB,
    free_port,
    max_abs_diff,
    params,
    read_summary,
    shoal_env,
    train,
)

pytestmark = pytest.mark.slow  # trains through the launcher: not in the quick tier

W2 = ["--workers", "2"]
RESTART = ["--recovery", "restart"]
"""The restart path (the default, ``auto``, recovers allreduce and local-sgd in place)."""
SYNC = "--no-checkpoint-async"
"""For a kill soon after a checkpoint: a background write still in flight dies with the
process (seen under load: 54 linear steps, 0.2 s, beat the write's fsyncs), and a test
that names the step it resumes from needs the checkpoint complete before training goes on."""
MID_EPOCH = 150
"""A step in the middle of epoch 2 of LINEAR_JOB (52 steps an epoch)."""


def _like_unfailed(run: Path, reference: Path, exact: bool = True) -> dict:
    s, ref = read_summary(run), read_summary(reference)
    assert s["samples_per_epoch"] == ref["samples_per_epoch"]
    assert s["steps"] == ref["steps"]
    assert s["test_loss"] <= 1.05 * ref["test_loss"]
    if exact:
        assert max_abs_diff(params(run), params(reference)) < 1e-6
    return s


@pytest.mark.timeout(180)
def test_allreduce_restarts_itself_after_a_sigkill(tmp_path, linear_reference):
    """--recovery restart: torchrun's agent restarts the workers, which resume from step 100."""
    out = tmp_path / "run"
    proc = train(
        out,
        *LINEAR_JOB,
        *W2,
        *RESTART,
        "--checkpoint-every",
        "100",
        SYNC,
        env={"SHOAL_FAULT": f"crash:rank=1:step={MID_EPOCH}"},
    )
    assert "shoal: error: worker rank 1 on" in proc.stderr and "killed by SIGKILL" in proc.stderr
    assert "restart 1: 2 workers resume from checkpoints/step-00000100" in proc.stderr
    s = _like_unfailed(out, linear_reference)
    assert s["restarts"] == 1 and s["resumed_from_step"] == 100


@pytest.mark.timeout(180)
def test_local_sgd_restarts_itself_after_a_sigkill(tmp_path, local_sgd_reference):
    out = tmp_path / "run"
    train(
        out,
        *LINEAR_JOB,
        *W2,
        *RESTART,
        "--strategy",
        "local-sgd",
        "--checkpoint-every",
        "96",
        SYNC,
        env={"SHOAL_FAULT": f"crash:rank=0:step={MID_EPOCH}"},
    )
    s = _like_unfailed(out, local_sgd_reference)
    assert s["restarts"] == 1 and s["resumed_from_step"] == 96


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", ["bsp", "ssp", "asp"])
def test_parameter_server_survives_a_sigkilled_worker(
    mode, tmp_path, linear_reference, ps_async_linear
):
    """The others carry on, the dead worker's task included; it restarts and rejoins.
    Every sample once."""
    job = [*PS_ASYNC_JOB, "--ps-mode", mode]
    out = tmp_path / mode
    proc = train(out, *job, env={"SHOAL_FAULT": f"crash:rank=1:step={MID_EPOCH}"})
    assert "worker 1 failed (exit code -9); restarting it" in proc.stderr
    assert "worker 1 rejoined" in proc.stderr
    if mode == "bsp":  # it sums the same parts of the same steps: the allreduce model
        s = _like_unfailed(out, linear_reference)
    else:  # staleness costs some loss, with or without a kill: compare like with like
        s = _like_unfailed(out, ps_async_linear(mode), exact=False)
    assert s["ps"]["failed_workers"] == [1]
    assert s["per_worker"][1]["failed_exit_code"] == -signal.SIGKILL
    assert sum(w["tasks"] for w in s["per_worker"]) == 3 * 200


@pytest.mark.timeout(240)
def test_a_killed_server_is_restored_and_the_job_finishes(tmp_path, linear_reference):
    """Every shard goes back to the step-100 checkpoint, the killed one in a new process;
    the tasks since are done again, so bsp still ends at the allreduce model."""
    out = tmp_path / "run"
    proc = train(
        out,
        *LINEAR_JOB,
        *["--strategy", "ps", "--workers", "2", "--servers", "2", "--ps-mode", "bsp"],
        *["--checkpoint-every", "50"],
        env={"SHOAL_FAULT": "crash:role=server:rank=1:step=120"},
    )
    assert "server shard 1 was killed by SIGKILL" in proc.stderr
    assert "failed (exit code" not in proc.stderr  # the workers waited for the restore
    s = _like_unfailed(out, linear_reference)
    assert s["ps"]["failed_workers"] == []
    assert s["ps"]["server_restores"] == [{"shard": 1, "exit_code": -9, "step": 100}]
    assert sum(w["tasks"] for w in s["per_worker"]) == 2 * 200
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps.count(110) == 1  # replayed, recorded once


class _Watched:
    """A ``shoal`` command whose stderr lines are timestamped as they arrive."""

    def __init__(self, cmd: list[str], env: dict[str, str] | None = None) -> None:
        shoal = [sys.executable, "-m", "shoal"]
        if cmd[:3] == shoal and not FRESH:  # (forked from the tests' fork server)
            self.proc = forkserve.start(
                cmd[3:], shoal_env(env), stderr=subprocess.PIPE, start_new_session=True
            )
        else:
            self.proc = subprocess.Popen(
                cmd,
                env=shoal_env(env),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append((time.time(), line.rstrip()))

    def first(self, text: str, timeout: float) -> float:
        """When a line containing ``text`` arrived (waits for it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, line in self.lines:
                if text in line:
                    return t
            time.sleep(0.05)
        raise AssertionError(f"no line with {text!r}:\n" + "\n".join(s for _, s in self.lines))

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


def _shoal(out: Path) -> list[str]:
    return [sys.executable, "-m", "shoal", "train", "--out", str(out), "--no-progress"]


@pytest.mark.timeout(180)
def test_a_hung_worker_is_named_within_5_s_and_the_job_recovers(tmp_path, linear_reference):
    out = tmp_path / "run"
    cmd = [*_shoal(out), "--no-report", *LINEAR_JOB, *W2, *RESTART, "--checkpoint-every", "100"]
    job = _Watched(cmd, env={"SHOAL_FAULT": f"hang:rank=1:step={MID_EPOCH}"})
    try:
        seen = job.first("worker rank 1 on", timeout=120)
        assert job.proc.wait(timeout=120) == 0, "\n".join(s for _, s in job.lines)
    finally:
        job.stop()
    stopped = (out / "faults" / f"hang-rank1-step{MID_EPOCH}").stat().st_mtime
    assert seen - stopped < 5.0
    assert any("is hung (stopped)" in line for _, line in job.lines)
    s = _like_unfailed(out, linear_reference)
    assert s["restarts"] == 1


@pytest.mark.timeout(180)
def test_corrupt_newest_checkpoint_falls_back_on_resume(tmp_path, linear_reference):
    out = tmp_path / "run"
    shutil.copytree(linear_reference, out)
    for name in ("summary.json", "model.safetensors"):
        (out / name).unlink()
    state = out / "checkpoints" / "step-00000200" / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])  # truncated
    proc = train(out, "--resume", str(out))
    assert "skipping checkpoint" in proc.stderr and "checksum mismatch" in proc.stderr
    s = _like_unfailed(out, linear_reference)
    assert s["resumed_from_step"] == 100


@pytest.mark.timeout(240)
def test_four_workers_killed_then_three_finish_the_epoch(tmp_path, linear_reference):
    """Killed mid-epoch 1 on 4 workers; resumed on 3, the global batch re-sharded."""
    out = tmp_path / "run"
    crashed = train(
        out,
        *LINEAR_JOB,
        *RESTART,
        "--workers",
        "4",
        "--checkpoint-every",
        "60",
        "--max-restarts",
        "0",
        SYNC,
        env={"SHOAL_FAULT": "crash:rank=2:step=80"},
        check=False,
    )
    assert crashed.returncode != 0 and "worker rank 2" in crashed.stderr
    assert not (out / "summary.json").exists()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000060"]
    train(out, "--resume", str(out), "--workers", "3")
    s = _like_unfailed(out, linear_reference, exact=False)
    assert s["world_size"] == 3 and s["resumed_from_step"] == 60
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(10, 201, 10))  # records after step 60 were replaced, not doubled
    # synchronous data parallel: the same samples make the same steps on 3 workers as on 2
    assert max_abs_diff(params(out), params(linear_reference)) < 1e-5


PS_JOB = [*LINEAR_JOB, "--strategy", "ps", "--ps-mode", "bsp"]


@pytest.mark.timeout(240)
def test_parameter_server_resumes_after_ctrl_c_on_more_workers(tmp_path, linear_reference):
    """Interrupted after step 100's checkpoint; --resume on 3 workers. The step's parts
    stay the first run's 2, so bsp still ends at the allreduce model."""
    out = tmp_path / "run"
    cmd = [*_shoal(out), "--no-report", *PS_JOB, *W2, "--servers", "2"]
    job = _Watched([*cmd, "--checkpoint-every", "50"], env={"SHOAL_FAULT": "slow:rank=*:ms=20"})
    try:
        _wait_for_records(out / "metrics.jsonl", count=12)
        os.killpg(job.proc.pid, signal.SIGINT)  # Ctrl-C
        assert job.proc.wait(timeout=60) != 0
    finally:
        job.stop()
    assert not (out / "summary.json").exists()
    proc = train(out, "--resume", str(out), "--workers", "3")
    assert "resuming from the server checkpoints of step 100" in proc.stderr
    s = _like_unfailed(out, linear_reference)
    assert s["world_size"] == 3 and s["resumed_from_step"] == 100
    assert all(w["tasks"] > 0 for w in s["per_worker"])
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[:-1] == list(range(10, 201, 10))  # the records after step 100 once
    config = (out / "config.toml").read_text()
    refused = train(out, "--resume", str(out), "--servers", "3", "--steps", "300", check=False)
    assert refused.returncode == 2 and "resume with the same --servers" in refused.stderr
    assert (out / "config.toml").read_text() == config


@pytest.mark.timeout(240)
def test_a_new_machine_joins_a_running_parameter_server_job(tmp_path, linear_reference):
    """--nnodes 1:2: node 1 (one worker, no servers) joins once training is under way
    and takes tasks from the queue; every sample once, bsp's model unchanged."""
    endpoint = ["--nnodes", "1:2", "--rdzv-endpoint", f"127.0.0.1:{free_port()}"]
    env = {"SHOAL_SECRET": "ab" * 32}
    node0 = [*endpoint, "--node-rank", "0", "--workers", "1", "--servers", "2"]
    first = _Watched(
        [*_shoal(tmp_path / "run"), "--no-report", *PS_JOB, *node0],
        env={**env, "SHOAL_FAULT": "slow:rank=0:ms=60"},
    )
    try:
        _wait_for_records(tmp_path / "run" / "metrics.jsonl", count=3)
        late = train(
            tmp_path / "node1",  # a machine that does not own the run directory
            *PS_JOB,
            *endpoint,
            *["--node-rank", "1", "--workers", "1", "--servers", "0"],
            env=env,
        )
        assert "joined" not in late.stderr  # node 0 says so, not the newcomer
        assert first.proc.wait(timeout=120) == 0, "\n".join(s for _, s in first.lines)
    finally:
        first.stop()
    assert any("node 1 joined the running job: workers 1..1" in s for _, s in first.lines)
    s = _like_unfailed(tmp_path / "run", linear_reference, exact=False)
    assert max_abs_diff(params(tmp_path / "run"), params(linear_reference)) < 1e-5
    assert s["world_size"] == 2 and s["ps"]["joined"][0]["node"] == 1
    assert s["per_worker"][1]["tasks"] > 0
    assert sum(w["tasks"] for w in s["per_worker"]) == 200  # one part a step, each once


def _on_host(
    host, out: Path, job: list[str], nnodes: str, rank: int, endpoint: str, env=None
) -> _Watched:
    """Node ``rank`` of a job on a namespace host."""
    cmd = [*host.prefix(), "env", f"GLOO_SOCKET_IFNAME={host.ifname}", *_shoal(out)]
    cmd += ["--no-report", *job, "--workers", "1", "--nnodes", nnodes]
    return _Watched([*cmd, "--node-rank", str(rank), "--rdzv-endpoint", endpoint], env)


def _on_hosts(hosts: tuple, runs: list[Path], job: list[str], nnodes: str) -> list[_Watched]:
    """One ``shoal train`` node per namespace host, node 0's address the endpoint."""
    endpoint = f"{hosts[0].addr}:{free_port()}"
    return [
        _on_host(host, out, job, nnodes, rank, endpoint)
        for rank, (host, out) in enumerate(zip(hosts, runs, strict=True))
    ]


def _wait_for_records(metrics: Path, count: int = 3) -> None:
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= count):
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)


def _wait_for_step(metrics: Path, step: int) -> None:
    deadline = time.monotonic() + 120
    while True:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        with contextlib.suppress(ValueError):  # a line being written
            if any(json.loads(line).get("step", 0) >= step for line in lines if line.strip()):
                return
        assert time.monotonic() < deadline, f"training did not reach step {step}"
        time.sleep(0.2)


@pytest.mark.netns
@pytest.mark.timeout(240)
def test_a_downed_link_is_named_within_5_s(tmp_path):
    job = ["--model", "linear", "--batch-size", "64", "--steps", "100000"]
    with netns.hosts(subnet="10.231.8") as (a, b):
        jobs = _on_hosts((a, b), [tmp_path / "node0", tmp_path / "node1"], job, "2")
        try:
            _wait_for_records(tmp_path / "node0" / "metrics.jsonl")
            subprocess.run(
                ["ip", "-n", b.ns, "link", "set", b.ifname, "down"], check=True, timeout=20
            )
            cut = time.time()
            seen = jobs[0].first("worker rank 1 on", timeout=60)
            assert seen - cut < 5.0
            line = next(s for _, s in jobs[0].lines if "worker rank 1 on" in s)
            assert b.addr in line and "hung or unreachable" in line
        finally:
            for job in jobs:
                job.stop()


@pytest.mark.netns
@pytest.mark.timeout(300)
def test_elastic_nodes_a_host_joins_then_dies_and_the_survivor_finishes(tmp_path, linear_reference):
    """--nnodes 1:2: host 0 starts alone; host 1 arrives and torchrun's rendezvous re-forms
    the job on both; then host 1 dies whole, host 0 names it, re-forms alone, and each
    time the workers resume from the newest checkpoint and finish the epochs exactly."""
    steps = 2000
    job = [*LINEAR_JOB[:2], "--steps", str(steps), *LINEAR_JOB[4:], "--log-every", "100"]
    job += ["--checkpoint-every", "250", "--rdzv-last-call", "2"]
    with netns.hosts(subnet="10.231.5") as (a, b):
        endpoint = f"{a.addr}:{free_port()}"
        slow = {"SHOAL_FAULT": "slow:rank=*:ms=8"}  # 16 s of steps: time to grow and shrink
        jobs = [_on_host(a, tmp_path / "run", job, "1:2", 0, endpoint, slow)]
        try:
            _wait_for_records(tmp_path / "run" / "metrics.jsonl")
            # the same run directory: both resume from its checkpoints (a shared filesystem)
            jobs.append(_on_host(b, tmp_path / "run", job, "1:2", 1, endpoint, slow))
            jobs[0].first("a machine joined: 2 workers resume", timeout=120)
            line = next(s for _, s in jobs[0].lines if "a machine joined" in s)
            joined_at = int(line.rsplit("step-", 1)[1])
            _wait_for_step(tmp_path / "run" / "metrics.jsonl", joined_at + 300)
            pids = subprocess.run(
                ["ip", "netns", "pids", b.ns], capture_output=True, text=True, timeout=20
            ).stdout.split()
            for pid in pids:  # the whole host dies
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            assert jobs[0].proc.wait(timeout=200) == 0, "\n".join(s for _, s in jobs[0].lines)
        finally:
            for j in jobs:
                j.stop()
    lines = "\n".join(s for _, s in jobs[0].lines)
    assert "worker rank 1 on" in lines and "restart 1: 1 worker resume" in lines
    s = read_summary(tmp_path / "run")
    assert s["world_size"] == 1 and s["restarts"] == 1  # torchrun counts failures only
    n, batch = s["train_samples"], 64
    per_epoch = -(-n // batch)
    expected: dict[str, int] = {}
    for step in range(steps):  # every sample of every epoch once, on 1, 2, then 1 workers
        epoch, k = divmod(step, per_epoch)
        expected[str(epoch)] = expected.get(str(epoch), 0) + min(batch, n - k * batch)
    assert s["samples_per_epoch"] == expected
    # it trained on: 10x the reference's steps, whatever the failures cost
    assert s["test_loss"] <= 1.05 * read_summary(linear_reference)["test_loss"]


@pytest.mark.timeout(240)
def test_a_stopped_server_is_named_within_5_s_and_restored(tmp_path, linear_reference):
    """Shard 1 SIGSTOPs itself after step 120: its silence is named (role, id, host) in
    under 5 s, its machine's launcher kills it, and it is restored like a dead one."""
    out = tmp_path / "run"
    cmd = [*_shoal(out), "--no-report", *LINEAR_JOB, "--checkpoint-every", "50"]
    cmd += ["--strategy", "ps", "--workers", "2", "--servers", "2", "--ps-mode", "bsp"]
    job = _Watched(cmd, {"SHOAL_FAULT": "hang:role=server:rank=1:step=120"})
    try:
        seen = job.first("server shard 1 on 127.0.0.1 (node 0) sent no heartbeat", timeout=120)
        stopped = (out / "faults" / "hang-server1-step120").stat().st_mtime
        assert job.proc.wait(timeout=120) == 0, "\n".join(s for _, s in job.lines)
    finally:
        job.stop()
    assert seen - stopped < 5, seen - stopped
    s = _like_unfailed(out, linear_reference)
    assert s["ps"]["server_restores"] == [{"shard": 1, "exit_code": -9, "step": 100}]


@pytest.mark.timeout(240)
def test_a_worker_stopped_before_it_registers_is_named_in_time_and_the_job_goes_on(tmp_path):
    """Stopped as it starts, before its first heartbeat: its launcher names it within the
    heartbeat timeout (3 s) plus a second, kills it, and its restart does its share.
    (It used to wait for --startup-timeout; a worker stopped between a restart and its
    rejoining was never named at all.)"""
    out = tmp_path / "run"
    cmd = [*_shoal(out), "--no-report", *LINEAR_JOB, "--startup-timeout", "60"]
    cmd += ["--strategy", "ps", "--workers", "3", "--servers", "1", "--ps-mode", "asp"]
    job = _Watched(cmd, {"SHOAL_FAULT": "hang:rank=2:step=0;slow:rank=*:ms=50"})  # (~10 s)
    try:
        seen = job.first("worker 2 (pid", 120)
        stopped = (out / "faults" / "hang-rank2-step0").stat().st_mtime
        job.first("worker 2 rejoined", 60)
        assert job.proc.wait(timeout=150) == 0, "\n".join(s for _, s in job.lines)
    finally:
        job.stop()
    assert seen - stopped < 3 + 1, seen - stopped
    line = next(line for _, line in job.lines if "worker 2 (pid" in line)
    assert "has been stopped for 3." in line and "(SIGSTOP or a debugger)" in line
    s = read_summary(out)
    assert sum(w["tasks"] for w in s["per_worker"]) == 3 * 200
    assert s["per_worker"][2]["tasks"] > 0  # the restarted worker took its share
    assert s["test_loss"] < 2 * NOISE_FLOOR


@pytest.mark.timeout(180)
def test_a_node_whose_coordinator_is_gone_says_so_within_the_timeout(tmp_path):
    """Node 0 (the coordinator, the shards) dies whole; node 1 names what it lost in
    one line within --heartbeat-timeout plus a margin, instead of waiting for ever."""
    endpoint = ["--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{free_port()}"]
    job = [*LINEAR_JOB, "--steps", "100000", "--strategy", "ps", *endpoint]
    env = {"SHOAL_SECRET": "cd" * 32}
    node0 = _Watched(
        [*_shoal(tmp_path / "run"), "--no-report", *job, "--node-rank", "0", "--workers", "1"],
        env,
    )
    node1 = _Watched(
        [*_shoal(tmp_path / "n1"), *job, "--node-rank", "1", "--workers", "1", "--servers", "0"],
        env,
    )
    try:
        _wait_for_records(tmp_path / "run" / "metrics.jsonl", count=2)
        node0.stop()  # the whole machine: every process of node 0 at once
        gone = time.time()
        seen = node1.first("its process or machine is gone", timeout=60)
        assert node1.proc.wait(timeout=30) == 1
    finally:
        node0.stop()
        node1.stop()
    assert seen - gone < 3 + 5 + 2, seen - gone  # noticed at once, then the grace for shards
    lines = [s for _, s in node1.lines]
    assert not any("Traceback" in s for s in lines), lines
    assert lines[-1].startswith("shoal: error: training failed: the connection to coordinator at")


def _descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [pid], [pid]
    while frontier:
        frontier = [p for p, parent in parents.items() if parent in frontier]
        found += frontier
    return found


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("sig", "recovery"), [("SIGTERM", "restart"), ("SIGUSR1", "restart"), ("SIGUSR1", "inplace")]
)
def test_preempted_by_a_signal_to_every_process_then_resumed_exactly(
    sig, recovery, tmp_path, linear_reference
):
    """The scheduler signals every process (Kubernetes, Spark, Ray: SIGTERM; Slurm's
    --signal: SIGUSR1): all stop after one common step, checkpoint it, exit 143; under
    torchrun's agent or shoal's in-place launcher."""
    out = tmp_path / "run"
    requeued = sig == "SIGUSR1"  # Slurm's requeue runs the same command: --auto-resume
    again = ["--auto-resume"] if requeued else []
    cmd = [*_shoal(out), "--no-report", *LINEAR_JOB, *W2, "--log-every", "10", *again]
    cmd += ["--recovery", recovery]
    job = _Watched(cmd, env={"SHOAL_FAULT": "slow:rank=*:ms=20"})
    try:
        _wait_for_records(out / "metrics.jsonl", count=5)
        # in place: the launcher alone (it passes Slurm's signal on to the workers)
        targets = [job.proc.pid] if recovery == "inplace" else _descendants(job.proc.pid)
        for pid in targets:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, getattr(signal, sig))
        assert job.proc.wait(timeout=60) == 143, "\n".join(s for _, s in job.lines)
    finally:
        job.stop()
    said = "\n".join(s for _, s in job.lines)
    assert f"shoal: preempted ({sig}): every worker stopped after step" in said, said
    (record,) = [json.loads(line) for line in (out / "preempted.jsonl").read_text().splitlines()]
    assert record["signal"] == sig and record["within_grace"], record
    assert 0 < record["step"] < 200 and not (out / "summary.json").exists()
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step-{record['step']:08d}"]
    proc = train(out, *LINEAR_JOB, *W2, *again) if requeued else train(out, "--resume", str(out))
    if requeued:
        assert f"continuing {out} from step {record['step']}" in proc.stderr, proc.stderr
    s = _like_unfailed(out, linear_reference)  # same samples, same parameters
    assert s["resumed_from_step"] == record["step"] and s["preemptions"] == [record]
    assert all(e["exact"] for e in s["epochs"]), s["epochs"]


@pytest.mark.timeout(240)
def test_ctrl_c_stops_at_a_common_step_with_its_checkpoint_and_the_run_resumes_from_it(
    tmp_path,
):
    """Ctrl-C (SIGINT to every process of the terminal's group) at step 700 of a run that
    checkpoints every 500: every worker stops after one agreed step, writes it, and the
    line says how to continue; the resumed run starts there (not at 500) and ends exact."""
    out = tmp_path / "run"
    job = ["--model", "linear", "--steps", "1000", "--batch-size", "32", "--lr", "0.05"]
    job += [*W2, "--checkpoint-every", "500", "--log-every", "10"]
    watched = _Watched([*_shoal(out), "--no-report", *job])
    try:
        _wait_for_step(out / "metrics.jsonl", 700)
        # as a terminal does, the whole group at once: the workers' SIGINT is pending
        # before the launcher can pass anything on (here: the launcher last)
        for pid in reversed(_descendants(watched.proc.pid)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)
        assert watched.proc.wait(timeout=60) == 130, "\n".join(s for _, s in watched.lines)
    finally:
        watched.stop()
    said = "\n".join(s for _, s in watched.lines)
    assert "shoal: interrupted (Ctrl-C): every worker stopped after step" in said, said
    assert f"continue with: shoal train --resume {out}" in said, said
    assert "Traceback" not in said and "KeyboardInterrupt" not in said, said
    (record,) = [json.loads(line) for line in (out / "preempted.jsonl").read_text().splitlines()]
    assert record["signal"] == "SIGINT" and 700 <= record["step"] < 1000, record
    train(out, "--resume", str(out))
    s = read_summary(out)
    assert s["resumed_from_step"] == record["step"] and s["steps"] == 1000
    assert all(e["exact"] for e in s["epochs"]), s["epochs"]
