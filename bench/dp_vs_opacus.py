"""DP-SGD: shoal's allreduce under --dp-epsilon against the same job run with Opacus alone.

    python bench/dp_vs_opacus.py --seeds 3

Job: the digits MLP (one hidden layer of 128), SGD (lr 0.5), expected batch 64,
Poisson sampling, clip 1.0, 20 epochs, noise found for epsilon 3 at delta 1e-5.
Opacus alone is its tutorial loop: ``PrivacyEngine.make_private_with_epsilon``
on a DataLoader with Poisson sampling, RDP accounting. shoal runs the same job
through ``shoal train`` with 1 worker (and with 2). Per seed, alternating:
test accuracy, epsilon spent, and training throughput (samples per second of
the training loop, start-up excluded: shoal's from its summary).
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
sys.path.insert(0, str(REPO))

EPOCHS, BATCH, LR, CLIP, EPS, DELTA, HIDDEN = 20, 64, 0.5, 1.0, 3.0, 1e-5, 128


def opacus_alone(seed: int) -> dict:
    import torch
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    from shoal.config import DataConfig, ModelConfig
    from shoal.data import build_dataset
    from shoal.models import build_model

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    data = build_dataset(DataConfig(name="digits"))
    model = build_model(ModelConfig(name="mlp", hidden=HIDDEN, layers=1), data)
    x, y = data.train
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH)
    engine = PrivacyEngine(accountant="rdp")
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        data_loader=loader, target_epsilon=EPS, target_delta=DELTA, epochs=EPOCHS,
        max_grad_norm=CLIP, poisson_sampling=True,
    )  # fmt: skip
    samples, start = 0, time.perf_counter()
    for _ in range(EPOCHS):
        for xb, yb in loader:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
            optimizer.step()
            samples += len(yb)
    seconds = time.perf_counter() - start
    xt, yt = data.test
    with torch.no_grad():
        accuracy = float((model(xt).argmax(1) == yt).float().mean())
    return {"accuracy": accuracy, "epsilon": engine.get_epsilon(DELTA),
            "samples_per_s": samples / seconds}  # fmt: skip


def shoal(seed: int, workers: int, out: Path) -> dict:
    from shoal.config import DataConfig
    from shoal.data import build_dataset

    steps = EPOCHS * round(build_dataset(DataConfig(name="digits")).num_train / BATCH)
    cmd = [sys.executable, "-m", "shoal", "train", "--model", "mlp", "--hidden", str(HIDDEN),
           "--layers", "1", "--data", "digits", "--optimizer", "sgd", "--lr", str(LR),
           "--batch-size", str(BATCH), "--steps", str(steps), "--dp-clip", str(CLIP),
           "--dp-epsilon", str(EPS), "--dp-delta", str(DELTA), "--seed", str(seed),
           "--workers", str(workers), "--log-every", "50", "--no-progress", "--no-report",
           "--out", str(out)]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True)
    s = json.loads((out / "summary.json").read_text())
    return {"accuracy": s["test_accuracy"], "epsilon": s["privacy"]["epsilon"],
            "samples_per_s": s["samples_per_s"]}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    args = p.parse_args()
    results: dict[str, list[dict]] = {"opacus": [], "shoal x1": [], "shoal x2": []}
    with tempfile.TemporaryDirectory() as d:
        for seed in range(args.seeds):
            results["opacus"].append(opacus_alone(seed))
            results["shoal x1"].append(shoal(seed, 1, Path(d) / f"x1-{seed}"))
            results["shoal x2"].append(shoal(seed, 2, Path(d) / f"x2-{seed}"))
            line = ", ".join(
                f"{k}: acc {v[-1]['accuracy']:.4f} eps {v[-1]['epsilon']:.3f} "
                f"{v[-1]['samples_per_s']:,.0f}/s"
                for k, v in results.items()
            )
            print(f"seed {seed}: {line}", flush=True)
    base = results["opacus"]
    for name, runs in results.items():
        acc = statistics.mean(r["accuracy"] for r in runs)
        ratio = statistics.median(r["samples_per_s"] / b["samples_per_s"]
                                  for r, b in zip(runs, base))  # fmt: skip
        print(f"{name}: mean test accuracy {acc:.4f} "
              f"({100 * (acc - statistics.mean(b['accuracy'] for b in base)):+.2f} points), "
              f"epsilon {statistics.mean(r['epsilon'] for r in runs):.3f}, "
              f"throughput / opacus median {ratio:.2f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
