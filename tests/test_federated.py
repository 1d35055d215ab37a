"""Federated learning: partitions, rounds, server optimizers, and FedAvg end to end."""

from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from shoal.config import DataConfig
from shoal.data import build_dataset
from shoal.data import partition as partitions
from shoal.errors import UserError
from shoal.strategies.federated import rounds
from shoal.strategies.federated.server import ServerOptimizer
from tests import netns
from tests.conftest import (
    free_port,
    max_abs_diff,
    params,
    read_summary,
    run_shoal,
    shoal_env,
    start_train,
    train,
)

# --- partitions and rounds -------------------------------------------------------------


def _labels(n: int = 1000, classes: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, classes, n)


def test_iid_partition_covers_every_row_once():
    parts = partitions.partition(partitions.parse("iid"), 7, 1000, None, seed=3)
    rows = np.concatenate(parts)
    assert sorted(rows.tolist()) == list(range(1000))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    again = partitions.partition(partitions.parse("iid"), 7, 1000, None, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = partitions.partition(partitions.parse("iid"), 7, 1000, None, seed=4)
    assert not np.array_equal(parts[0], other[0])


def test_dirichlet_partition_skews_labels_more_as_alpha_shrinks():
    labels = _labels()

    def classes_per_client(alpha: float) -> float:
        spec = partitions.parse(f"dirichlet:{alpha}")
        parts = partitions.partition(spec, 20, len(labels), labels, seed=1)
        assert sorted(np.concatenate(parts).tolist()) == list(range(len(labels)))
        assert min(map(len, parts)) >= partitions.MIN_ROWS
        # classes that hold at least 5% of a client's rows
        return float(np.mean([(np.bincount(labels[p], minlength=10) >= 0.05 * len(p)).sum()
                              for p in parts]))  # fmt: skip

    skewed, mild = classes_per_client(0.1), classes_per_client(100.0)
    assert skewed < 4 < 9 <= mild


def test_shards_partition_gives_each_client_k_labels_at_most():
    labels = np.repeat(np.arange(10), 100)
    parts = partitions.partition(partitions.parse("shards:2"), 50, 1000, labels, seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(1000))
    assert all(len(np.unique(labels[p])) <= 2 for p in parts)


def test_partition_specs_refuse_what_they_cannot_make():
    for bad in ("", "iid:2", "dirichlet", "dirichlet:0", "dirichlet:x", "shards:1.5", "pie"):
        with pytest.raises(UserError):
            partitions.parse(bad)
    with pytest.raises(UserError, match="classification"):
        partitions.partition(partitions.parse("shards:2"), 4, 100, None, seed=0)
    with pytest.raises(UserError, match="more than"):
        partitions.partition(partitions.parse("iid"), 101, 100, None, seed=0)


def test_rounds_deal_the_same_clients_and_batches_to_any_number_of_processes():
    parts = partitions.partition(partitions.parse("iid"), 10, 500, None, seed=0)
    fed = rounds.Federation(parts, per_round=4, batch=16, local_steps=3, local_epochs=0, seed=5)
    for r in range(3):
        one = fed.round(r, 0, 1)
        three = [fed.round(r, k, 3) for k in range(3)]
        assert one.sampled == 4 == sum(len(t.clients) for t in three)
        by_client = {c.client: c for t in three for c in t.clients}
        assert sorted(by_client) == [c.client for c in one.clients]
        for c in one.clients:
            same = by_client[c.client].batches
            assert [b.tolist() for b in c.batches] == [b.tolist() for b in same]
            assert len(c.batches) == 3 and all(len(b) == 16 for b in c.batches)
            assert set(np.concatenate(c.batches)) <= set(parts[c.client].tolist())
    assert fed.round(0, 0, 1).clients != fed.round(1, 0, 1).clients  # drawn anew
    epochs = rounds.local_batches(0, 0, 0, np.arange(50), 16, steps=1, epochs=2)
    assert [len(b) for b in epochs] == [16, 16, 16, 2] * 2
    assert sorted(np.concatenate(epochs[:4]).tolist()) == list(range(50))


def test_server_optimizers_follow_reddi_et_al():
    x0, d = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.1, -0.3, 0.0])
    x = x0.clone()
    ServerOptimizer("avg", 1.0, 0.9, 0.99, 1e-3).step(x, d)
    assert torch.allclose(x, x0 + d)
    for name in ("adam", "yogi", "adagrad"):
        opt, x, want = ServerOptimizer(name, 0.1, 0.9, 0.99, 1e-3), x0.clone(), x0.clone()
        m, v = torch.zeros(3), torch.zeros(3)
        for _ in range(3):
            opt.step(x, d)
            m = 0.9 * m + 0.1 * d
            if name == "adam":
                v = 0.99 * v + 0.01 * d * d
            elif name == "yogi":
                v = v - 0.01 * d * d * torch.sign(v - d * d)
            else:
                v = v + d * d
            want += 0.1 * m / (v.sqrt() + 1e-3)
        assert torch.allclose(x, want), name


# --- end to end -----------------------------------------------------------------------

FED = ["--model", "linear", "--data", "synthetic-linear", "--num-samples", "1000",
       "--optimizer", "sgd", "--lr", "0.05", "--seed", "2", "--steps", "15"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fedavg_one_local_step_of_every_client_equals_allreduce(tmp_path):
    """Every client, one local SGD step on all its rows, iid: each round is one step of
    full-batch gradient descent, which allreduce takes on the same global batch."""
    num_train = build_dataset(DataConfig(name="synthetic-linear", num_samples=1000)).num_train
    ref, fed, fed1 = tmp_path / "allreduce", tmp_path / "fedavg", tmp_path / "fedavg1"
    train(ref, *FED, "--workers", "2", "--batch-size", str(num_train))
    common = [*FED, "--strategy", "fedavg", "--clients", "8", "--local-steps", "1",
              "--batch-size", str(num_train), "--partition", "iid"]  # fmt: skip
    train(fed, *common, "--workers", "3")
    train(fed1, *common, "--workers", "1")
    assert max_abs_diff(params(fed), params(ref)) < 1e-5
    assert max_abs_diff(params(fed1), params(fed)) < 1e-6
    summary = read_summary(fed)["federated"]
    assert summary["rounds"] == 15 and summary["client_updates"] == 15 * 8


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_secure_aggregation_sums_what_plain_does_with_late_clients_dropped(tmp_path):
    """Every client of process 2 (2 of 6) sleeps past the round's deadline: with
    --secure-agg they drop out after sharing their keys, their masks are removed with
    their peers' shares, and the rounds end where the plain sum of the same clients ends."""
    job = [*FED, "--strategy", "fedavg", "--clients", "6", "--local-steps", "1",
           "--batch-size", "32", "--workers", "3", "--round-deadline", "0.2",
           "--steps", "3"]  # fmt: skip
    late = {"SHOAL_FAULT": "slow:rank=2:ms=300"}
    plain, secure = tmp_path / "plain", tmp_path / "secure"
    train(plain, *job, env=late)
    train(secure, *job, "--secure-agg", env=late)
    assert max_abs_diff(params(secure), params(plain)) < 1e-5
    for run in (plain, secure):
        fed = read_summary(run)["federated"]
        assert fed["client_updates"] == 3 * 4 and fed["dropped_late"] == 3 * 2, fed
    assert read_summary(secure)["federated"]["secure_agg"] is True


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_client_level_dp_accounts_with_opacus_and_adds_noise_once(tmp_path):
    from opacus.accountants import RDPAccountant

    # --dp-insecure-seed: the same noise for 1 and 2 processes
    job = [*FED, "--strategy", "fedavg", "--clients", "20", "--clients-per-round", "5",
           "--local-steps", "2", "--batch-size", "16", "--dp-clip", "0.5",
           "--dp-noise", "0.8", "--steps", "12", "--log-every", "4",
           "--dp-insecure-seed"]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    train(one, *job, "--workers", "1")
    train(two, *job, "--workers", "2")
    assert max_abs_diff(params(two), params(one)) < 1e-5
    acct = RDPAccountant()
    for _ in range(12):
        acct.step(noise_multiplier=0.8, sample_rate=5 / 20)
    want = acct.get_epsilon(delta=1e-5)
    dp = read_summary(two)["privacy"]
    assert dp["level"] == "client" and dp["steps"] == 12
    assert abs(dp["epsilon"] - want) / want < 1e-3


@pytest.mark.netns
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_federation_across_two_hosts_trains_as_the_simulation(tmp_path):
    """The server on host 0, two client processes on host 1, over the authenticated
    wire: the model the simulation with the same seeds ends at."""
    job = [*FED, "--strategy", "fedavg", "--clients", "6", "--clients-per-round", "4",
           "--local-steps", "3", "--batch-size", "16", "--prox-mu", "0.01", "--steps", "5",
           "--no-progress", "--no-report"]  # fmt: skip
    sim, fed = tmp_path / "sim", tmp_path / "fed"
    train(sim, *job, "--workers", "1")
    env = shoal_env({"SHOAL_SECRET": secrets.token_hex(32)})
    with netns.hosts(subnet="10.231.11") as (a, b):
        address = f"{a.addr}:7311"
        server = subprocess.Popen(
            [*a.prefix(), sys.executable, "-m", "shoal", "train", *job, "--workers", "1",
             "--listen", address, "--out", str(fed)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        clients = subprocess.Popen(
            [*b.prefix(), sys.executable, "-m", "shoal", "federate", "--connect", address,
             "--processes", "2", "--timeout", "60"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            _, server_err = server.communicate(timeout=200)
            _, client_err = clients.communicate(timeout=60)
        finally:
            server.kill()
            clients.kill()
    assert server.returncode == 0, server_err
    assert clients.returncode == 0, client_err
    assert f"listening on tcp://{address}" in server_err
    assert max_abs_diff(params(fed), params(sim)) < 1e-6
    summary = read_summary(fed)["federated"]
    assert summary["rounds"] == 5 and summary["client_updates"] == 20


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_client_without_the_secret_is_refused(tmp_path):
    port = free_port()
    job = [*FED, "--strategy", "fedavg", "--clients", "2", "--steps", "1", "--batch-size",
           "16", "--workers", "1", "--listen", f"127.0.0.1:{port}",
           "--round-deadline", "3"]  # fmt: skip
    server = start_train(tmp_path / "fed", *job, env={"SHOAL_SECRET": "ab" * 32})
    try:
        bad = run_shoal("federate", "--connect", f"127.0.0.1:{port}", "--timeout", "20",
                        env={"SHOAL_SECRET": "cd" * 32})  # fmt: skip
        assert bad.returncode != 0
        assert "refused this process's credentials" in bad.stderr
        assert "Traceback" not in bad.stderr
        none = run_shoal("federate", "--connect", f"127.0.0.1:{port}", env={"SHOAL_SECRET": ""})
        assert none.returncode == 2 and "SHOAL_SECRET" in none.stderr
    finally:
        server.wait(timeout=60)
    fed = read_summary(tmp_path / "fed")["federated"]
    assert fed["client_updates"] == 0 and fed["dropped_late"] == 2  # nobody came in time
    assert sum(fed["refused"].values()) >= 1, fed  # the wrong secret, counted at the door


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_client_process_that_dies_mid_round_is_covered_without_a_deadline(tmp_path):
    """A peer takes the first client of the first round and vanishes; with no
    --round-deadline the round does not stall: a live process is handed that client
    again, and the federation still ends at the simulation's model."""
    import zmq

    from shoal.metrics import CommCounter
    from shoal.net.peer import Peer, PeerError
    from shoal.strategies.federated.remote import TARGET

    def vanish(address: str, secret: str) -> None:
        peer = Peer(zmq.Context.instance(), f"tcp://{address}", bytes.fromhex(secret),
                    "vanishing", CommCounter(), timeout_s=60, max_bytes=1 << 24,
                    target=TARGET)  # fmt: skip
        for bad in ({"op": "update", "round": 0, "client": [1]},
                    {"op": "answers", "round": "0", "client": 1}):  # fmt: skip
            with pytest.raises(PeerError, match="must be an integer"):
                peer.call(bad)  # answered, counted; the server goes on
        header: dict = {}
        while header.get("op") != "train":
            header, _ = peer.call({"op": "work"})
        peer.close()  # gone, holding client `header["client"]` of round 0

    job = [*FED, "--strategy", "fedavg", "--clients", "4", "--local-steps", "2",
           "--batch-size", "16", "--steps", "3", "--workers", "1"]  # fmt: skip
    summary = _federation_as_simulation(tmp_path, job, processes=1, before=vanish)
    assert summary["re_handed"] == 1 and summary["client_updates"] == 12, summary
    assert summary["refused"]["malformed"] == 2, summary
    assert summary["dropped_late"] == 0


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_secure_aggregation_with_client_processes_ends_as_the_simulation(tmp_path):
    """--secure-agg with --listen: the server gets keys, masked inputs and shares, never
    a change, and unmasks the same fixed-point sum as the simulation's protocol."""
    job = [*FED, "--strategy", "fedavg", "--clients", "6", "--clients-per-round", "4",
           "--local-steps", "2", "--batch-size", "16", "--steps", "3", "--workers", "1",
           "--secure-agg"]  # fmt: skip
    summary = _federation_as_simulation(tmp_path, job, processes=2)
    assert summary["secure_agg"] and summary["client_updates"] == 12, summary
    assert summary["rounds_unmasked_failed"] == 0 and "stale" not in summary["refused"]


def _federation_as_simulation(
    tmp_path: Path, job: list[str], processes: int, before: Callable[[str, str], None] | None = None
) -> dict:
    """Run ``job`` as a simulation, then as a server on loopback with ``shoal federate
    --processes N`` (after ``before(address, secret)``); assert both end at the same
    model. Returns the federation's ``federated`` summary."""
    port, secret = free_port(), secrets.token_hex(32)
    address = f"127.0.0.1:{port}"
    sim, fed = tmp_path / "sim", tmp_path / "fed"
    train(sim, *job)
    server = start_train(fed, *job, "--listen", address, env={"SHOAL_SECRET": secret})
    try:
        if before is not None:
            before(address, secret)
        live = run_shoal("federate", "--connect", address, "--processes", str(processes),
                         "--timeout", "60", env={"SHOAL_SECRET": secret})  # fmt: skip
        assert live.returncode == 0, live.stderr
        _, err = server.communicate(timeout=120)
    finally:
        server.kill()
    assert server.returncode == 0, err
    assert max_abs_diff(params(fed), params(sim)) < 1e-6
    return read_summary(fed)["federated"]
