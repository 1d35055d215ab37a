"""Starting a parameter-server job: coordinator thread, server and worker processes."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq
from torch.distributed.elastic.multiprocessing.api import SignalException

from shoal import checkpoint, failure
from shoal.config import JobConfig, parse_endpoint
from shoal.data import build_dataset, build_order
from shoal.data.sampler import GlobalBatchSampler
from shoal.dist import DistEnv, resolve_device
from shoal.errors import UserError
from shoal.launch import LaunchFailed, describe_exit, local_address
from shoal.metrics import CommCounter
from shoal.net import gate, wire
from shoal.net.peer import Peer, PeerError, PeerGone, PeerTimeout
from shoal.roles import Role, RoleGroup, start_fork_server
from shoal.strategies.ps import peers
from shoal.strategies.ps.client import Heartbeat
from shoal.strategies.ps.coordinator import Coordinator
from shoal.strategies.ps.server import Server, coordinator_dir


def job_sampler(job: JobConfig) -> GlobalBatchSampler:
    """The job's sampler as the trainer builds it (for steps, epochs and digests)."""
    data = build_dataset(job.data)
    order = build_order(data, job.data, job.train.seed)
    return GlobalBatchSampler(
        data.num_train, job.train.batch_size, drop_last=job.data.drop_last, order=order
    )


def check_job(job: JobConfig) -> None:
    """What a parameter-server job needs that the generic checks do not cover."""
    if job.output.resume and job.cluster.nnodes == 1:  # (on several: the coordinator checks)
        latest = checkpoint.load_latest(coordinator_dir(job.output.out))
        if latest is not None and int(latest[1]["num_servers"]) != job.cluster.servers:
            raise UserError(
                f"--resume {job.output.out}: the run had {latest[1]['num_servers']} server "
                f"shards and this job has {job.cluster.servers}: resume with the same --servers"
            )
    if job.strategy.options.compress.startswith("powersgd"):
        raise UserError(
            "--compress powersgd needs whole matrices, and the parameter server splits tensors "
            "across shards: use fp16, bf16, topk, qsgd or sign with --strategy ps"
        )
    if resolve_device(job.train.device) != "cpu":
        raise UserError("--strategy ps runs on the CPU for now (--device cpu)")
    secret_hex = wire.secret_hex()
    if job.cluster.nnodes > 1 and not secret_hex:
        raise UserError(
            f"--strategy ps on several machines needs {wire.SECRET_ENV} set to the same "
            "hex string on each (for example: openssl rand -hex 32)"
        )
    if secret_hex:
        try:
            secret = bytes.fromhex(secret_hex)
        except ValueError:
            raise UserError(f"{wire.SECRET_ENV} must be a hex string") from None
        if len(secret) < 16:
            raise UserError(f"{wire.SECRET_ENV} must hold at least 16 bytes (32 hex digits)")


def launch_ps(job: JobConfig, config_path: str) -> None:
    """Run this machine's part of a parameter-server job to completion.

    Node 0 also hosts the coordinator, at ``--rdzv-endpoint`` on several
    machines. Every node registers its ``--workers`` and ``--servers`` with it
    and gets back where its ids start, so machines may differ (servers on one
    host, workers on another). With ``--nnodes MIN:MAX`` the job starts once
    MIN machines registered; up to MAX in all may join later with workers, which
    take tasks from the queue like the others.
    """
    cluster = job.cluster  # (checked as it was resolved: see Plugin.check)
    start_fork_server()  # (before the coordinator's thread and sockets exist)
    multi = cluster.nnodes > 1
    secret = bytes.fromhex(wire.secret_hex() or wire.new_secret())
    if multi:
        host, port = parse_endpoint(cluster.rdzv_endpoint)
        local_host, address = local_address(host, port), f"tcp://{host}:{port}"
    else:
        local_host, address = "127.0.0.1", ""
    coordinator = None
    if cluster.node_rank == 0:
        bind = address or "tcp://127.0.0.1:0"
        starts_with = cluster.min_nodes if cluster.elastic else cluster.nnodes
        sampler = job_sampler(job)
        total_steps = job.train.total_steps(sampler.steps_per_epoch)
        coordinator = Coordinator(
            job, secret, bind, starts_with, total_steps, sampler.steps_per_epoch,
            max_nodes=cluster.nnodes, sampler=sampler,
        )  # fmt: skip
        coordinator.start()
        address = coordinator.address
    ctx = zmq.Context.instance()
    node = Peer(
        ctx,
        address,
        secret,
        f"node{cluster.node_rank}",
        CommCounter(),
        timeout_s=600,
        link_timeout_s=job.strategy.heartbeat_timeout,
    )
    layout, _ = node.call(
        {
            "op": "node",
            "node_rank": cluster.node_rank,
            "workers": cluster.workers,
            "servers": cluster.servers,
        }
    )
    if "refused" in layout:
        node.close()
        raise UserError(str(layout["refused"]))
    base = {
        wire.SECRET_ENV: secret.hex(),
        peers.COORDINATOR_ENV: address,
        peers.HOST_ENV: local_host,
        "LOCAL_WORLD_SIZE": str(cluster.workers + cluster.servers),
        "OMP_NUM_THREADS": "1",
    }
    roles = [Role("server", layout["server_base"] + k, dict(base)) for k in range(cluster.servers)]
    for i in range(cluster.workers):
        w = layout["worker_base"] + i
        env = {
            **base,
            "RANK": str(w),
            "WORLD_SIZE": str(layout["num_workers"]),
            "LOCAL_RANK": str(i),
        }
        roles.append(Role("worker", w, env))
    group = RoleGroup(roles, config_path)
    tending = _Tending(group, node, cluster.node_rank, job.strategy.heartbeat_timeout)
    try:
        _run(group, node, cluster.workers, cluster.max_restarts, coordinator, tending)
    except SignalException:  # Ctrl-C or SIGTERM: stop every local process
        raise KeyboardInterrupt from None
    finally:
        group.close()
        node.close()


class _Tending:
    """This node's view of the job, asked for every half second: which of its processes
    the coordinator dropped (killed here, so that they are replaced), whether the job
    failed elsewhere, and whether the coordinator is still there at all.

    The coordinator is gone when the connection to it ends: its process died (the
    kernel closes it) or its machine stopped answering ZMTP pings for
    ``--heartbeat-timeout`` (libzmq's I/O thread answers those even while the
    coordinator is busy with a long restore, which only delays the answers).
    """

    def __init__(self, group: RoleGroup, node: Peer, node_rank: int, timeout_s: float) -> None:
        self.group, self.node, self.node_rank, self.timeout_s = group, node, node_rank, timeout_s
        self.last_ask = 0.0
        self.answered = time.monotonic()
        self.gone_at: float | None = None
        self.status: dict = {"dropped": [], "dropped_shards": [], "done": False}

    def check(self) -> dict:
        self._kill_stopped()
        now = time.monotonic()
        if now - self.last_ask < 0.5:
            return self.status
        self.last_ask = now
        try:
            self.status, _ = self.node.call(
                {"op": "status", "node": self.node_rank}, timeout_s=self.timeout_s
            )
            self.answered = now
        except PeerGone as e:
            return self._gone(str(e))
        except PeerTimeout:  # busy (a restore, a checkpoint): its answers come later
            if now - self.answered > COORDINATOR_BUSY_S:
                raise LaunchFailed(
                    f"the coordinator at {self.node.address} (node 0) has not answered for "
                    f"{now - self.answered:.0f} s: the job cannot go on"
                ) from None
            return self.status
        if self.status.get("fatal"):
            raise LaunchFailed(str(self.status["fatal"]))
        for rank in self.status["dropped"]:
            self.group.kill("worker", rank)
        for shard in self.status.get("dropped_shards", []):
            self.group.kill("server", shard)
        return self.status

    def _kill_stopped(self) -> None:
        """A process of this machine stopped (SIGSTOP, a debugger) for the heartbeat timeout
        (and half a second, so that the coordinator names one that was beating) is killed,
        so that it is restarted: wherever it was (holding a task, in a pull, in a restore,
        starting up before its first heartbeat), it is named here, in time."""
        for role, pid, seconds in self.group.stopped(self.timeout_s + 0.5):
            name = "server shard" if role.role == "server" else role.role
            print(
                f"shoal: warning: {name} {role.rank} (pid {pid}) has been stopped for "
                f"{seconds:.1f} s (SIGSTOP or a debugger): killing it, to be restarted",
                file=sys.stderr,
                flush=True,
            )
            self.group.kill(role.role, role.rank)

    def settle(self) -> None:
        """This machine's workers have all ended: if the coordinator is gone before the
        job was done, say so now rather than end as if all were well."""
        self.last_ask = 0.0
        self.check()
        if self.gone_at is not None and not self.status.get("done"):
            self.gone_at, self.last_ask = -1e9, 0.0  # (no grace: nothing of ours runs now)
            self.check()

    def _gone(self, why: str) -> dict:
        """The coordinator left. At the end of a job it leaves first, after telling this
        machine's shards to shut down: they get ``--heartbeat-timeout`` plus a margin
        to end by themselves. Whatever still runs then is stopped, and the job failed."""
        self.gone_at = self.gone_at or time.monotonic()
        if time.monotonic() - self.gone_at > self.timeout_s + COORDINATOR_MARGIN_S:
            for role in self.group.roles:
                self.group.kill(role.role, role.rank)
            if self.status.get("done"):
                raise LaunchFailed(f"{why} before it shut this machine's shards down")
            raise LaunchFailed(
                f"{why} (node 0): its process or machine is gone, and the job cannot go on"
            )
        return self.status


COORDINATOR_MARGIN_S = 5.0
"""How long a node waits for its shards' shutdown once the finished job's coordinator left."""
COORDINATOR_BUSY_S = 600.0
"""How long a node waits for a coordinator that is there but does not answer."""


def _run(
    group: RoleGroup,
    node: Peer,
    num_workers: int,
    max_restarts: int,
    coordinator: Coordinator | None,
    tending: _Tending,
) -> None:
    """Until this node's part is done: its workers, then (node 0) the whole job's end."""
    _watch(group, node, num_workers, max_restarts, tending)
    tending.settle()
    if coordinator is not None:
        while not coordinator.all_workers_done():
            if not coordinator.is_alive():
                raise LaunchFailed("the coordinator stopped unexpectedly")
            tending.check()
            _servers_exited(group, node, group.poll(), max_restarts)
            time.sleep(0.1)
        if len(coordinator.members.dead) >= coordinator.num_workers:
            raise LaunchFailed("every worker failed")
        if not coordinator.job_done():
            raise LaunchFailed("the workers stopped before every step was done")
        try:
            coordinator.finish()
        except OSError as e:
            raise LaunchFailed(f"cannot write the final model and summary: {e}") from None
        tending.status["done"] = True
    while group.running:  # this node's servers, until the coordinator shuts them down
        tending.check()
        _servers_exited(group, node, group.poll(), max_restarts)
        time.sleep(0.1)


def _servers_exited(
    group: RoleGroup, node: Peer, exited: list[tuple[Role, int]], max_restarts: int
) -> None:
    """A shard that failed is started again; the coordinator rolls every shard back to
    the newest checkpoint, and the new process restores itself from it."""
    for role, code in exited:
        if role.role != "server" or code == 0:
            continue
        how = describe_exit(code)
        if code == failure.EXIT_RAISED:
            raised, _ = group.raised.take("server")
            how = f"raised {raised.kind}" if raised is not None else how
        restarts = group.restarts.get(group.roles.index(role), 0)
        if restarts >= max_restarts:
            failed = f"server shard {role.rank} {how}, {restarts + 1} times (--max-restarts)"
            with contextlib.suppress(PeerError):  # tell the job, so every node stops
                node.call({"op": "fatal", "error": failed}, timeout_s=5)
            raise LaunchFailed(failed)
        try:
            reply, _ = node.call(
                {"op": "server_died", "shard": role.rank, "code": code}, timeout_s=120
            )
        except PeerError as e:
            failed = f"server shard {role.rank} {how} and cannot be restored: {e}"
            raise LaunchFailed(failed) from None
        print(
            f"shoal: error: server shard {role.rank} {how}; every shard goes back to the "
            f"checkpoint of step {reply['step']} and shard {role.rank} restarts from it "
            f"({restarts + 1} of {max_restarts})",
            file=sys.stderr,
            flush=True,
        )
        group.restart(role, {peers.BIND_ENV: str(reply["address"])})


def _watch(
    group: RoleGroup, node: Peer, num_workers: int, max_restarts: int, tending: _Tending
) -> None:
    """Wait for this node's workers; a dead worker is reported, its tasks go to the
    others, and it is started again (up to ``max_restarts`` times): it rejoins the job
    and pulls the current parameters.

    A worker or shard the coordinator dropped for silence (hung, SIGSTOPped) is killed
    here (:class:`_Tending`), so that the job can go on and end.
    """
    done = clean = 0
    node.timeout_ms = 20_000  # registered: the coordinator answers at once from now on
    while done < num_workers:
        status = tending.check()
        for role, code in group.poll():
            if role.role == "server":
                _servers_exited(group, node, [(role, code)], max_restarts)
                continue
            if code == 0:  # it was told the job is finished
                done += 1
                clean += 1
                continue
            with contextlib.suppress(PeerError):  # (a gone coordinator: tending says so)
                node.call({"op": "worker_died", "worker": role.rank, "code": code}, timeout_s=20)
            restarts = group.restarts.get(group.roles.index(role), 0)
            failed = f"worker {role.rank} failed (exit code {code})"
            if code == failure.EXIT_RAISED:
                raised, why = group.raised.take("worker")
                if raised is not None:
                    failed = raised.headline()
                if why:  # every worker would raise it: the job ends here, in one line
                    failed = f"{failed}; not retried: {why}"
                    with contextlib.suppress(PeerError):
                        node.call({"op": "fatal", "error": failed}, timeout_s=5)
                    raise LaunchFailed(failed)
            if restarts < max_restarts and not status.get("done") and tending.gone_at is None:
                group.restart(role, {})
                again = f"restarting it ({restarts + 1} of {max_restarts})"
                print(f"shoal: warning: {failed}; {again}; the others carry on", file=sys.stderr)
            else:
                done += 1
                print(f"shoal: warning: {failed}; the others carry on", file=sys.stderr)
        time.sleep(0.1)
    if num_workers and clean == num_workers:  # every worker here heard the job finish
        tending.status["done"] = True


def run_in_group(job: JobConfig, group: DistEnv, train: Callable[[], int]) -> int:
    """``--strategy ps`` in a process group another launcher made (torchrun, Ray,
    TorchDistributor): the first ``--servers`` ranks are the server shards, the
    others the workers, and rank 0 also runs the coordinator. Rank 0 hands every
    rank the coordinator's address and the job's secret through the group (the
    launcher's processes trust each other); from then on they talk over shoal's
    wire, and meet in the group once more at the end."""
    import torch.distributed as tdist

    servers, size = job.cluster.servers, group.world_size
    host = _group_host()
    coordinator = node = None
    info: list[Any] = [None]
    if group.rank == 0:
        secret = bytes.fromhex(wire.secret_hex() or wire.new_secret())
        sampler = job_sampler(job)
        total_steps = job.train.total_steps(sampler.steps_per_epoch)
        coordinator = Coordinator(
            job, secret, f"tcp://{host}:0", 1, total_steps, sampler.steps_per_epoch,
            sampler=sampler,
        )  # fmt: skip
        coordinator.start()
        node = Peer(zmq.Context.instance(), coordinator.address, secret, "node0", CommCounter(),
                    timeout_s=600, link_timeout_s=job.strategy.heartbeat_timeout)  # fmt: skip
        node.call({"op": "node", "node_rank": 0, "workers": size - servers, "servers": servers})
        info = [{"address": coordinator.address, "secret": secret.hex()}]
    tdist.broadcast_object_list(info, src=0)
    os.environ.update(
        {
            wire.SECRET_ENV: info[0]["secret"],
            peers.COORDINATOR_ENV: info[0]["address"],
            peers.HOST_ENV: host,
        }
    )
    if group.rank >= servers:  # a worker, numbered among the workers
        worker = group.rank - servers
        os.environ.update({"RANK": str(worker), "WORLD_SIZE": str(size - servers),
                           "LOCAL_RANK": str(max(0, group.local_rank - servers))})  # fmt: skip
        return train()  # (it meets the others in the group at its end)
    os.environ["SHOAL_ROLE_RANK"] = str(group.rank)
    if coordinator is None:
        run_server(job)
    else:  # shard 0 serves in a thread while this one sees the job to its end
        serving = threading.Thread(target=run_server, args=(job, False), name="shoal-ps-shard-0")
        serving.start()
        try:
            _finish_in_group(coordinator)
        finally:
            if node is not None:
                node.close()
        serving.join()
    tdist.barrier()
    tdist.destroy_process_group()
    return 0


def _finish_in_group(coordinator: Coordinator) -> None:
    """Rank 0: wait for every worker to finish, then write the final model and summary."""
    while not coordinator.all_workers_done():
        if not coordinator.is_alive():
            raise LaunchFailed("the coordinator stopped unexpectedly")
        time.sleep(0.1)
    if not coordinator.job_done():
        raise LaunchFailed("the workers stopped before every step was done")
    coordinator.finish()


def _group_host() -> str:
    """This process's address on the route to the group's rank 0 (loopback on one machine)."""
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    if addr in ("localhost", "") or addr.startswith("127."):
        return "127.0.0.1"
    return local_address(addr, int(os.environ.get("MASTER_PORT", "29500")))


def run_server(job: JobConfig, last: bool = True) -> None:
    """Entry of a server process: bind, register with the coordinator, serve. ``last``:
    nothing else in this process talks over ZeroMQ, so its context ends here."""
    secret = wire.load_secret()
    shard = int(os.environ["SHOAL_ROLE_RANK"])
    host = os.environ.get(peers.HOST_ENV, "127.0.0.1")
    server = Server(
        shard,
        secret,
        job.optim,
        job.strategy.options.mode,
        job.strategy.options.staleness,
        # a restarted shard takes its predecessor's address: workers reconnect to it
        bind=os.environ.get(peers.BIND_ENV) or f"tcp://{host}:0",
        max_message_bytes=peers.max_message_bytes(job),
        run_dir=job.output.out,
        keep_checkpoints=job.train.keep_checkpoints,
        max_connections=gate.shard_connections(job),
    )
    peer = Peer(
        zmq.Context.instance(),
        os.environ[peers.COORDINATOR_ENV],
        secret,
        f"server{shard}",
        CommCounter(),
    )
    reply, _ = peer.call(
        {
            "op": "register_server",
            "shard": shard,
            "address": server.address,
            "target": server.target,
        }
    )
    peer.close()
    heartbeat = Heartbeat(
        os.environ[peers.COORDINATOR_ENV],
        secret,
        f"server{shard}-heartbeat",
        {"op": "heartbeat", "shard": shard},
        job.strategy.heartbeat_timeout / 5,
    )
    if "restore" in reply:  # this shard replaces one that died
        server.restore(int(reply["restore"]), int(reply["generation"]), reply["total_steps"])
    server.serve()
    heartbeat.stop()
    if last:
        zmq.Context.instance().term()  # waits (linger) until the last replies have left
