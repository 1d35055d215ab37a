"""Baseline for bench/allreduce_vs_ddp.py: the same job as a textbook DDP script.

    torchrun --standalone --nproc-per-node 2 bench/plain_ddp.py --steps 300 --out times.json

Same model (digits MLP), data order, global batch and optimizer as the shoal
run it is compared with; times windows of ``--window`` steps exactly as shoal's
``step_time_s`` does and writes them as JSON on rank 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--window", type=int, default=10)
    p.add_argument("--out", required=True)
    p.add_argument("--stamp", help="rank 0 writes the time its first step ended here")
    args = p.parse_args()

    local_world = int(os.environ["LOCAL_WORLD_SIZE"])
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_world))
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    layers: list[nn.Module] = []
    width = 64
    for _ in range(args.layers):
        layers += [nn.Linear(width, args.hidden), nn.ReLU()]
        width = args.hidden
    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Sequential(*layers, nn.Linear(width, 10)))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    b, n = args.batch_size, len(x)
    per_epoch = n // b
    times, start = [], time.perf_counter()
    for step in range(args.steps):
        epoch, s = divmod(step, per_epoch)
        perm = np.random.default_rng([0, epoch]).permutation(n)
        idx = torch.from_numpy(
            perm[s * b : (s + 1) * b][rank * b // world : (rank + 1) * b // world]
        )
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step == 0 and args.stamp and rank == 0:
            with open(args.stamp, "w") as fh:
                fh.write(repr(time.time()))
        if (step + 1) % args.window == 0:
            now = time.perf_counter()
            times.append((now - start) / args.window)
            start = now
    if rank == 0:
        with open(args.out, "w") as fh:
            json.dump({"step_time_s": times}, fh)
    # Leave without tearing gloo down: its destructors at exit race with peers closing
    # their connections and sometimes abort ("terminate called without an active
    # exception", exit -6 under torchrun) after the results were written. The barrier
    # keeps every rank here until all are done; nothing after it matters to the bench.
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
