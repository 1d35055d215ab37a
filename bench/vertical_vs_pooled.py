"""Vertical training against the pooled model: AUC, throughput, bytes, noise's cost.

    PYTHONPATH=. python bench/vertical_vs_pooled.py [--rows 50000] [--steps 1500]
        [--noise 0.1,0.3,1] [--label-dp 1,3] [--hosts]

Job: ``shoal data make clicks --overlap 0.8`` (a user party and an item party that
also holds the clicks), the built-in two-tower recommender (towers of 64 hidden units
to 16, dot product on top), Adam lr 0.01, batch 256. The pooled run is the same model
from the same initial weights trained by one process on the joined table of the
common ids, in the same batches (:mod:`shoal.strategies.vertical.pooled`); the
vertical runs are ``shoal train --strategy vertical`` with both parties on this
machine (staleness 0 and 1), then, with ``--hosts``, each party on its own network
namespace (``--party``, 1 Gbit/s links), then with noise on what crosses and with
label DP. Throughput: samples over the seconds spent in training steps (evaluation,
checkpoints and the alignment left out; the summary's ``train_samples_per_s``). Time
to target: training seconds until the held-out AUC first reaches the pooled run's
final AUC less 0.005 (vertical: from the end of the alignment, evaluations included;
the alignment's seconds are their own column).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from shoal.data.make import make
from shoal.strategies.vertical.pooled import train_pooled

REPO = Path(__file__).resolve().parents[1]
BATCH, LR, SEED = 256, 0.01, 0


def vertical(
    data: Path, out: Path, steps: int, every: int, *more: str,
    prefix: tuple[str, ...] = (), env: dict | None = None,
) -> subprocess.Popen:  # fmt: skip
    cmd = [*prefix, sys.executable, "-m", "shoal", "train", "--strategy", "vertical",
           "--parties", f"user={data / 'user'},item={data / 'item'}", "--steps", str(steps),
           "--batch-size", str(BATCH), "--lr", str(LR), "--seed", str(SEED), "--eval-every",
           str(every), "--log-every", "50", "--no-progress", "--no-report", "--out", str(out),
           *more]  # fmt: skip
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def finished(proc: subprocess.Popen, out: Path) -> dict[str, Any]:
    _, err = proc.communicate(timeout=1200)
    if proc.returncode != 0:
        raise SystemExit(f"vertical run failed:\n{err[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    v = summary["vertical"]
    evals = [{"step": r["step"], "wall": r["wall_time"] - v["train_started_s"], **r["eval"]}
             for r in records if "eval" in r]  # fmt: skip
    return {"auc": summary["auc"], "wall_s": summary["wall_time_s"], "evals": evals,
            "samples_per_s": v["train_samples_per_s"], "align_s": v["align_s"],
            "start_s": v["train_started_s"], "bytes_per_step": v["bytes_per_step"]}  # fmt: skip


def to_target(evals: list[dict], target: float, clock: str) -> float | None:
    return next((e[clock] for e in evals if e["auc"] >= target), None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=50_000)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--noise", default="0.1,0.3,1", help="--vertical-noise levels to price")
    p.add_argument("--label-dp", default="1,3", help="--label-dp epsilons to price")
    p.add_argument("--hosts", action="store_true", help="also one party per network namespace")
    args = p.parse_args()
    every = max(1, args.steps // 15)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "clicks"
        make("clicks", args.rows, data, options={"overlap": 0.8})
        parties = {"user": str(data / "user"), "item": str(data / "item")}
        ref = train_pooled(parties, "item", "click", "two-tower", steps=args.steps, batch=BATCH,
                           seed=SEED, lr=LR, eval_every=every)  # fmt: skip
        pooled = {"auc": ref.evals[-1]["auc"], "samples_per_s": ref.samples / ref.train_s,
                  "evals": [{**e, "wall": e["train_s"]} for e in ref.evals]}  # fmt: skip
        results["pooled"] = pooled
        target = pooled["auc"] - 0.005
        runs: list[tuple[str, tuple[str, ...]]] = [
            ("vertical", ()),
            ("vertical staleness 1", ("--staleness", "1")),
        ]
        runs += [(f"noise {s}", ("--vertical-noise", s)) for s in args.noise.split(",") if s]
        runs += [(f"label DP eps {e}", ("--label-dp", e)) for e in args.label_dp.split(",") if e]
        for i, (name, more) in enumerate(runs):
            out = Path(tmp) / f"run{i}"
            results[name] = finished(vertical(data, out, args.steps, every, *more), out)
        if args.hosts:
            sys.path.insert(0, str(REPO))
            from shoal import netns

            env = {**os.environ, "SHOAL_SECRET": "cd" * 32}
            with netns.hosts(2, rate="1gbit", subnet="10.231.17") as (a, b):
                address = ("--label-address", f"{a.addr}:7317")
                outs = Path(tmp) / "item", Path(tmp) / "user"
                # each "host" one core of this machine's two (taskset), as the one-host
                # run's parties have one each
                label = vertical(data, outs[0], args.steps, every, "--party", "item", *address,
                                 prefix=(*a.prefix(), "taskset", "-c", "0"), env=env)  # fmt: skip
                user = vertical(data, outs[1], args.steps, every, "--party", "user", *address,
                                prefix=(*b.prefix(), "taskset", "-c", "1"), env=env)  # fmt: skip
                results["vertical, 2 hosts at 1 Gbit/s"] = finished(label, outs[0])
                user.communicate(timeout=60)
    print(f"{'run':32} {'AUC':>7} {'vs pooled':>9} {'samples/s':>10} {'ratio':>6} "
          f"{'KB/step':>8} {'align s':>8} {'to target s':>11}")  # fmt: skip
    for name, r in results.items():
        hit = to_target(r["evals"], target, "wall")
        print(f"{name:32} {r['auc']:7.4f} {r['auc'] - pooled['auc']:+9.4f} "
              f"{r['samples_per_s']:10,.0f} {r['samples_per_s'] / pooled['samples_per_s']:6.2f} "
              f"{r.get('bytes_per_step', 0) / 1000:8.1f} {r.get('align_s', 0):8.1f} "
              f"{'never' if hit is None else f'{hit:.1f}':>11}")  # fmt: skip
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "evals"}
                      for k, v in results.items()}))  # fmt: skip


if __name__ == "__main__":
    main()
