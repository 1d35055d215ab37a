"""Click-through training from Parquet on disk, on the parameter server.

    python -m bench.ctr_disk --rows 100000000 --data /tmp/ctr-8g --compression none --steps 15625
    python -m bench.ctr_disk --rows 4000000 --data /tmp/ctr-4m --compare-shuffles

Writes the dataset with ``shoal data make ctr`` unless ``--data`` already holds it,
then trains ``--model ctr`` (logistic regression on a hashed table of
``--table-rows`` rows, Adagrad) with ``--strategy ps`` on ``--workers`` workers and
``--servers`` shards, and reports: the dataset's size, AUC against the
generator's true model, each worker's private memory, the share of the step spent
waiting for data (``t_data``), samples/s and embedding rows/s through the shards.
``--compare-shuffles`` trains twice more, block shuffle on the Parquet files and a
full shuffle on the same rows prepared as Arrow (``shoal data prepare``), and
compares their final training and held-out losses.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq


def shoal(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "shoal", *args], check=True)


def dataset(args: argparse.Namespace) -> Path:
    root = Path(args.data)
    if not (root / "_SUCCESS").exists():
        start = time.perf_counter()
        shoal("data", "make", "ctr", "--rows", str(args.rows), "--out", str(root),
              "--compression", args.compression)  # fmt: skip
        print(f"made in {time.perf_counter() - start:.0f} s")
    return root


def train(args: argparse.Namespace, data: str, out: Path, *more: str) -> dict:
    steps = ["--steps", str(args.steps)] if args.steps else ["--epochs", str(args.epochs)]
    start = time.perf_counter()
    shoal("train", "--model", "ctr", "--strategy", "ps", "--ps-mode", args.mode,
          "--data", f"parquet:{data}", "--workers", str(args.workers), "--servers",
          str(args.servers), "--batch-size", str(args.batch_size), "--optimizer", "adagrad",
          "--lr", str(args.lr), "--table-rows", str(args.table_rows), *steps,
          "--log-every", "50", "--eval-every", "0", "--checkpoint-every", "0",
          "--out", str(out), "--no-progress", "--no-report", *more)  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    summary["elapsed_s"] = time.perf_counter() - start
    return summary


def describe(name: str, s: dict, out: Path) -> None:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in records if "t_data" in r]
    steady = windows[len(windows) // 5 :] or windows  # past the start
    t_data = sum(r["t_data"] for r in steady) / len(steady)
    t_step = sum(r["step_time_s"] for r in steady) / len(steady)
    private = [w["memory"].get("private", 0) / 2**30 for w in s["per_worker"]]
    rows = sum(st.get("rows_pulled", 0) + st.get("rows_pushed", 0) for st in s["ps"]["servers"])
    print(f"{name}: {s['steps']} steps of {s['global_batch_size']}, {s['samples_per_s']:,.0f} "
          f"samples/s, final loss {s['final_loss']:.5f}")  # fmt: skip
    if "auc" in s:
        print(f"  AUC {s['auc']:.4f}, true model {s['true_model_auc']:.4f}, gap "
              f"{s['auc_gap']:.4f}")  # fmt: skip
    print(f"  private memory per worker: {', '.join(f'{p:.2f}' for p in private)} GiB")
    print(f"  t_data {t_data * 1e3:.2f} ms of a {t_step * 1e3:.1f} ms step per worker share "
          f"({t_data / t_step:.1%}); embedding rows through the shards "
          f"{rows / s['wall_time_s']:,.0f}/s; digests exact: "
          f"{all(e['exact'] for e in s['epochs'])}")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=20_000_000)
    p.add_argument("--data", required=True, help="dataset directory (made if missing)")
    p.add_argument("--compression", default="snappy")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--servers", type=int, default=2)
    p.add_argument("--mode", default="asp")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--lr", type=float, default=0.15)
    p.add_argument("--table-rows", type=int, default=2_000_000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--steps", type=int, default=0, help="instead of --epochs")
    p.add_argument("--out", default="runs/bench-ctr-disk")
    p.add_argument("--compare-shuffles", action="store_true")
    args = p.parse_args()
    root = dataset(args)
    files = sorted(root.rglob("*.parquet"))
    size = sum(f.stat().st_size for f in files)
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files if "train" in f.parts)
    print(f"data: {rows:,} training rows, {size / 2**30:.2f} GiB of Parquet in {root}")
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)  # this bench's own output
    s = train(args, str(root), out / "block")
    describe("block shuffle, Parquet", s, out / "block")
    if args.compare_shuffles:
        prepared = root.with_name(root.name + "-arrow")
        if not (prepared / "train").exists():
            shoal("data", "prepare", str(root), "--out", str(prepared))
        full = train(args, str(prepared), out / "full", "--shuffle", "full")
        describe("full shuffle, prepared Arrow", full, out / "full")
        for key, what in (("final_loss", "last window's training loss"),
                          ("test_loss", "held-out loss")):  # fmt: skip
            gap = abs(s[key] - full[key]) / full[key]
            print(f"{what}, block vs full shuffle: {s[key]:.5f} vs {full[key]:.5f}, "
                  f"{gap:.2%} apart")  # fmt: skip


if __name__ == "__main__":
    main()
