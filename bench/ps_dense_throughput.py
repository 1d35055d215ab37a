"""Parameter-server dense push+pull vs a raw pyzmq round trip of the same bytes.

    python bench/ps_dense_throughput.py --mb 100 --reps 7

Both sides run a server in another process on loopback. Raw: a DEALER sends
N MB to a ROUTER that echoes them back (zero-copy both ways). shoal: a worker
pushes N MB of gradients to a shard (asp, server-side SGD applies them) and
pulls N MB of parameters back, through the authenticated wire. Reported: the
throughput ratio shoal / raw (1.0 = as fast as raw ZeroMQ), per rep and median.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

import torch
import zmq


def raw_echo(port_q: mp.Queue) -> None:
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    port_q.put(sock.bind_to_random_port("tcp://127.0.0.1"))
    while True:
        frames = sock.recv_multipart(copy=False)
        if frames[1].bytes == b"stop":
            return
        sock.send_multipart(frames, copy=False)


def ps_server(port_q: mp.Queue, max_bytes: int) -> None:
    from shoal.config import OptimConfig
    from shoal.strategies.ps.server import Server

    server = Server(
        0, b"b" * 32, OptimConfig(name="sgd", lr=1e-9), "asp", 0, max_message_bytes=max_bytes
    )
    port_q.put(f"{server.address}#{server.target}")
    server.serve()


def time_raw(address: str, payload: torch.Tensor, reps: int) -> list[float]:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(address)
    buf = payload.view(torch.uint8).numpy()
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        sock.send_multipart([b"h", buf], copy=False)
        sock.recv_multipart(copy=False)
        out.append(time.perf_counter() - start)
    sock.send_multipart([b"stop"])
    return out


def time_ps(address: str, payload: torch.Tensor, reps: int) -> list[float]:
    from shoal.metrics import CommCounter
    from shoal.net import wire
    from shoal.net.peer import Peer

    address, target = address.split("#")
    peer = Peer(
        zmq.Context.instance(),
        address,
        b"b" * 32,
        "bench",
        CommCounter(),
        max_bytes=2 * payload.nbytes,
        target=target,
    )
    peer.call(
        {"op": "init", "parts": 1, "total_steps": 10**9, "tables": []},
        [payload, wire.strings_tensor(["w@0"])],
    )
    out = []
    for step in range(reps):
        start = time.perf_counter()
        push = peer.send(
            {"op": "push", "step": step, "part": 0, "read_through": step - 1, "tables": []},
            [payload],
        )
        pull = peer.send({"op": "pull", "step": step + 1, "tables": []})
        peer.recv(push)
        _, (values,) = peer.recv(pull)
        assert values.numel() == payload.numel()
        del values  # (as a worker does once it has copied them into its parameters)
        out.append(time.perf_counter() - start)
    peer.call({"op": "shutdown"})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=100)
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args()
    payload = torch.ones(args.mb * 1024 * 1024 // 4)
    ctx = mp.get_context("spawn")
    raw_times, ps_times = [], []
    for _ in range(args.reps):  # alternate, one fresh server of each kind per rep
        for target, extra, timer, sink in (
            (raw_echo, (), time_raw, raw_times),
            (ps_server, (4 * payload.nbytes,), time_ps, ps_times),
        ):
            q = ctx.Queue()
            proc = ctx.Process(target=target, args=(q, *extra))
            proc.start()
            address = q.get(timeout=60)
            address = address if isinstance(address, str) else f"tcp://127.0.0.1:{address}"
            sink.append(min(timer(address, payload, 3)))
            proc.join(timeout=30)
    ratios = [r / s for r, s in zip(raw_times, ps_times)]
    mb = 2 * args.mb  # bytes moved per round trip: there and back
    print(
        f"raw pyzmq round trip of {args.mb} MB: median {statistics.median(raw_times):.3f} s "
        f"({mb / statistics.median(raw_times):.0f} MB/s)"
    )
    print(
        f"shoal push+pull of {args.mb} MB:    median {statistics.median(ps_times):.3f} s "
        f"({mb / statistics.median(ps_times):.0f} MB/s)"
    )
    print(
        f"throughput shoal / raw: median {statistics.median(ratios):.3f} "
        f"(min {min(ratios):.3f}, max {max(ratios):.3f}) over {args.reps} reps"
    )


if __name__ == "__main__":
    main()
