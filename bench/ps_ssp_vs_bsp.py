"""Time to a target loss: parameter server ``ssp`` (s=3) vs ``bsp`` with stragglers.

    python bench/ps_ssp_vs_bsp.py --reps 3

Job: digits MLP, 3 workers, 1 server shard, Adam on the server, global batch
96. First an unslowed ``bsp`` run measures the base step time b. Then, per
scenario, ``bsp`` and ``ssp --staleness 3`` alternate:

- ``persistent``: worker 1 sleeps 2b after every step (3x slower, always);
- ``transient``: every worker sleeps 20b after a random 10% of its steps.

Time to target = wall time from the first metrics record (step 1: start-up
excluded) until the training loss, averaged over the last 5 steps, is at most
``--target``.
Reported: ssp / bsp, median over reps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
JOB = [
    "--model",
    "mlp",
    "--strategy",
    "ps",
    "--workers",
    "3",
    "--servers",
    "1",
    "--steps",
    "400",
    "--batch-size",
    "96",
    "--optimizer",
    "adam",
    "--lr",
    "0.003",
    "--log-every",
    "1",
]


def run(out: Path, mode: str, fault: str) -> list[dict]:
    cmd = [
        sys.executable,
        "-m",
        "shoal",
        "train",
        *JOB,
        "--ps-mode",
        mode,
        "--staleness",
        "3",
        "--no-progress",
        "--no-report",
        "--out",
        str(out),
    ]
    env = {**os.environ, "SHOAL_FAULT": fault}
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, env=env)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def time_to(records: list[dict], target: float, smooth: int = 5) -> float:
    """Seconds from the first record (training under way: startup excluded) until the mean
    training loss of the last ``smooth`` records (one per step) is at most ``target``."""
    steps = [r for r in records if "loss" in r]
    for i in range(smooth - 1, len(steps)):
        if sum(r["loss"] for r in steps[i - smooth + 1 : i + 1]) / smooth <= target:
            return steps[i]["wall_time"] - steps[0]["wall_time"]
    return float("inf")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--target", type=float, default=0.15)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        base = run(tmp / "base", "bsp", "")
        steps = [r for r in base if "step_time_s" in r][1:]
        b_ms = max(1, round(1000 * statistics.median(r["step_time_s"] for r in steps)))
        print(f"base step time b = {b_ms} ms (unslowed bsp)")
        scenarios = {
            "persistent": f"slow:rank=1:ms={2 * b_ms}",
            "transient": f"slow:rank=*:ms={20 * b_ms}:prob=0.1",
        }
        for name, fault in scenarios.items():
            ratios = []
            for i in range(args.reps):
                t_bsp = time_to(run(tmp / f"{name}-bsp-{i}", "bsp", fault), args.target)
                t_ssp = time_to(run(tmp / f"{name}-ssp-{i}", "ssp", fault), args.target)
                ratios.append(t_ssp / t_bsp)
                print(
                    f"{name} rep {i + 1}: bsp {t_bsp:.2f} s, ssp {t_ssp:.2f} s, "
                    f"ratio {t_ssp / t_bsp:.3f}",
                    flush=True,
                )
            print(
                f"{name}: ssp/bsp time to loss {args.target}: "
                f"median {statistics.median(ratios):.3f} "
                f"(min {min(ratios):.3f}, max {max(ratios):.3f})",
                flush=True,
            )


if __name__ == "__main__":
    main()
