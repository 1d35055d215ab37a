"""Sparse rows per second through a parameter-server shard vs raw pyzmq.

    python bench/ps_sparse_rows.py --rows-per-request 8192 --dim 16 --reps 5

A worker pulls up to 8192 distinct rows (ids drawn from a power law over a table
of 10M rows, so some are new and get created; about 3,100 distinct ones a
request) and pushes their gradients back (Adagrad applied row-wise on the
server), one table, one shard. The ids go ascending, as a worker sends a batch's
unique ids (``--unsorted`` for a random order, as this bench did before). Baseline: a raw
pyzmq round trip of the same bytes (ids there, ids + rows back). Reported: rows
per second for each, and the ratio shoal / raw, median over reps.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

import numpy as np
import torch
import zmq

from bench.ps_dense_throughput import raw_echo


def ps_server(port_q: mp.Queue) -> None:
    from shoal.config import OptimConfig
    from shoal.strategies.ps.server import Server

    torch.set_num_threads(1)  # as shoal's launcher does for servers (OMP_NUM_THREADS=1)
    server = Server(0, b"b" * 32, OptimConfig(name="adagrad", lr=0.1), "asp", 0)
    port_q.put(f"{server.address}#{server.target}")
    server.serve()


def batches(args: argparse.Namespace, count: int) -> list[torch.Tensor]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        ids = np.unique(np.minimum(rng.zipf(1.3, size=3 * args.rows_per_request), 10**7))
        rows = rng.permutation(ids)[: args.rows_per_request]
        if not args.unsorted:  # as a worker sends them: the batch's unique ids, ascending
            rows = np.sort(rows)
        out.append(torch.from_numpy(rows).long())
    return out


def time_ps(address: str, ids: list[torch.Tensor], dim: int) -> float:
    from shoal.metrics import CommCounter
    from shoal.net import wire
    from shoal.net.peer import Peer

    address, target = address.split("#")
    peer = Peer(zmq.Context.instance(), address, b"b" * 32, "bench", CommCounter(), target=target)
    init = {"op": "init", "parts": 1, "total_steps": 10**9, "tables": []}
    init["tables"] = [{"name": "t", "dim": dim, "init_std": 0.01, "seed": 0}]
    peer.call(init, [wire.strings_tensor([])])
    start = time.perf_counter()
    for step, batch in enumerate(ids):
        _, (rows,) = peer.call(
            {"op": "pull", "step": step, "dense": False, "tables": ["t"]}, [batch]
        )
        push = {"op": "push", "step": step, "part": 0, "read_through": step - 1, "tables": ["t"]}
        peer.call(push, [batch, torch.ones_like(rows)])
    elapsed = time.perf_counter() - start
    peer.call({"op": "shutdown"})
    return elapsed


def time_raw(address: str, ids: list[torch.Tensor], dim: int) -> float:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(address)
    rows = torch.ones(len(ids[0]), dim)
    start = time.perf_counter()
    for batch in ids:  # pull: ids there, rows back; push: ids + rows there, ack back
        sock.send_multipart([b"h", batch.numpy()], copy=False)
        sock.recv_multipart(copy=False)
        sock.send_multipart([b"h", batch.numpy(), rows.numpy()], copy=False)
        sock.recv_multipart(copy=False)
    elapsed = time.perf_counter() - start
    sock.send_multipart([b"stop"])
    return elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows-per-request", type=int, default=8192)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--unsorted", action="store_true", help="ids in random order (before 11-30)")
    args = p.parse_args()
    torch.set_num_threads(1)
    ids = batches(args, args.requests)
    rows = sum(len(b) for b in ids)
    ctx = mp.get_context("spawn")
    ours, raw = [], []
    for _ in range(args.reps):
        for target, timer, sink in ((raw_echo, time_raw, raw), (ps_server, time_ps, ours)):
            q = ctx.Queue()
            proc = ctx.Process(target=target, args=(q,))
            proc.start()
            address = q.get(timeout=60)
            address = address if isinstance(address, str) else f"tcp://127.0.0.1:{address}"
            sink.append(rows / timer(address, ids, args.dim))
            proc.join(timeout=30)
    ratios = [a / b for a, b in zip(ours, raw)]
    print(f"raw pyzmq: median {statistics.median(raw):,.0f} rows/s (pull + push)")
    print(f"shoal ps:  median {statistics.median(ours):,.0f} rows/s (pull + push, Adagrad rows)")
    print(
        f"shoal / raw: median {statistics.median(ratios):.3f} "
        f"(min {min(ratios):.3f}, max {max(ratios):.3f}) over {args.reps} reps"
    )


if __name__ == "__main__":
    main()
