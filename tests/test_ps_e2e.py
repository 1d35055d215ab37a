"""End to end: ``shoal train --strategy ps`` with real server and worker processes."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest
import torch
import zmq

from shoal.strategies.ps import wire
from tests.conftest import (
    LINEAR_JOB,
    NOISE_FLOOR,
    max_abs_diff,
    params,
    read_summary,
    shoal_env,
    train,
)

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


@pytest.fixture(scope="module")
def ps_bsp_linear(session_tmp):
    out = session_tmp / "ps-bsp-linear"
    train(out, *LINEAR, *PS, "--ps-mode", "bsp")
    return out


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
def test_async_modes_reach_the_bsp_targets(mode, session_tmp):
    """The targets: linear test MSE within 2x the noise floor; digits 90% test accuracy."""
    lin = session_tmp / f"ps-{mode}-linear"
    train(lin, *LINEAR, *PS, "--ps-mode", mode, "--staleness", "2")
    assert read_summary(lin)["test_loss"] < 2 * NOISE_FLOOR
    dig = session_tmp / f"ps-{mode}-digits"
    train(dig, *DIGITS, *PS, "--ps-mode", mode, "--staleness", "2")
    assert read_summary(dig)["test_accuracy"] >= 0.90


@pytest.mark.timeout(300)
def test_bsp_reaches_the_same_targets(session_tmp):
    dig = session_tmp / "ps-bsp-digits"
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


def _refused(sock: zmq.Socket, frames: list) -> dict:
    sock.send_multipart(frames)
    assert sock.poll(5000), "the server must answer a refusal"
    header, _ = wire.decode(sock.recv_multipart(), 1 << 20)
    assert header["op"] == "error"
    return header


@pytest.mark.timeout(300)
def test_hostile_messages_are_refused_and_training_is_unaffected(allreduce_linear, tmp_path):
    out = tmp_path / "attacked"
    cmd = [
        sys.executable,
        "-m",
        "shoal",
        "train",
        "--out",
        str(out),
        "--no-progress",
        "--no-report",
        *LINEAR,
        *PS,
        "--ps-mode",
        "bsp",
    ]
    job = subprocess.Popen(
        cmd,
        env=shoal_env({"SHOAL_FAULT": "slow:rank=0:ms=20"}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        endpoints = out / "ps_endpoints.json"
        deadline = time.monotonic() + 60
        while not endpoints.exists():
            assert time.monotonic() < deadline and job.poll() is None, job.stderr.read()
            time.sleep(0.1)
        server = json.loads(endpoints.read_text())["servers"][0]
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(server)
        kinds = [
            _refused(sock, [b"\x00garbage\xff"])["kind"],
            _refused(sock, [b'{"op":"push","id":1,"t":[["float32",[1000]]]}', b"\0" * 12])["kind"],
            _refused(sock, [b'{"op":"push","id":2,"t":[["float32",[99999999999]]]}', b""])["kind"],
            _refused(sock, wire.encode({"op": "pull", "id": 3, "clock": 0, "tables": []}))["kind"],
            _refused(sock, wire.encode({"op": "auth", "id": 4, "mac": "00" * 32}))["kind"],
            _refused(sock, wire.encode({"op": "shutdown", "id": 5}))["kind"],
        ]
        assert kinds == [
            "malformed",
            "truncated",
            "oversized",
            "unauthenticated",
            "unauthenticated",
            "unauthenticated",
        ]
        sock.close()
        host, port = server.removeprefix("tcp://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as raw:  # not even ZMTP
            raw.sendall(b"GET / HTTP/1.0\r\n\r\n" * 100)
        _, err = job.communicate(timeout=200)
    finally:
        job.kill()
    assert job.returncode == 0, err
    assert max_abs_diff(params(out), params(allreduce_linear)) < 1e-5  # training unaffected
    rejected = read_summary(out)["ps"]["servers"][0]["rejected"]
    assert rejected == {"malformed": 1, "truncated": 1, "oversized": 1, "unauthenticated": 3}
    assert torch.isfinite(torch.tensor(read_summary(out)["final_loss"]))


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
