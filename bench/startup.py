"""Launch to first step: a 2-worker allreduce job, a parameter-server job (1 shard, 2
workers) and the same 2-worker job as a plain torchrun DDP script, alternating.

    python bench/startup.py --reps 5

Each run is a fresh command (a new Python, as a user's). Measured from just before the
command starts to its first step's end: for shoal, the moment the first record appears
in ``metrics.jsonl`` (``--log-every 1``: written by rank 0 after step 1); for plain DDP
(bench/plain_ddp.py), the time its rank 0 writes after its first step. Reported per
kind: median, min and max over the reps, and the command's whole wall time.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
JOB = ["--model", "mlp", "--workers", "2", "--steps", "1", "--log-every", "1"]
KINDS = {
    "allreduce": ["--strategy", "allreduce"],
    "ps": ["--strategy", "ps", "--servers", "1"],
}


def shoal_run(out: Path, extra: list[str]) -> tuple[float, float]:
    cmd = [sys.executable, "-m", "shoal", "train", *JOB, *extra]
    cmd += ["--no-progress", "--no-report", "--out", str(out)]
    records = out / "metrics.jsonl"
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = None
    while proc.poll() is None and first is None:
        if records.exists() and records.read_text().strip():
            first = time.time()
        time.sleep(0.005)
    _, err = proc.communicate(timeout=120)
    if proc.returncode != 0 or not records.exists():
        raise SystemExit(f"shoal train failed: {err.decode()[-2000:]}")
    return (first or time.time()) - start, time.time() - start


def ddp_run(tmp: Path) -> tuple[float, float]:
    stamp = tmp / "stamp"
    stamp.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += [str(REPO / "bench" / "plain_ddp.py"), "--steps", "1", "--window", "1"]
    cmd += ["--out", str(tmp / "ddp.json"), "--stamp", str(stamp)]
    start = time.time()
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    return float(stamp.read_text()) - start, time.time() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in (*KINDS, "plain DDP")}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for i in range(args.reps):
            for kind, extra in KINDS.items():
                results[kind].append(shoal_run(tmp / f"{kind}-{i}", extra))
            results["plain DDP"].append(ddp_run(tmp))
            print(
                f"rep {i + 1}: " + "  ".join(f"{k} {v[-1][0]:.2f} s" for k, v in results.items()),
                flush=True,
            )
    for kind, runs in results.items():
        first = [f for f, _ in runs]
        print(
            f"{kind:>10}: launch to first step median {statistics.median(first):.2f} s "
            f"(min {min(first):.2f}, max {max(first):.2f}); whole command "
            f"{statistics.median(w for _, w in runs):.2f} s"
        )


if __name__ == "__main__":
    main()
