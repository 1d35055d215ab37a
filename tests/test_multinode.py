"""Two machines made of network namespaces, joined by torchrun's multi-node flags."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests import netns
from tests.conftest import free_port, max_abs_diff, params, shoal_env, train

JOB = [
    "--model",
    "linear",
    "--steps",
    "60",
    "--lr",
    "0.05",
    "--batch-size",
    "64",
    "--seed",
    "5",
    "--no-progress",
    "--no-report",
]


@pytest.mark.netns
@pytest.mark.timeout(300)
def test_two_namespace_hosts_match_single_node(tmp_path):
    single = tmp_path / "single"
    train(single, *JOB, "--workers", "2")
    with netns.hosts() as (a, b):
        port = free_port()
        procs = []
        for rank, host in enumerate((a, b)):
            cmd = [
                *host.prefix(),
                "env",
                f"GLOO_SOCKET_IFNAME={host.ifname}",
                sys.executable,
                "-m",
                "shoal",
                "train",
                *JOB,
                "--workers",
                "1",
                "--nnodes",
                "2",
                "--node-rank",
                str(rank),
                "--rdzv-endpoint",
                f"{a.addr}:{port}",
                "--out",
                str(tmp_path / f"node{rank}"),
            ]
            procs.append(
                subprocess.Popen(
                    cmd, env=shoal_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
                )
            )
        try:
            results = [p.communicate(timeout=200) for p in procs]
        finally:
            for p in procs:
                p.kill()
        for p, (out, err) in zip(procs, results):
            assert p.returncode == 0, f"{out}\n{err}"
    node0 = tmp_path / "node0"
    assert max_abs_diff(params(node0), params(single)) < 1e-5
    assert not (tmp_path / "node1").exists()  # only node 0 owns the run directory
    assert (node0 / "summary.json").read_text().count('"rank"') == 2
