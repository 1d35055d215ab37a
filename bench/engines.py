"""Step time and start-up of one job under shoal's launcher, Ray and Spark.

    python bench/engines.py --rounds 3 --steps 400

Runs the same job with ``shoal train`` (its own launcher), ``--engine ray`` (a
Ray instance started for the run, Ray Train's TorchTrainer) and ``--engine
spark`` (a ``local[N]`` SparkSession, TorchDistributor), in turn, ``--rounds``
times (shoal, ray, spark, shoal, ray, spark, ...), so that all see the same
machine state. Step time: the median of the run's logged step times, first
window dropped. Start-up: the command's wall time minus the training loop's
(``summary.json``'s ``wall_time_s``): process and engine start, the job's
checks, and the report. Prints a table of medians and the step-time ratios
against standalone shoal, and writes them as JSON.

The job: the digits MLP with two 512-wide hidden layers, 2 workers, global
batch 128, SGD; set with ``--hidden``, ``--workers``, ``--steps``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENGINES = ("shoal", "ray", "spark")


def run(engine: str, out: Path, args: argparse.Namespace) -> tuple[float, float]:
    """(median step time, start-up seconds) of one run."""
    cmd = [sys.executable, "-m", "shoal", "train", "--model", "mlp", "--hidden", str(args.hidden),
           "--layers", "2", "--workers", str(args.workers), "--steps", str(args.steps),
           "--batch-size", "128", "--optimizer", "sgd", "--lr", "0.05", "--log-every", "20",
           "--no-progress", "--no-report", "--out", str(out), "--engine", engine]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"bench: {engine} run failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_time_s"] for r in records if "step_time_s" in r]
    return statistics.median(times[1:]), wall - summary["wall_time_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--json", default="", help="also write the results here")
    args = p.parse_args()
    engines = args.engines.split(",")
    step: dict[str, list[float]] = {e: [] for e in engines}
    startup: dict[str, list[float]] = {e: [] for e in engines}
    with tempfile.TemporaryDirectory(prefix="shoal-bench-engines-") as tmp:
        for r in range(args.rounds):
            for e in engines:
                s, u = run(e, Path(tmp) / f"{e}-{r}", args)
                step[e].append(s)
                startup[e].append(u)
                print(f"round {r + 1}: {e:6} step {s * 1000:7.2f} ms  start-up {u:5.1f} s",
                      flush=True)  # fmt: skip
    base = statistics.median(step["shoal"]) if "shoal" in step else None
    rows = {}
    print(f"\n{'engine':8}{'step ms':>10}{'/ shoal':>10}{'start-up s':>12}")
    for e in engines:
        med = statistics.median(step[e])
        ratios = [a / b for a, b in zip(step[e], step.get("shoal", step[e]))]  # per round
        rows[e] = {"step_ms": med * 1000, "ratio": statistics.median(ratios),
                   "ratios": ratios, "startup_s": statistics.median(startup[e]),
                   "startups": startup[e]}  # fmt: skip
        ratio = f"{rows[e]['ratio']:.3f}" if base else "-"
        print(f"{e:8}{med * 1000:10.2f}{ratio:>10}{rows[e]['startup_s']:12.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": rows}, indent=1))


if __name__ == "__main__":
    main()
