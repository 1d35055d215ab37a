"""Starting a parameter-server job: coordinator thread, server and worker processes."""

from __future__ import annotations

import os
import sys
import time

from shoal.config import JobConfig
from shoal.data import build_dataset
from shoal.data.sampler import GlobalBatchSampler
from shoal.errors import UserError
from shoal.launch import LaunchFailed, Role, RoleGroup
from shoal.strategies.ps import wire
from shoal.strategies.ps.client import Peer
from shoal.strategies.ps.coordinator import Coordinator
from shoal.strategies.ps.server import Server
from shoal.strategies.ps.strategy import COORDINATOR_ENV, HOST_ENV, max_message_bytes


def _total_steps(job: JobConfig) -> int:
    from shoal.trainer import total_steps  # the trainer's own rule, not a copy

    data = build_dataset(job.data)
    sampler = GlobalBatchSampler(data.num_train, job.train.batch_size, drop_last=job.data.drop_last)
    return total_steps(job, sampler.steps_per_epoch)


def launch_ps(job: JobConfig, config_path: str) -> None:
    """Run a parameter-server job on this machine to completion."""
    cluster = job.cluster
    if cluster.nnodes > 1:
        raise UserError("--strategy ps runs on one machine for now (--nnodes 1)")
    if cluster.servers < 1:
        raise UserError("--strategy ps needs --servers 1 or more")
    if job.output.resume:
        raise UserError("--resume is not supported for --strategy ps yet")
    secret_hex = os.environ.get(wire.SECRET_ENV) or wire.new_secret()
    num_workers, num_servers = cluster.workers, cluster.servers
    coordinator = Coordinator(
        job,
        bytes.fromhex(secret_hex),
        "tcp://127.0.0.1:0",
        num_servers,
        num_workers,
        _total_steps(job),
    )
    coordinator.start()
    base = {
        wire.SECRET_ENV: secret_hex,
        COORDINATOR_ENV: coordinator.address,
        HOST_ENV: "127.0.0.1",
        "LOCAL_WORLD_SIZE": str(num_workers + num_servers),
        "OMP_NUM_THREADS": "1",
    }
    roles = [Role("server", k, dict(base)) for k in range(num_servers)]
    roles += [
        Role(
            "worker",
            w,
            {**base, "RANK": str(w), "WORLD_SIZE": str(num_workers), "LOCAL_RANK": str(w)},
        )
        for w in range(num_workers)
    ]
    group = RoleGroup(roles, config_path)
    try:
        _watch(group, coordinator, num_workers)
        coordinator.finish()
    finally:
        group.close()


def _watch(group: RoleGroup, coordinator: Coordinator, num_workers: int) -> None:
    """Wait for every worker; a dead worker is dropped, a dead server fails the job."""
    finished, failed = 0, []
    while finished + len(failed) < num_workers:
        for role, code in group.poll():
            if role.role == "server":
                raise LaunchFailed(f"server shard {role.rank} exited with code {code}")
            if code == 0:
                finished += 1
            else:
                failed.append(role.rank)
                coordinator.worker_died(role.rank, code)
                print(f"shoal: warning: worker {role.rank} failed (exit code {code}); "
                      "the others carry on", file=sys.stderr)  # fmt: skip
        time.sleep(0.1)
    if not finished:
        raise LaunchFailed("every worker failed")


def run_server(job: JobConfig) -> None:
    """Entry of a server process: bind, register with the coordinator, serve."""
    secret = wire.load_secret()
    shard = int(os.environ["SHOAL_ROLE_RANK"])
    host = os.environ.get(HOST_ENV, "127.0.0.1")
    server = Server(
        shard,
        secret,
        job.optim,
        job.strategy.ps_mode,
        job.strategy.staleness,
        bind=f"tcp://{host}:0",
        max_message_bytes=max_message_bytes(job),
    )
    import zmq

    from shoal.metrics import CommCounter

    peer = Peer(
        zmq.Context.instance(), os.environ[COORDINATOR_ENV], secret, f"server{shard}", CommCounter()
    )
    peer.call({"op": "register_server", "shard": shard, "address": server.address})
    peer.close()
    server.serve()
    zmq.Context.instance().term()  # waits (linger) until the last replies have left
