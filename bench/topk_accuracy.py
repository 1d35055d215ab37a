"""Top-k compressed all-reduce against uncompressed: accuracy and bytes on the digits MLP.

    python bench/topk_accuracy.py --seeds 0,1,2 [--lr 0.05] [--compress topk:0.01]

Job: ``shoal train`` defaults (MLP 64-128-128-10 on digits, batch 64), Adam,
2 workers, 6 epochs, per seed once uncompressed and once with ``--compress``,
alternating. Prints each run's test accuracy and bytes sent, then the mean
accuracy of each and the compressed run's bytes as a fraction of uncompressed.
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
OPTIMIZER = "adam"


def run(seed: int, compress: str, lr: float, out: Path) -> dict:
    cmd = [sys.executable, "-m", "shoal", "train", "--workers", "2", "--optimizer", OPTIMIZER,
           "--lr", str(lr), "--epochs", "6", "--seed", str(seed), "--compress", compress,
           "--no-progress", "--no-report", "--no-tensorboard", "--out", str(out)]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True)
    s = json.loads((out / "summary.json").read_text())
    return {"accuracy": s["test_accuracy"], "bytes": sum(w["bytes_sent"] for w in s["per_worker"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    p.add_argument("--lr", type=float, default=0.05, help="Adam's learning rate (shoal's default)")
    p.add_argument("--compress", default="topk:0.01")
    p.add_argument("--optimizer", default="adam")
    args = p.parse_args()
    global OPTIMIZER
    OPTIMIZER = args.optimizer
    runs: dict[str, list[dict]] = {"none": [], args.compress: []}
    with tempfile.TemporaryDirectory() as d:
        for seed in (int(s) for s in args.seeds.split(",")):
            for codec, results in runs.items():
                results.append(run(seed, codec, args.lr, Path(d) / f"{codec}-{seed}"))
            print(f"seed {seed}: " + ", ".join(
                f"{c} acc {r[-1]['accuracy']:.4f} {r[-1]['bytes'] / 1e6:.2f} MB"
                for c, r in runs.items()), flush=True)  # fmt: skip
    base = statistics.mean(r["accuracy"] for r in runs["none"])
    acc = statistics.mean(r["accuracy"] for r in runs[args.compress])
    share = sum(r["bytes"] for r in runs[args.compress]) / sum(r["bytes"] for r in runs["none"])
    print(f"lr {args.lr}: none {base:.4f}, {args.compress} {acc:.4f} "
          f"({100 * (acc - base):+.2f} points), "
          f"bytes {100 * share:.2f}% of uncompressed")  # fmt: skip


if __name__ == "__main__":
    main()
