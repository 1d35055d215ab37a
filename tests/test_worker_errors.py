"""An exception in the user's own code: shown once by ``shoal train``, with the user's
frames, and not retried where a restart would only repeat it."""

from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path

import pytest
from conftest import run_shoal

MODEL = '''
import torch
from torch import nn


class Boom(nn.Module):
    """An MLP that raises in its forward: at once, or when its step counter (a buffer,
    so checkpointed and restored with the model) reaches AT."""

    def __init__(self, inputs, outputs, at):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(inputs, outputs))
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))
        self.at = at

    def forward(self, x):
        if self.training and torch.is_grad_enabled():
            self.calls += 1
            if int(self.calls) >= self.at:
                check_the_batch(x)
        return self.net(x)


def check_the_batch(x):
    raise ValueError("oops from the user's forward")


def at_once(data, cfg):
    return Boom(int(torch.tensor(data.input_shape).prod()), data.num_outputs, 0)


def later(data, cfg):
    return Boom(int(torch.tensor(data.input_shape).prod()), data.num_outputs, 8)
'''


def _user_model(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "userboom.py").write_text(textwrap.dedent(MODEL))
    return {"PYTHONPATH": str(tmp_path)}


def _shown(stderr: str) -> None:
    """The exception and the user's frames, once; none of shoal's or torch's frames."""
    assert stderr.count("ValueError: oops from the user's forward") == 1, stderr
    assert 'userboom.py", line' in stderr and "in check_the_batch" in stderr, stderr
    assert "in forward" in stderr, stderr
    assert "shoal/trainer.py" not in stderr and "torch/nn" not in stderr, stderr
    assert "Traceback (the frames of your code)" in stderr, stderr


@pytest.mark.timeout(120)
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["allreduce", "ps"])
def test_an_exception_before_the_first_step_is_shown_once_and_not_retried(tmp_path, strategy):
    env = _user_model(tmp_path)
    out = tmp_path / "run"
    args = ["--model", "userboom:at_once", "--workers", "2", "--steps", "20"]
    args += ["--strategy", strategy, "--max-restarts", "3", "--no-progress", "--no-report"]
    proc = run_shoal("train", "--out", str(out), *args, env=env)
    ended = time.time()
    assert proc.returncode == 1, proc.stderr
    _shown(proc.stderr)
    assert "shoal: restart" not in proc.stderr and "restarting" not in proc.stderr, proc.stderr
    assert "W1" not in proc.stderr, proc.stderr  # (none of torch's log lines)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("shoal: error: training failed: worker "), last
    assert "not retried: it failed before finishing a step" in last, last
    assert "--auto-resume starts it over there" in last, last  # (no checkpoint)
    raised = min(json.loads(p.read_text())["time"] for p in (out / "failures").glob("*.json"))
    assert ended - raised < 10, ended - raised
    # the same command again says what the directory holds
    again = run_shoal("train", "--out", str(out), *args, env=env)
    assert again.returncode == 2
    assert "stopped before its first checkpoint: add --auto-resume" in again.stderr


@pytest.mark.timeout(180)
@pytest.mark.slow
def test_the_same_exception_in_the_same_step_after_a_restart_ends_the_job(tmp_path):
    env = _user_model(tmp_path)
    out = tmp_path / "run"
    args = ["--model", "userboom:later", "--workers", "2", "--steps", "30", "--log-every", "1"]
    args += ["--checkpoint-every", "5", "--max-restarts", "3", "--no-progress", "--no-report"]
    proc = run_shoal("train", "--out", str(out), *args, "--recovery", "restart", env=env)
    assert proc.returncode == 1, proc.stderr
    _shown(proc.stderr)  # (twice raised, once shown)
    assert proc.stderr.count("shoal: restart 1:") == 1, proc.stderr
    assert "restart 2" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "raised ValueError in step 8" in last, last
    assert "not retried: the same exception in the same step after a restart" in last, last
    assert "continue from step 5 with: shoal train --resume" in last, last


@pytest.mark.timeout(60)
def test_a_builtin_model_refuses_data_it_cannot_take_before_launch(tmp_path, capsys):
    from shoal.cli import main

    out = str(tmp_path / "r")
    assert main(["train", "--model", "ctr", "--data", "digits", "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--model ctr needs hashed categorical ids" in err, err
    # a model that builds but cannot take the samples: tried on the meta device
    assert main(["train", "--model", "cnn", "--data", "text", "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--model cnn" in err, err
    assert not (tmp_path / "r").exists()


@pytest.mark.timeout(180)
@pytest.mark.slow
def test_in_place_the_same_exception_on_two_workers_ends_the_job(tmp_path):
    """In place (the default for allreduce) a raising worker is a lost one that a
    replacement would take over, on its slice: the same exception in the same step on
    another worker says the batch or the code is at fault, and the job ends, shown once."""
    env = _user_model(tmp_path)
    out = tmp_path / "run"
    args = ["--model", "userboom:later", "--workers", "2", "--steps", "30", "--log-every", "1"]
    args += ["--checkpoint-every", "5", "--max-restarts", "3", "--no-progress", "--no-report"]
    proc = run_shoal("train", "--out", str(out), *args, env=env)
    assert proc.returncode == 1, proc.stderr
    _shown(proc.stderr)
    assert "shoal: restart" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "raised ValueError in step 8" in last, last
    assert "not retried: the same exception in the same step on another worker" in last, last
    assert "continue from step 5 with: shoal train --resume" in last, last
