"""torchft's fault-tolerant DDP on the job of bench/plain_ddp.py, for comparison.

    pip install -e '.[bench]'        # torchft (torchft-nightly, which installs beside torch 2.13)
    python bench/torchft_ddp.py --workers 4 --steps 300
    python bench/torchft_ddp.py --workers 4 --steps 3000 --kill-every 15

The job is ``shoal train --model mlp --hidden 1024 --layers 2 --optimizer sgd
--lr 0.05 --batch-size 64`` on digits, the model, data and optimizer of
plain_ddp.py; each worker is a replica group of one process under torchft's
Manager and DDP (see ``shoal.cli.bench_torchft``, which ``shoal bench faults
--recovery torchft`` runs too). It prints the median time between two commits of
a replica, the wall time, and with kills the recovery of each and the samples
trained twice or never.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from shoal.cli import bench_torchft
from shoal.cli.bench_faults import resolve_job_args


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--kill-every", type=float, default=0.0, help="mean seconds between kills")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="write the result here as JSON")
    args = p.parse_args()
    job = resolve_job_args(
        ["--model", "mlp", "--hidden", str(args.hidden), "--layers", str(args.layers),
         "--optimizer", "sgd", "--lr", "0.05", "--batch-size", str(args.batch_size),
         "--steps", str(args.steps)],
        args.workers,
    )  # fmt: skip
    where = Path(tempfile.mkdtemp(prefix="torchft-bench-"))
    result = bench_torchft.run(job, args.workers, where, args.kill_every, args.seed)
    print(
        f"torchft ddp: {result['steps']} steps on {args.workers} replicas in "
        f"{result['wall_s']:.1f} s, {result['step_time_s'] * 1000:.2f} ms/step, "
        f"{len(result['kills'])} kills, samples twice {result['samples_twice']}, "
        f"never {result['samples_never']} (records in {where})"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
