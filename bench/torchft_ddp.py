"""torchft's fault-tolerant DDP on the job of bench/plain_ddp.py, for comparison.

    pip install -e '.[bench]'        # torchft (torchft-nightly, which installs beside torch 2.13)
    python bench/torchft_ddp.py --workers 4 --steps 600 --out times.json
    python bench/torchft_ddp.py --workers 4 --steps 3000 --kill-every 15 --out kills.json

Each worker is a replica group of one process (torchft's unit of failure), with
its own store; a Lighthouse on loopback forms the quorum of every step. The
model, data order, global batch and optimizer are those of plain_ddp.py and of
``shoal train --model mlp``; each step's global batch is cut over the replicas
that take part in it (``participating_rank`` of ``num_participants``), so the
global batch stays the same whatever the quorum.

``--kill-every S`` SIGKILLs a random worker at exponential intervals of mean S
seconds and starts a new one in its place, which heals from a live peer as
torchft does. The driver writes, per worker, the step times and every step it
committed with the sample ids it trained, so that samples trained twice or
never can be counted.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path


def worker(args: argparse.Namespace) -> None:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from torch import nn
    from torch.distributed import TCPStore
    from torchft import Manager, ProcessGroupGloo
    from torchft.ddp import DistributedDataParallel

    torch.set_num_threads(1)
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    layers: list[nn.Module] = []
    width = 64
    for _ in range(args.layers):
        layers += [nn.Linear(width, args.hidden), nn.ReLU()]
        width = args.hidden
    torch.manual_seed(0)
    module = nn.Sequential(*layers, nn.Linear(width, 10))
    inner = torch.optim.SGD(module.parameters(), lr=0.05)

    def state_dict() -> dict:
        return {"model": module.state_dict(), "optim": inner.state_dict()}

    def load_state_dict(sd: dict) -> None:
        module.load_state_dict(sd["model"])
        inner.load_state_dict(sd["optim"])

    manager = Manager(
        pg=ProcessGroupGloo(timeout=timedelta(seconds=args.timeout)),
        min_replica_size=1,
        load_state_dict=load_state_dict,
        state_dict=state_dict,
        replica_id=f"replica{args.replica}",
        rank=0,
        world_size=1,
        store_addr="127.0.0.1",
        store_port=store.port,
        lighthouse_addr=args.lighthouse,
        timeout=timedelta(seconds=args.timeout),
        quorum_timeout=timedelta(seconds=args.timeout),
        init_sync=False,  # every replica starts from the same seed
    )
    model = DistributedDataParallel(manager, module)
    b, n = args.batch_size, len(x)
    per_epoch = n // b
    times, committed, failed = [], [], 0
    start = time.perf_counter()
    done_in_window = 0
    while manager.current_step() < args.steps:
        manager.start_quorum()  # (what torchft's optimizer wrapper does in zero_grad)
        inner.zero_grad(set_to_none=True)
        step = manager.current_step()
        epoch, s = divmod(step, per_epoch)
        perm = np.random.default_rng([0, epoch]).permutation(n)
        batch = perm[s * b : (s + 1) * b]
        manager.wait_quorum()
        rank, size = manager.participating_rank(), manager.num_participants()
        part = batch[rank * b // size : (rank + 1) * b // size] if rank is not None else batch[:0]
        idx = torch.from_numpy(part)
        loss = F.cross_entropy(model(x[idx]), y[idx]) if len(idx) else model(x[:1]).sum() * 0
        loss.backward()
        if manager.should_commit():
            inner.step()
            committed.append([step, part.tolist()])
            done_in_window += 1
            if done_in_window == args.window:
                now = time.perf_counter()
                times.append((now - start) / args.window)
                start, done_in_window = now, 0
        else:
            failed += 1
        if len(committed) % 50 == 0:
            _write(args.out, times, committed, failed)
    _write(args.out, times, committed, failed)
    manager.shutdown(wait=False)


def _write(path: str, times: list, committed: list, failed: int) -> None:
    tmp = f"{path}.tmp"
    Path(tmp).write_text(
        json.dumps({"step_time_s": times, "committed": committed, "failed": failed})
    )
    os.replace(tmp, path)


def drive(args: argparse.Namespace) -> None:
    from torchft._torchft import LighthouseServer

    lighthouse = LighthouseServer(
        bind="[::]:0",
        min_replicas=1,
        join_timeout_ms=args.join_timeout_ms,
        heartbeat_timeout_ms=int(args.heartbeat_timeout * 1000),
    )
    rng = random.Random(args.seed)
    outdir = Path(tempfile.mkdtemp(prefix="torchft-bench-"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHFT_LIGHTHOUSE": lighthouse.address()}

    def start(k: int, incarnation: int) -> subprocess.Popen:
        out = outdir / f"replica{k}-{incarnation}.json"
        cmd = [sys.executable, __file__, "--replica", str(k), "--out", str(out),
               "--lighthouse", lighthouse.address(), "--steps", str(args.steps),
               "--hidden", str(args.hidden), "--layers", str(args.layers),
               "--batch-size", str(args.batch_size), "--timeout", str(args.timeout)]  # fmt: skip
        with open(outdir / f"replica{k}-{incarnation}.log", "w") as log:  # (the child keeps it)
            return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)

    began = time.perf_counter()
    procs = {k: start(k, 0) for k in range(args.workers)}
    incarnations = dict.fromkeys(procs, 0)
    kills = []
    due = began + rng.expovariate(1 / args.kill_every) if args.kill_every else None
    while any(p.poll() is None for p in procs.values()):
        time.sleep(0.05)
        if due is not None and time.perf_counter() >= due:
            k = rng.randrange(args.workers)
            if procs[k].poll() is None:
                procs[k].send_signal(signal.SIGKILL)
                procs[k].wait()
                kills.append({"replica": k, "at_s": time.perf_counter() - began})
                incarnations[k] += 1
                procs[k] = start(k, incarnations[k])
            due = time.perf_counter() + rng.expovariate(1 / args.kill_every)
    wall = time.perf_counter() - began
    lighthouse.shutdown()
    runs = {p.stem: json.loads(p.read_text()) for p in sorted(outdir.glob("replica*.json"))}
    result = {"wall_s": wall, "kills": kills, "workers": args.workers, "runs": runs}
    Path(args.out).write_text(json.dumps(result))
    print(f"torchft ddp: {args.steps} steps on {args.workers} replicas in {wall:.1f} s, "
          f"{len(kills)} kills")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--window", type=int, default=10)
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--heartbeat-timeout", type=float, default=3.0)
    p.add_argument("--join-timeout-ms", type=int, default=100)
    p.add_argument("--kill-every", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--replica", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("--lighthouse", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.replica >= 0:
        worker(args)
    else:
        drive(args)


if __name__ == "__main__":
    main()
