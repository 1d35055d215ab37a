"""shoal's allreduce strategy vs a plain PyTorch DDP script, same job, one session.

    python bench/allreduce_vs_ddp.py --pairs 5 --steps 300

Runs the two alternately (shoal, DDP, shoal, DDP, ...) so that both see the
same machine state, takes the median step time of each run (first window
dropped as warm-up), and reports the ratio shoal / DDP per pair with median
and spread. The model is the digits MLP with two 1024-wide hidden layers
(1.13M parameters), 2 workers, global batch 64, SGD.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def shoal_run(tmp: Path, i: int, args: argparse.Namespace) -> float:
    out = tmp / f"shoal-{i}"
    cmd = [
        sys.executable,
        "-m",
        "shoal",
        "train",
        "--model",
        "mlp",
        "--hidden",
        str(args.hidden),
        "--layers",
        "2",
        "--workers",
        str(args.workers),
        "--steps",
        str(args.steps),
        "--batch-size",
        "64",
        "--optimizer",
        "sgd",
        "--lr",
        "0.05",
        "--drop-last",
        "--log-every",
        "10",
        "--no-progress",
        "--no-report",
        "--out",
        str(out),
        "--recovery",
        args.recovery,
    ]
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_time_s"] for r in records if "step_time_s" in r]
    return statistics.median(times[1:])


def ddp_run(tmp: Path, i: int, args: argparse.Namespace) -> float:
    out = tmp / f"ddp-{i}.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={args.workers}",
        str(REPO / "bench" / "plain_ddp.py"),
        "--steps",
        str(args.steps),
        "--hidden",
        str(args.hidden),
        "--out",
        str(out),
    ]
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True)
    return statistics.median(json.loads(out.read_text())["step_time_s"][1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument(
        "--recovery", default="restart", choices=("restart", "inplace"), help="shoal's side"
    )
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for i in range(args.pairs):
            ours, base = shoal_run(tmp, i, args), ddp_run(tmp, i, args)
            rows.append((ours, base, ours / base))
            print(
                f"pair {i + 1}: shoal {ours * 1e3:.2f} ms/step  ddp {base * 1e3:.2f} ms/step  "
                f"ratio {ours / base:.3f}",
                flush=True,
            )
    ratios = [r for _, _, r in rows]
    result = {
        "median_ratio": statistics.median(ratios),
        "min_ratio": min(ratios),
        "max_ratio": max(ratios),
        "shoal_ms": statistics.median(r[0] for r in rows) * 1e3,
        "ddp_ms": statistics.median(r[1] for r in rows) * 1e3,
        "pairs": args.pairs,
    }
    print(
        f"shoal/ddp step time: median {result['median_ratio']:.3f} (min {result['min_ratio']:.3f}, "
        f"max {result['max_ratio']:.3f}) over {args.pairs} pairs"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
