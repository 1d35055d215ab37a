"""A plain torchrun training script using shoal's API for data parallelism.

    torchrun --nproc-per-node 2 examples/torchrun_digits.py --steps 300 --out model.pt

Only the lines marked ``# shoal`` differ from a single-process PyTorch loop.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from shoal import api as shoal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch")
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--out", default="", help="where rank 0 saves the final state_dict")
    args = parser.parse_args()

    env = shoal.init()  # shoal
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).to(env.device)
    model = shoal.wrap_model(model, env)  # shoal
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    sampler = shoal.GlobalBatchSampler(  # shoal
        len(x), args.batch_size, env.rank, env.world_size, seed=0, drop_last=True
    )

    for step in range(args.steps):
        idx, global_batch = sampler.next_batch()
        xb, yb = x[idx].to(env.device), y[idx].to(env.device)
        loss = F.cross_entropy(model(xb), yb, reduction="sum") * sampler.loss_scale(global_batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if env.is_main and (step + 1) % 100 == 0:
            print(f"step {step + 1}: loss on rank 0 samples {loss.item():.4f}")

    with torch.no_grad():
        accuracy = (model(x.to(env.device)).argmax(-1).cpu() == y).float().mean().item()
    sent, received = shoal.comm_bytes(model)  # shoal
    if env.is_main:
        print(f"accuracy {accuracy:.4f}  bytes sent {sent:,}  received {received:,}")
        if args.out:
            torch.save(model.module.state_dict(), args.out)
    shoal.shutdown()


if __name__ == "__main__":
    main()
