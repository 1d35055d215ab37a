"""Baseline for bench/balance.py: a hand-written DDP loop with a static uneven sampler.

    PYTHONPATH=. torchrun --standalone --nproc-per-node 4 bench/plain_ddp_uneven.py \\
        --weights 3,3,3,1 --out records.json

What a DDP user writes when they know one machine is slower: each rank takes a
fixed share of every global batch (``--weights``), its loss summed and scaled by
``world / global_batch`` so the averaged gradient is the global mean. The same
data (shoal's synthetic-linear generator: 32768 rows of 64 features), MLP
(two hidden layers of 256), global batch (4096) and Adam as the shoal runs it is
compared with. Slower
machines are emulated as shoal's bench does: ``--cpus`` puts each rank under a
CPU quota (cgroups), ``--slow-rank R --factor F`` makes rank R sleep (F-1) times
its own compute (three times its forward) in each step. Rank 0 writes one
record per step (wall time, global mean loss).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from shoal.config import DataConfig
from shoal.data import build_dataset


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.003)
    p.add_argument("--weights", default="")
    p.add_argument("--cpus", default="", help="CPU quota per rank, comma-separated")
    p.add_argument("--slow-rank", type=int, default=-1)
    p.add_argument("--factor", type=float, default=1.0)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.cpus:
        from shoal.cgroup import limit_cpu, release

        group = limit_cpu(float(args.cpus.split(",")[rank]))
    weights = [float(w) for w in args.weights.split(",")] if args.weights else [1.0] * world
    cuts = np.concatenate([[0], np.cumsum(weights)]) / sum(weights)

    data = build_dataset(DataConfig(name="synthetic-linear", num_samples=32768, num_features=64))
    x, y = data.rows.take(np.arange(data.num_train))
    torch.manual_seed(0)
    h = args.hidden
    net = nn.Sequential(nn.Linear(64, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 1))
    model = DistributedDataParallel(net)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)

    b, n = args.batch_size, len(x)
    per_epoch = n // b
    records, start = [], time.perf_counter()
    for step in range(args.steps):
        epoch, s = divmod(step, per_epoch)
        batch = np.sort(np.random.default_rng([0, epoch]).permutation(n)[s * b : (s + 1) * b])
        lo, hi = round(cuts[rank] * b), round(cuts[rank + 1] * b)
        idx = torch.from_numpy(batch[lo:hi])
        opt.zero_grad(set_to_none=True)
        began = time.perf_counter()
        loss_sum = (model(x[idx]).reshape(-1) - y[idx]).pow(2).sum()
        if rank == args.slow_rank:  # backward takes about twice the forward
            time.sleep((args.factor - 1) * 3 * (time.perf_counter() - began))
        (loss_sum * world / b).backward()
        opt.step()
        total = loss_sum.detach().reshape(1)
        dist.all_reduce(total)
        if rank == 0:
            records.append({"step": step + 1, "loss": float(total) / b,
                            "wall_time": time.perf_counter() - start})  # fmt: skip
    if rank == 0:
        with open(args.out, "w") as fh:
            json.dump(records, fh)
    dist.destroy_process_group()
    if args.cpus:
        release(group)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
