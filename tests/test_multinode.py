"""Two machines made of network namespaces, joined by torchrun's multi-node flags, or
by what Slurm's ``srun`` and Kubeflow's training operator put in the environment."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests import netns
from tests.conftest import free_port, max_abs_diff, params, shared_run, shoal_env, train

pytestmark = pytest.mark.slow  # trains through the launcher: not in the quick tier

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


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The job on one machine with 2 workers."""
    return shared_run(
        tmp_path_factory, "multinode-single", lambda out: train(out, *JOB, "--workers", "2")
    )


def _run_on_hosts(
    commands: list[tuple[netns.Host, list[str]]],
    env: dict[str, str],
    host_env: list[dict[str, str]] | None = None,
) -> list[str]:
    """Run ``shoal ARGS`` on each host at once; their stderr."""
    procs = []
    for i, (host, args) in enumerate(commands):
        own = [f"{k}={v}" for k, v in (host_env[i] if host_env else {}).items()]
        cmd = [
            *host.prefix(),
            "env",
            f"GLOO_SOCKET_IFNAME={host.ifname}",
            *own,
            sys.executable,
            "-m",
            "shoal",
            *args,
        ]
        procs.append(
            subprocess.Popen(
                cmd, env=shoal_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    try:
        results = [p.communicate(timeout=200) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, f"{out}\n{err}"
    return [err for _, err in results]


@pytest.mark.netns
@pytest.mark.timeout(300)
def test_two_namespace_hosts_match_single_node(tmp_path, single):
    with netns.hosts() as (a, b):
        multi = ["--workers", "1", "--nnodes", "2", "--rdzv-endpoint", f"{a.addr}:{free_port()}"]
        _run_on_hosts(
            [
                (
                    host,
                    [
                        "train",
                        *JOB,
                        *multi,
                        "--node-rank",
                        str(rank),
                        "--out",
                        str(tmp_path / f"node{rank}"),
                    ],
                )
                for rank, host in enumerate((a, b))
            ],
            env={},
        )
    node0 = tmp_path / "node0"
    assert max_abs_diff(params(node0), params(single)) < 1e-5
    assert not (tmp_path / "node1").exists()  # only node 0 owns the run directory
    assert (node0 / "summary.json").read_text().count('"rank"') == 2


def _scheduler_env(scheduler: str, rank: int, first: str, port: int) -> dict[str, str]:
    """What ``srun`` (one task per node) or Kubeflow's operator sets on machine ``rank``."""
    if scheduler == "slurm":
        return {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": str(rank),
                "SLURM_NODEID": str(rank), "SLURM_NTASKS": "2", "SLURM_JOB_NUM_NODES": "2",
                "SLURM_JOB_NODELIST": f"{first},10.0.0.9", "MASTER_PORT": str(port)}  # fmt: skip
    return {"PET_NNODES": "2", "PET_NODE_RANK": str(rank), "PET_NPROC_PER_NODE": "1",
            "PET_MASTER_ADDR": first, "PET_MASTER_PORT": str(port)}  # fmt: skip


@pytest.mark.netns
@pytest.mark.timeout(300)
@pytest.mark.parametrize("scheduler", ["slurm", "kubeflow"])
def test_a_schedulers_variables_alone_make_two_hosts_meet(tmp_path, single, scheduler):
    """The same command on both machines, no --nnodes/--node-rank/--rdzv-endpoint."""
    subnet = "10.231.11" if scheduler == "slurm" else "10.231.12"
    with netns.hosts(subnet=subnet) as (a, b):
        port = free_port()
        workers = ["--workers", "1"] if scheduler == "slurm" else []  # (Kubeflow's says 1)
        errs = _run_on_hosts(
            [(h, ["train", *JOB, *workers, "--out", str(tmp_path / f"node{r}")])
             for r, h in enumerate((a, b))],
            env={},
            host_env=[_scheduler_env(scheduler, r, a.addr, port) for r in range(2)],
        )  # fmt: skip
    name = {"slurm": "Slurm", "kubeflow": "Kubeflow"}[scheduler]
    assert f"shoal: {name}: machine 1 of 2, 1 worker, meeting at {a.addr}:{port}" in errs[1]
    node0 = tmp_path / "node0"
    assert max_abs_diff(params(node0), params(single)) < 1e-5
    assert (node0 / "summary.json").read_text().count('"rank"') == 2


@pytest.mark.netns
@pytest.mark.timeout(300)
def test_ps_servers_and_workers_on_different_hosts(tmp_path):
    """Host a: the coordinator and 2 server shards; host b: 2 workers. BSP == one machine."""
    ps = ["--strategy", "ps", "--ps-mode", "bsp"]
    single = tmp_path / "single"
    train(single, *JOB, *ps, "--workers", "2", "--servers", "2")
    with netns.hosts(subnet="10.231.8") as (a, b):
        endpoint = f"{a.addr}:{free_port()}"
        multi = ["--nnodes", "2", "--rdzv-endpoint", endpoint]
        node_a = [
            "--node-rank",
            "0",
            "--servers",
            "2",
            "--workers",
            "0",
            "--out",
            str(tmp_path / "a"),
        ]
        node_b = [
            "--node-rank",
            "1",
            "--servers",
            "0",
            "--workers",
            "2",
            "--out",
            str(tmp_path / "b"),
        ]
        _run_on_hosts(
            [
                (a, ["train", *JOB, *ps, *multi, *node_a]),
                (b, ["train", *JOB, *ps, *multi, *node_b]),
            ],
            env={"SHOAL_PS_SECRET": "ab" * 32},  # (the former name of SHOAL_SECRET: still read)
        )
    out = tmp_path / "a"
    assert max_abs_diff(params(out), params(single)) < 1e-5
    summary = json.loads((out / "summary.json").read_text())
    servers = summary["ps"]["servers"]
    assert len(servers) == 2 and all(s["updates"] == 60 for s in servers)
    assert {w["rank"] for w in summary["per_worker"]} == {0, 1}
    endpoints = json.loads((out / "ps_endpoints.json").read_text())
    assert all(a.addr in s for s in endpoints["servers"])  # the shards listen on host a
