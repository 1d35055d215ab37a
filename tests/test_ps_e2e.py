"""End to end: ``shoal train --strategy ps`` with real server and worker processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import zmq

from shoal import procs
from shoal.net import wire
from shoal.strategies.ps import hostile, peers
from tests.conftest import (
    LINEAR_JOB,
    NOISE_FLOOR,
    max_abs_diff,
    params,
    read_summary,
    shoal_env,
    start_train,
    train,
)

pytestmark = pytest.mark.slow  # trains through the launcher: not in the quick tier

LINEAR = LINEAR_JOB
DIGITS = [
    "--model",
    "mlp",
    "--steps",
    "300",
    "--batch-size",
    "64",
    "--optimizer",
    "adam",
    "--lr",
    "0.003",
]
PS = ["--strategy", "ps", "--workers", "2", "--servers", "2"]


@pytest.fixture(scope="module")
def allreduce_linear(linear_reference):
    return linear_reference


@pytest.mark.timeout(300)
def test_bsp_matches_allreduce(allreduce_linear, ps_bsp_linear):
    out = ps_bsp_linear
    assert max_abs_diff(params(out), params(allreduce_linear)) < 1e-5
    s = read_summary(out)
    assert s["ps"]["max_staleness"] == 0 and s["ps"]["num_servers"] == 2
    assert all(w["bytes_sent"] > 0 and w["bytes_received"] > 0 for w in s["per_worker"])
    for server in s["ps"]["servers"]:
        assert server["updates"] == 200 and server["bytes_in"] > 0 and server["apply_s"] > 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(10, 201, 10))


@pytest.mark.timeout(400)
@pytest.mark.parametrize("mode", ["asp", "ssp"])
def test_async_modes_reach_the_bsp_targets(mode, tmp_path, ps_async_linear):
    """The targets: linear test MSE within 2x the noise floor (3 workers, the run the kill
    tests compare with); digits 90% test accuracy (2 workers, staleness 2)."""
    assert read_summary(ps_async_linear(mode))["test_loss"] < 2 * NOISE_FLOOR
    dig = tmp_path / f"ps-{mode}-digits"
    bound = ["--staleness", "2"] if mode == "ssp" else []  # (asp has no bound to give)
    train(dig, *DIGITS, *PS, "--ps-mode", mode, *bound)
    assert read_summary(dig)["test_accuracy"] >= 0.90


@pytest.mark.timeout(300)
def test_bsp_reaches_the_same_targets(tmp_path):
    dig = tmp_path / "ps-bsp-digits"
    train(dig, *DIGITS, *PS, "--ps-mode", "bsp")
    assert read_summary(dig)["test_accuracy"] >= 0.90


@pytest.mark.timeout(300)
def test_ssp_staleness_never_exceeds_bound(tmp_path):
    """A slow worker: the fast one takes more tasks and runs ahead, never more than s steps."""
    out = tmp_path / "ssp"
    train(
        out,
        *LINEAR,
        *PS,
        "--ps-mode",
        "ssp",
        "--staleness",
        "2",
        "--steps",
        "120",
        env={"SHOAL_FAULT": "slow:rank=1:ms=40"},
    )
    summary = read_summary(out)
    ps = summary["ps"]
    assert ps["max_staleness"] <= 2
    assert ps["max_staleness"] >= 1, "the slow worker should have made the fast one run ahead"
    tasks = [w["tasks"] for w in summary["per_worker"]]
    assert sum(tasks) == 2 * 120 and tasks[0] > 2 * tasks[1], tasks  # the fast one took more
    rates = [w["samples_per_s"] for w in summary["per_worker"]]
    assert rates[0] > 2 * rates[1] > 0  # per-worker throughput, in the summary
    assert sum(w["samples"] for w in summary["per_worker"]) == sum(
        summary["samples_per_epoch"].values()
    )
    asp = tmp_path / "asp"
    train(
        asp,
        *LINEAR,
        *PS,
        "--ps-mode",
        "asp",
        "--steps",
        "120",
        env={"SHOAL_FAULT": "slow:rank=1:ms=40"},
    )
    assert read_summary(asp)["ps"]["max_staleness"] > 2  # without the bound it grows


@pytest.mark.timeout(300)
def test_unauthenticated_peers_cannot_grow_memory_or_disturb_training(ps_bsp_linear, tmp_path):
    """A 4 MiB first frame, a multipart message that never ends, 500 open connections and
    10,000 garbage hellos, at a shard and at the coordinator while a bsp job trains: each
    process grows by under 40 MB (measured: 5 to 23 MB; a listener that buffered what a
    stranger sends would grow by hundreds) and the model is bit-identical to the
    undisturbed run."""
    out = tmp_path / "attacked"
    job = start_train(
        out, *LINEAR, *PS, "--ps-mode", "bsp", env={"SHOAL_FAULT": "slow:rank=*:ms=130"}
    )
    try:
        endpoints = out / "ps_endpoints.json"
        deadline = time.monotonic() + 60
        while not endpoints.exists():
            assert time.monotonic() < deadline and job.poll() is None, job.stderr.read()
            time.sleep(0.1)
        where = json.loads(endpoints.read_text())
        shard = procs.role_processes(job.pid, "server")[0]
        targets = [(where["servers"][0], shard), (where["coordinator"], job.pid)]

        def attack(address: str, pid: int) -> tuple[list, float]:
            before = hostile.rss_bytes(pid)
            results = [
                hostile.big_first_frame(address),
                hostile.endless_multipart(address, seconds=2) > 0,
                hostile.open_connections(address, 500, hold_s=1),
                hostile.garbage_hellos(address, 10_000),
            ]
            return results, hostile.rss_bytes(pid) - before

        with ThreadPoolExecutor(2) as pool:  # both at once: the job trains meanwhile
            attacks = [pool.submit(attack, address, pid) for address, pid in targets]
            for (address, _), done in zip(targets, attacks):
                results, grown = done.result()
                assert results[1:] == [True, 500, 10_000], (address, results)
                assert grown < 40e6, f"{address} grew by {grown / 1e6:.1f} MB"
        assert job.poll() is None, "the attack outlived the training: slow it down"
        _, err = job.communicate(timeout=200)
    finally:
        job.kill()
    assert job.returncode == 0, err
    assert max_abs_diff(params(out), params(ps_bsp_linear)) == 0  # training unaffected
    ps = read_summary(out)["ps"]
    refused = ps["servers"][0]["refused_at_door"]
    assert refused["bad-token"] >= 3333 and refused["malformed"] >= 3333, refused
    assert refused["handshake"] > 0, refused  # (some garbage is reset before it is read)
    door = ps["coordinator_refused_at_door"]
    assert door["bad-token"] >= 3333 and door["malformed"] >= 3333, door
    assert ps["servers"][0]["rejected"] == {} and ps["coordinator_rejected"] == {}


@pytest.mark.timeout(60)
def test_a_worker_refuses_a_server_that_does_not_know_the_secret(tmp_path):
    """An impostor that speaks the wire and accepts anyone, but cannot prove the secret:
    the worker says so in one line and exits, having taken nothing from it."""
    ctx = zmq.Context()  # its own context: the impostor's door lets everyone in
    zap = ctx.socket(zmq.REP)
    zap.bind("inproc://zeromq.zap.01")
    fake = ctx.socket(zmq.ROUTER)
    fake.plain_server = True
    fake.zap_domain = b"x"
    port = fake.bind_to_random_port("tcp://127.0.0.1")

    stop = threading.Event()

    def impostor() -> None:
        poller = zmq.Poller()
        poller.register(zap, zmq.POLLIN)
        poller.register(fake, zmq.POLLIN)
        while not stop.is_set():
            ready = dict(poller.poll(100))
            if zap in ready:
                req = zap.recv_multipart()
                zap.send_multipart([b"1.0", req[1], b"200", b"OK", b"anyone", b""])
            if fake in ready:
                peer, *frames = fake.recv_multipart()
                rid = wire.request_id(frames)
                fake.send_multipart(
                    [peer, *wire.encode({"op": "welcome", "proof": "0" * 64, "id": rid})]
                )

    thread = threading.Thread(target=impostor, daemon=True)
    thread.start()
    config = tmp_path / "job.toml"
    config.write_text(
        f'[model]\nname = "linear"\n[data]\nname = "synthetic-linear"\n'
        f'[strategy]\nname = "ps"\n[output]\nout = "{tmp_path}"\n'
    )
    env = shoal_env({wire.SECRET_ENV: "ab" * 32, peers.COORDINATOR_ENV: f"tcp://127.0.0.1:{port}"})
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", SHOAL_ROLE="worker")
    proc = subprocess.run(
        [sys.executable, "-m", "shoal.worker", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not know the job's secret: refusing it" in lines[0], lines
    stop.set()
    thread.join(timeout=5)
    ctx.destroy(0)


@pytest.mark.timeout(300)
def test_hung_worker_is_dropped_by_heartbeat_and_the_job_finishes(tmp_path):
    """Worker 2 SIGSTOPs itself: the coordinator notices the silence, the others finish."""
    out = tmp_path / "asp-hang"
    start = time.monotonic()
    proc = train(
        out,
        *LINEAR,
        "--strategy", "ps", "--workers", "3", "--servers", "1", "--ps-mode", "asp",
        "--heartbeat-timeout", "2",
        env={"SHOAL_FAULT": "hang:rank=2:step=40"},
    )  # fmt: skip
    assert "worker 2 sent no heartbeat" in proc.stderr
    s = read_summary(out)
    assert s["ps"]["failed_workers"] == [2]
    assert s["test_loss"] < 2 * NOISE_FLOOR
    assert time.monotonic() - start < 120


@pytest.mark.timeout(300)
def test_compressed_pushes_send_fewer_bytes_and_still_train(tmp_path):
    """fp16 pushes of the digits MLP: about half the bytes, about the same loss."""
    job = [*DIGITS, *PS, "--steps", "100"]
    train(tmp_path / "full", *job)
    train(tmp_path / "fp16", *job, "--compress", "fp16")
    full, half = read_summary(tmp_path / "full"), read_summary(tmp_path / "fp16")
    ratio = half["bytes_sent_total"] / full["bytes_sent_total"]
    assert 0.45 < ratio < 0.55, ratio  # gradients halve; headers and pull requests do not
    assert half["final_loss"] == pytest.approx(full["final_loss"], rel=0.1)


@pytest.mark.timeout(120)
def test_roles_are_forks_of_the_launcher_not_new_pythons(tmp_path):
    """The parameter server's coordinator runs in the launcher; its roles (shard,
    workers) come from a fork server that is a fork of the launcher taken before the
    coordinator started (the same command line), not a new Python importing torch."""
    from pathlib import Path

    cmd = [sys.executable, "-m", "shoal", "train", "--out", str(tmp_path / "run")]
    cmd += ["--no-progress", "--no-report", *LINEAR, "--strategy", "ps"]
    cmd += ["--workers", "2", "--servers", "1"]
    proc = subprocess.Popen(
        cmd,
        env=shoal_env({"SHOAL_FAULT": "slow:rank=*:ms=20"}),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline, roles = time.monotonic() + 60, []
        while len(roles) < 3 and time.monotonic() < deadline and proc.poll() is None:
            roles = procs.role_processes(proc.pid, "worker") + procs.role_processes(
                proc.pid, "server"
            )
            time.sleep(0.1)
        assert len(roles) == 3, roles
        launcher = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        parents = {
            int(Path(f"/proc/{r}/stat").read_text().rsplit(")", 1)[1].split()[1]) for r in roles
        }
        for parent in parents:  # the fork server
            assert Path(f"/proc/{parent}/cmdline").read_bytes() == launcher
            assert parent in procs.children(proc.pid)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # (the launcher and every role)
        proc.wait(timeout=30)
