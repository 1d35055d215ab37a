"""Clients that bring their own data: a real federation's clients train on rows the
server never has (``--partition files``, ``shoal federate --data FILE --client K``)."""

from __future__ import annotations

import secrets
import shutil
import subprocess
import sys

import pytest

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

JOB = ["--strategy", "fedavg", "--partition", "files", "--clients", "3", "--model", "linear",
       "--optimizer", "sgd", "--lr", "0.05", "--seed", "3", "--steps", "4", "--local-steps",
       "2", "--batch-size", "16", "--workers", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def files_and_sim(tmp_path_factory):
    """Three clients' files (a linear data set cut in three, of different sizes) and the
    plain simulation of those rows, one client per file."""
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("own")
    data = root / "data"
    made = run_shoal("data", "make", "linear", "--rows", "600", "--test-rows", "300",
                     "--features", "4", "--out", str(data))  # fmt: skip
    assert made.returncode == 0, made.stderr
    (one,) = (data / "train").glob("*.parquet")
    table = pq.read_table(one)
    one.unlink()
    for k, (start, rows) in enumerate(((0, 150), (150, 200), (350, 250))):
        pq.write_table(table.slice(start, rows), data / "train" / f"part-{k:05d}.parquet")
    sim = root / "sim"
    train(sim, *JOB, "--data", f"parquet:{data}")
    return data, sim


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.xdist_group("own-data")  # (both share the files and the simulation)
@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secure-agg"])
def test_clients_with_their_own_files_train_as_the_simulation_of_those_rows(
    tmp_path, files_and_sim, secure
):
    """Three clients, each with one Parquet file of its own on "its machine" (a folder
    made only after the server started, named to no one but that client): the server's
    own --data holds only held-out rows with the same columns. The federation ends at
    the model of the simulation given the same rows (one client per file; with secure
    aggregation, within fixed point), and nothing of the server's run names or
    fingerprints the clients' files."""
    data, sim = files_and_sim
    files = sorted((data / "train").glob("*.parquet"))
    extra = ["--secure-agg"] if secure else []
    fed = tmp_path / "fed"

    server_data = tmp_path / "server"  # the server's own rows: held out, same columns
    shutil.copytree(data / "test", server_data / "train")
    shutil.copytree(data / "test", server_data / "test")
    port, secret = free_port(), secrets.token_hex(32)
    address = f"127.0.0.1:{port}"
    server = start_train(fed, *JOB, *extra, "--data", f"parquet:{server_data}",
                         "--listen", address, "--round-deadline", "60",
                         env={"SHOAL_SECRET": secret})  # fmt: skip
    clients = []
    try:
        for k, f in enumerate(files):
            own = tmp_path / f"client-{k}"  # made now: the server cannot have seen it
            own.mkdir()
            shutil.copy(f, own / f.name)
            clients.append(subprocess.Popen(
                [sys.executable, "-m", "shoal", "federate", "--connect", address, "--data",
                 str(own), "--client", str(k), "--timeout", "60"],
                env=shoal_env({"SHOAL_SECRET": secret}), stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, text=True))  # fmt: skip
        _, err = server.communicate(timeout=180)
        client_errs = [c.communicate(timeout=60)[1] for c in clients]
    finally:
        for p in [server, *clients]:
            p.kill()
    assert server.returncode == 0, err
    for c, e in zip(clients, client_errs):
        assert c.returncode == 0, e
    assert max_abs_diff(params(fed), params(sim)) < (1e-5 if secure else 1e-6)
    summary = read_summary(fed)
    assert summary["federated"]["rounds"] == 4
    assert summary["federated"]["client_updates"] == read_summary(sim)["federated"][
        "client_updates"]  # fmt: skip
    from shoal.data.files import Files

    theirs = [str(tmp_path / f"client-{k}") for k in range(3)]
    theirs += list(Files(data / "train").fingerprint().values())
    for f in fed.rglob("*"):
        if f.is_file() and f.suffix in (".json", ".toml", ".jsonl"):
            text = f.read_text()
            assert not any(t in text for t in theirs), f


@pytest.mark.timeout(60)
def test_own_data_flags_are_refused_where_they_mean_nothing(tmp_path, monkeypatch, capsys):
    """In this process (the same ``main`` the commands run)."""
    from shoal.cli import main

    monkeypatch.setenv("SHOAL_SECRET", "ab" * 16)
    for args, needle in [
        (["--data", str(tmp_path)], "--data and --client go together"),
        (["--client", "1"], "--data and --client go together"),
        (["--data", str(tmp_path), "--client", "0", "--processes", "2"], "--processes 1"),
    ]:
        code = main(["federate", "--connect", "127.0.0.1:1", *args])
        err = capsys.readouterr().err.strip()
        assert code != 0 and len(err.splitlines()) == 1 and needle in err, err
    # a client that never comes would hold a round of its own-data server forever
    code = main(["train", *JOB, "--listen", "127.0.0.1:1", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1, err
    assert "needs --round-deadline" in err and not (tmp_path / "r").exists()
