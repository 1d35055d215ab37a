"""Shared helpers: run the shoal command as a user would, read what it wrote."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from safetensors.torch import load_file

from tests import forkserve

FRESH = os.environ.get("SHOAL_TEST_FRESH") == "1"
"""Start every ``shoal`` command as a new Python (as a user's shell does) instead of
forking it from the test worker's fork server: slower, for when the two differ."""
REPO = Path(__file__).resolve().parents[1]
LINEAR_JOB = ["--model", "linear", "--steps", "200", "--batch-size", "64", "--lr", "0.05"]
LINEAR_JOB += ["--seed", "2"]
"""Linear regression on synthetic data: 200 steps of the global batch 64."""
NOISE_FLOOR = 0.1**2
"""synthetic-linear's label noise variance: a fitted model's test MSE is near it."""


def shoal_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("SHOAL_FAULT", None)
    env.update(extra or {})
    return env


def tables(*flags: str) -> dict[str, dict]:
    """The TOML tables of a job written as ``shoal train`` flags (for the Python API)."""
    from shoal.cli import build_parser

    args = build_parser(["train", *flags]).parse_args(["train", *flags])
    given = {k: v for k, v in vars(args).items() if "." in k}
    strategy = given.get("strategy.name", "allreduce")
    out: dict[str, dict] = {}
    for dest, value in given.items():
        section, _, key = dest.partition(".")
        if section == "option":
            out.setdefault("strategy", {}).setdefault(strategy, {})[key] = value
        elif dest == "cluster.nnodes":
            out.setdefault("cluster", {}).update(min_nodes=value[0], nnodes=value[1])
        else:
            out.setdefault(section, {})[key] = value
    return out


def no_argparse(monkeypatch: pytest.MonkeyPatch) -> None:
    """From here on, in this process, any use of an argument parser fails: what runs after
    takes the job as it is (in shoal.run.engines, nothing writes it to a file either)."""
    import argparse

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("an argument parser was used")

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", refuse)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", refuse)


def run_shoal(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 240
) -> subprocess.CompletedProcess:
    """Run ``python -m shoal ARGS`` and return the finished process (output captured):
    forked from this test worker's fork server (:mod:`tests.forkserve`), or started
    afresh with ``SHOAL_TEST_FRESH=1``."""
    if FRESH:
        return subprocess.run(
            [sys.executable, "-m", "shoal", *args],
            cwd=cwd,
            env=shoal_env(env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    return forkserve.run(list(args), shoal_env(env), cwd, timeout)


def train(
    out: Path, *args: str, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    """``shoal train --out OUT ARGS --no-progress --no-report``; assert success if ``check``."""
    proc = run_shoal("train", "--out", str(out), "--no-progress", "--no-report", *args, env=env)
    if check:
        assert proc.returncode == 0, f"shoal train failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def start_train(out: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``shoal train --out OUT ARGS --no-progress --no-report`` started, not awaited
    (stderr piped, as text)."""
    argv = ["train", "--out", str(out), "--no-progress", "--no-report", *args]
    if FRESH:
        return subprocess.Popen(
            [sys.executable, "-m", "shoal", *argv],
            env=shoal_env(env),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
    return forkserve.start(argv, shoal_env(env), stderr=subprocess.PIPE)  # type: ignore[return-value]


def read_summary(run_dir: Path) -> dict:
    """The ``summary.json`` a run wrote."""
    return json.loads((run_dir / "summary.json").read_text())


def params(run_dir: Path) -> dict[str, torch.Tensor]:
    """The final model a run wrote."""
    return load_file(str(run_dir / "model.safetensors"))


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """End-to-end (slow) tests first: run two at a time, the quick ones fill in at the end
    instead of one long run finishing alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def shared_run(factory: pytest.TempPathFactory, name: str, make: Callable[[Path], object]) -> Path:
    """``make(path)`` once for the whole session, then ``path`` to every test that asks.

    Under pytest-xdist each worker is its own session, and a worker running tests of
    several modules tears a module's fixtures down and sets them up again; a reference
    run made here lives in the folder the workers share, under a lock, so it is trained
    once. Tests read it; one that changes a run copies it first."""
    base = factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared"
    root.mkdir(exist_ok=True)
    out, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)  # half made by a worker that failed
            make(out)
            done.touch()
    return out


@pytest.fixture(scope="session")
def linear_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The unfailed reference: allreduce on 2 workers, checkpoints at steps 100 and 200."""
    job = [*LINEAR_JOB, "--workers", "2", "--checkpoint-every", "100", "--tensorboard"]
    return shared_run(tmp_path_factory, "linear-reference", lambda out: train(out, *job))


@pytest.fixture(scope="session")
def local_sgd_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Local SGD (H=8) on 2 workers, unfailed, checkpoints every 96 steps."""
    job = [*LINEAR_JOB, "--workers", "2", "--strategy", "local-sgd", "--checkpoint-every", "96"]
    return shared_run(tmp_path_factory, "local-sgd-reference", lambda out: train(out, *job))


PS_ASYNC_JOB = [*LINEAR_JOB, "--strategy", "ps", "--workers", "3", "--servers", "2"]
"""The linear job on the parameter server with 3 workers (add --ps-mode asp or ssp)."""


@pytest.fixture(scope="session")
def ps_async_linear(tmp_path_factory: pytest.TempPathFactory):
    """``get(mode)``: PS_ASYNC_JOB under asp or ssp, unfailed, trained once per session
    (the async modes' targets and the kill tests' like-for-like references)."""

    def get(mode: str) -> Path:
        job = [*PS_ASYNC_JOB, "--ps-mode", mode]
        return shared_run(tmp_path_factory, f"ps-{mode}-linear-w3", lambda out: train(out, *job))

    return get


@pytest.fixture(scope="session")
def ps_bsp_linear(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The linear job on the parameter server (bsp, 2 workers, 2 shards), unfailed."""
    job = [*LINEAR_JOB, "--strategy", "ps", "--workers", "2", "--servers", "2", "--tensorboard"]
    return shared_run(tmp_path_factory, "ps-bsp-linear", lambda out: train(out, *job))
