"""Load balancing on uneven workers: time to a target loss, ``--balance auto`` vs ``equal``.

    python bench/balance.py --reps 5 --runs equal,auto

Job: an MLP (2 hidden layers of 512) regressing synthetic-linear data (32768
rows of 64 features), 4 workers, global batch 4096, Adam (lr 0.003), one
metrics record per step. The model and the batch per rank are large enough for
compute, which a cut can move, to outweigh the step's fixed costs (the
optimizer over every parameter, the all-reduce, Python): on the slow machine
those are slow too. Every worker runs under a real CPU quota (cgroups, root),
as if each had a machine of its own. Scenarios, each run alternating:

- ``quota``: 0.45 CPUs for each worker and 0.15 for worker 3: one machine 3x
  slower, 1.5 CPUs in all (the box has 2).
- ``slow``: 0.45 CPUs each, and worker 3 three times slower by the fault
  ``slow:rank=3:factor=3`` (it sleeps twice its own compute; the hand-written
  DDP sleeps twice its estimated compute).
- ``transient``: 0.45 CPUs each; any worker sleeps 20 base steps in a random
  10% of its steps: ``equal`` vs ``auto``, and the spread of the shares over time.

Runs: allreduce with ``--balance equal``, ``auto`` and ``static:3,3,3,1`` (the
speeds known in advance), the parameter server's ``ssp`` (s=3), and a
hand-written DDP loop with a static uneven sampler (weights 3,3,3,1); ``again``
(only when named in ``--runs``) is ``equal`` a second time, whose ratio to the
first is the noise of two runs alike.

Time to target = seconds from the first metrics record (start-up excluded)
until the training loss averaged over the last 5 steps is at most the target
(``--target``: 0.5, about step 45, and 0.1, about step 90, timed in the same runs).
Steady step = the median step time from step 11 on.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.ps_ssp_vs_bsp import time_to  # noqa: E402

WORKERS = 4
JOB = ["--model", "mlp", "--hidden", "512", "--layers", "2", "--data", "synthetic-linear",
       "--num-samples", "32768", "--num-features", "64", "--workers", str(WORKERS),
       "--batch-size", "4096", "--optimizer", "adam", "--lr", "0.003", "--log-every", "1",
       "--no-progress", "--no-report"]  # fmt: skip
EVEN = "cpu:rank=*:cpus=0.45"  # four machines alike
QUOTA = f"{EVEN};cpu:rank=3:cpus=0.15"
AUTO = os.environ.get("BENCH_AUTO", "").split()  # more flags for the auto runs


def shoal(out: Path, steps: int, fault: str, *extra: str) -> list[dict]:
    cmd = [sys.executable, "-m", "shoal", "train", *JOB, "--steps", str(steps), "--out", str(out)]
    env = {**os.environ, "SHOAL_FAULT": fault}
    subprocess.run([*cmd, *extra], check=True, cwd=REPO, capture_output=True, env=env)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def ddp(out: Path, steps: int, *extra: str) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={WORKERS}", str(REPO / "bench" / "plain_ddp_uneven.py"),
           "--steps", str(steps), "--weights", "3,3,3,1", "--hidden", "512", "--out", str(out),
           *extra]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"plain DDP failed:\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def steady_step(records: list[dict]) -> float:
    """The median seconds per step from step 11 on (one record per step)."""
    wall = [r["wall_time"] for r in records if "loss" in r]
    return statistics.median(b - a for a, b in itertools.pairwise(wall[10:]))


RUNS = {
    "equal": lambda out, steps, fault: shoal(out, steps, fault),
    "again": lambda out, steps, fault: shoal(out, steps, fault),  # equal twice: the noise
    "auto": lambda out, steps, fault: shoal(out, steps, fault, "--balance", "auto", *AUTO),
    "static": lambda out, steps, fault: shoal(out, steps, fault, "--balance", "static:3,3,3,1"),
    "ssp": lambda out, steps, fault: shoal(out, steps, fault, "--strategy", "ps", "--servers",
                                          "1", "--ps-mode", "ssp", "--staleness", "3"),
}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--steps", type=int, default=130)
    p.add_argument(
        "--target",
        default="0.5,0.1",
        help="target losses, comma-separated: each is timed in the same runs",
    )
    p.add_argument("--only", default="quota,slow,transient")
    p.add_argument("--runs", default="equal,auto,static,ssp,ddp", help="which runs, of these")
    args = p.parse_args()
    targets = [float(t) for t in args.target.split(",")]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        base = shoal(tmp / "base", 40, EVEN)
        b_ms = max(1, round(1000 * statistics.median(r["step_time_s"] for r in base[10:]
                                                     if "step_time_s" in r)))  # fmt: skip
        print(f"base step time b = {b_ms} ms (equal, 0.45 CPUs each, no fault)", flush=True)
        scenarios = {
            "quota": (QUOTA, ["--cpus", "0.45,0.45,0.45,0.15"]),
            "slow": (f"{EVEN};slow:rank=3:factor=3",
                     ["--cpus", "0.45,0.45,0.45,0.45", "--slow-rank", "3", "--factor", "3"]),
            "transient": (f"{EVEN};slow:rank=*:ms={20 * b_ms}:prob=0.1", None),
        }  # fmt: skip
        for name in args.only.split(","):
            fault, ddp_args = scenarios[name]
            times: dict[tuple[str, float], list[float]] = {}
            steady: dict[str, list[float]] = {}
            stds: list[float] = []
            for i in range(args.reps):
                for kind, run in RUNS.items():
                    if kind not in args.runs.split(",") or (
                        kind not in ("auto", "equal", "again") and ddp_args is None
                    ):
                        continue
                    out = tmp / f"{name}-{kind}-{i}"
                    records = run(out, args.steps, fault)
                    for target in targets:
                        times.setdefault((kind, target), []).append(time_to(records, target))
                    steady.setdefault(kind, []).append(steady_step(records))
                    if kind == "auto":
                        plan = json.loads((out / "summary.json").read_text())["balance"]
                        stds.append(max(plan["share_std"]))
                        shares = " ".join(f"{s:.2f}" for s in plan["shares"])
                        probes = plan.get("probes", {})
                        print(f"  {name} auto rep {i + 1}: shares {shares}, probes kept "
                              f"{probes.get('kept', 0)} of {probes.get('tried', 0)}",
                              flush=True)  # fmt: skip
                if ddp_args is not None and "ddp" in args.runs.split(","):
                    records = ddp(tmp / f"{name}-ddp-{i}.json", args.steps, *ddp_args)
                    for target in targets:
                        times.setdefault(("ddp-static", target), []).append(
                            time_to(records, target)
                        )
                    steady.setdefault("ddp-static", []).append(steady_step(records))
                line = ", ".join(f"{k} {v[-1]:.2f} s" for (k, t), v in times.items()
                                 if t == targets[0])  # fmt: skip
                print(f"{name} rep {i + 1}: time to {targets[0]}: {line}", flush=True)
            for kind in steady:
                steps = [t / e for t, e in zip(steady[kind], steady["equal"])]
                print(f"{name}: {kind} / equal: steady step median "
                      f"{statistics.median(steps):.3f}, "
                      f"{1000 * statistics.median(steady[kind]):.0f} ms", flush=True)  # fmt: skip
                for target in targets:
                    ts = times[kind, target]
                    ratios = [t / e for t, e in zip(ts, times["equal", target])]
                    print(f"{name}: {kind} / equal: time to loss {target} median "
                          f"{statistics.median(ratios):.3f} (min {min(ratios):.3f}, max "
                          f"{max(ratios):.3f}), {statistics.median(ts):.2f} s",
                          flush=True)  # fmt: skip
            if stds:
                print(f"{name}: auto's largest per-rank std of shares over time: median "
                      f"{statistics.median(stds):.3f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
