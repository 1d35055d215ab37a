"""Flower's simulation of the federated digits job of bench/fed_vs_flower.py.

Runs in a virtual environment of its own (flwr, torch, numpy): Flower pins its
own Ray. bench/fed_vs_flower.py writes the job (data, client partitions, the
initial model) to an ``.npz`` and reads back a JSON of per-round test accuracy
and wall times::

    python bench/flower_digits.py JOB.npz RESULT.json --rounds 30 --mu 0.01

Flower's ``FedAvg`` / ``FedProx`` (``flwr.serverapp.strategy``) sample
``--fraction`` of the clients each round; each client trains ``--epochs`` passes
of plain SGD over its rows in batches of ``--batch`` (reshuffled each pass),
with FedProx's proximal term ``mu/2 ||w - w_global||^2``, and replies with its
model and row count. The server evaluates the global model on the test set
after each round.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, FedProx
from flwr.simulation import run_simulation

_JOBS: dict[str, dict[str, np.ndarray]] = {}


def job(path: str) -> dict[str, np.ndarray]:
    """The job's arrays, read once per process."""
    if path not in _JOBS:
        with np.load(path) as f:
            _JOBS[path] = {k: f[k] for k in f.files}
    return _JOBS[path]


def net(hidden: int) -> torch.nn.Module:
    """shoal's ``mlp`` with one hidden layer: the same parameters in the same order."""
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, hidden),
                               torch.nn.ReLU(), torch.nn.Linear(hidden, 10))  # fmt: skip


client = ClientApp()


@client.train()
def train(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)
    cfg = msg.content["config"]
    data = job(str(cfg["job"]))
    cid = int(context.node_config["partition-id"])
    rows = data[f"client{cid}"]
    x = torch.from_numpy(data["x_train"][rows])
    y = torch.from_numpy(data["y_train"][rows])
    model = net(int(data["hidden"]))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    start = [p.detach().clone() for p in model.parameters()]
    mu = float(cfg.get("proximal-mu", 0.0))
    opt = torch.optim.SGD(model.parameters(), lr=float(cfg["lr"]))
    gen = torch.Generator().manual_seed(
        int(cfg["seed"]) * 100_003 + int(cfg["server-round"]) * 101 + cid
    )
    batch = int(cfg["batch"])
    for _ in range(int(cfg["epochs"])):
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), batch):
            idx = order[i : i + batch]
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            if mu:
                loss = loss + mu / 2 * sum(
                    (p - s).pow(2).sum() for p, s in zip(model.parameters(), start)
                )
            opt.zero_grad()
            loss.backward()
            opt.step()
    reply = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                        "metrics": MetricRecord({"num-examples": len(y)})})  # fmt: skip
    return Message(content=reply, reply_to=msg)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("job")
    p.add_argument("result")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--fraction", type=float, default=0.25)
    p.add_argument("--mu", type=float, default=0.0)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpus", type=int, default=2, help="Ray's CPUs: one client runs on each")
    args = p.parse_args()
    data = job(args.job)
    clients = int(data["clients"])
    server = ServerApp()

    @server.main()
    def serve(grid: Grid, context: Context) -> None:
        common = {"fraction_train": args.fraction, "fraction_evaluate": 0.0,
                  "min_available_nodes": clients}  # fmt: skip
        strategy = FedProx(**common, proximal_mu=args.mu) if args.mu else FedAvg(**common)
        model = net(int(data["hidden"]))
        model.load_state_dict({k: torch.from_numpy(data[f"init.{k}"]) for k in model.state_dict()})
        xt, yt = torch.from_numpy(data["x_test"]), torch.from_numpy(data["y_test"])
        accuracy: list[float] = []
        stamps: list[float] = []

        def evaluate(rnd: int, arrays: ArrayRecord) -> MetricRecord:
            stamps.append(time.perf_counter())
            model.load_state_dict(arrays.to_torch_state_dict())
            with torch.no_grad():
                acc = float((model(xt).argmax(1) == yt).float().mean())
            accuracy.append(acc)
            return MetricRecord({"accuracy": acc})

        config = ConfigRecord({"job": args.job, "lr": args.lr, "batch": args.batch,
                               "epochs": args.epochs, "seed": args.seed})  # fmt: skip
        strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()),
                       num_rounds=args.rounds, train_config=config,
                       evaluate_fn=evaluate)  # fmt: skip
        rounds = [b - a for a, b in itertools.pairwise(stamps)]
        with open(args.result, "w") as f:
            json.dump({"accuracy": accuracy, "round_s": rounds}, f)

    run_simulation(server_app=server, client_app=client, num_supernodes=clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": args.cpus}})  # fmt: skip


if __name__ == "__main__":
    main()
