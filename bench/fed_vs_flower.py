"""Federated digits: shoal's ``--strategy fedavg`` against Flower's simulation, side by side.

    python bench/fed_vs_flower.py --seeds 3

Job: 20 clients holding a Dirichlet(0.5) label-skewed partition of the digits
training rows (shoal's partition, the same for both), 25% of clients (5) per
round, two local epochs of plain SGD (lr 0.1, batch 32) from the global model,
updates weighted by client rows; FedAvg, and FedProx with mu 0.1. The model is
the MLP with one hidden layer of 64, the same initial parameters on both sides.
Both run 2 clients at a time: shoal 2 worker processes, Flower its Ray backend
with 2 CPUs and one per client.

Per seed and algorithm, alternating: test accuracy after ``--rounds`` rounds,
and the median wall time of a round (shoal: between metrics records, one per
round; Flower: between its server-side evaluations, one per round).

Flower pins its own Ray, so it runs in a virtual environment of its own, made
on first use at ``--flower-venv`` (default ``.venv-flower``, ignored by git):
``flwr[simulation]`` of ``--flower-version``, and the torch this one runs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shoal.config import DataConfig, ModelConfig  # noqa: E402
from shoal.data import build_dataset  # noqa: E402
from shoal.data.partition import parse, partition  # noqa: E402
from shoal.models import build_model  # noqa: E402

CLIENTS, PER_ROUND, ALPHA, LR, BATCH, EPOCHS, HIDDEN, MU = 20, 5, 0.5, 0.1, 32, 2, 64, 0.1


def flower_python(venv: Path, version: str) -> Path:
    """The Python of a virtual environment with Flower's simulation, made if missing."""
    python = venv / "bin" / "python"
    if python.exists():
        return python
    print(f"making {venv} with flwr[simulation]=={version} (once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pin = "torch==" + torch.__version__.split("+")[0]
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                           pin, f"flwr[simulation]=={version}", "numpy"],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode:
        raise SystemExit(f"installing Flower failed:\n{done.stderr[-3000:]}")
    return python


def write_job(path: Path, seed: int) -> None:
    """The data, shoal's partition and shoal's initial model for ``seed``, for Flower."""
    data = build_dataset(DataConfig(name="digits"))
    (x, y), (xt, yt) = data.train, data.test
    parts = partition(parse(f"dirichlet:{ALPHA}"), CLIENTS, len(y), y.numpy(), seed)
    torch.manual_seed(seed)  # as shoal's trainer does before it builds the model
    model = build_model(ModelConfig(name="mlp", hidden=HIDDEN, layers=1), data)
    init = {f"init.{k}": v.detach().numpy() for k, v in model.state_dict().items()}
    np.savez(path, x_train=x.numpy(), y_train=y.numpy(), x_test=xt.numpy(), y_test=yt.numpy(),
             clients=CLIENTS, hidden=HIDDEN, **{f"client{c}": p for c, p in enumerate(parts)},
             **init)  # fmt: skip


def shoal(out: Path, seed: int, rounds: int, mu: float) -> dict:
    cmd = [sys.executable, "-m", "shoal", "train", "--strategy", "fedavg", "--data", "digits",
           "--model", "mlp", "--hidden", str(HIDDEN), "--layers", "1", "--workers", "2",
           "--clients", str(CLIENTS), "--clients-per-round", str(PER_ROUND),
           "--local-epochs", str(EPOCHS), "--batch-size", str(BATCH),
           "--partition", f"dirichlet:{ALPHA}", "--optimizer", "sgd", "--lr", str(LR),
           "--prox-mu", str(mu), "--steps", str(rounds), "--seed", str(seed),
           "--log-every", "1", "--no-progress", "--no-report", "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"shoal failed:\n{done.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    wall = [r["wall_time"] for r in records if "loss" in r]
    return {"accuracy": summary["test_accuracy"],
            "round_s": statistics.median(b - a for a, b in itertools.pairwise(wall))}  # fmt: skip


def flower(python: Path, job: Path, out: Path, seed: int, rounds: int, mu: float) -> dict:
    cmd = [str(python), str(REPO / "bench" / "flower_digits.py"), str(job), str(out),
           "--rounds", str(rounds), "--fraction", str(PER_ROUND / CLIENTS), "--mu", str(mu),
           "--lr", str(LR), "--batch", str(BATCH), "--epochs", str(EPOCHS),
           "--seed", str(seed)]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode or not out.exists():
        raise SystemExit(f"Flower failed:\n{done.stderr[-3000:]}")
    result = json.loads(out.read_text())
    return {"accuracy": result["accuracy"][-1], "round_s": statistics.median(result["round_s"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--flower-venv", type=Path, default=REPO / ".venv-flower")
    p.add_argument("--flower-version", default="1.42.0")
    args = p.parse_args()
    python = flower_python(args.flower_venv, args.flower_version)
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for seed in range(args.seeds):
            job = tmp / f"job-{seed}.npz"
            write_job(job, seed)
            for algo, mu in (("FedAvg", 0.0), ("FedProx", MU)):
                got = {
                    "shoal": shoal(tmp / f"shoal-{algo}-{seed}", seed, args.rounds, mu),
                    "flower": flower(python, job, tmp / f"flower-{algo}-{seed}.json", seed,
                                     args.rounds, mu),
                }  # fmt: skip
                for who, r in got.items():
                    runs.setdefault(f"{algo} {who}", []).append(r)
                line = ", ".join(f"{who} acc {r['accuracy']:.4f} round {1000 * r['round_s']:.1f} ms"
                                 for who, r in got.items())  # fmt: skip
                print(f"seed {seed} {algo}: {line}", flush=True)
    for algo in ("FedAvg", "FedProx"):
        ours, theirs = runs[f"{algo} shoal"], runs[f"{algo} flower"]
        acc = [statistics.mean(r["accuracy"] for r in rs) for rs in (ours, theirs)]
        ratio = statistics.median(a["round_s"] / b["round_s"] for a, b in zip(ours, theirs))
        print(f"{algo}: test accuracy after {args.rounds} rounds, mean of {args.seeds} seeds: "
              f"shoal {acc[0]:.4f}, Flower {acc[1]:.4f} ({100 * (acc[0] - acc[1]):+.2f} points); "
              f"round time shoal {1000 * statistics.median(r['round_s'] for r in ours):.1f} ms, "
              f"Flower {1000 * statistics.median(r['round_s'] for r in theirs):.1f} ms, "
              f"shoal / Flower median {ratio:.3f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
