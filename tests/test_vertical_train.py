"""``shoal train --strategy vertical``: parties in their own processes (and on their own
"machines"), each reading its own Parquet columns, end at the parameters of the one
model trained on the joined table; a party killed mid-run costs nothing but time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

pytest.importorskip("private_set_intersection.python")

from shoal import checkpoint, procs
from shoal.cli import main
from shoal.data.make import make
from shoal.strategies.vertical.order import batch_rows
from shoal.strategies.vertical.pooled import train_pooled
from shoal.strategies.vertical.split import Pooled
from shoal.strategies.vertical.tables import read_party
from tests import forkserve
from tests.conftest import FRESH, run_shoal, shoal_env

HIDDEN, DIM, BATCH, SEED, LR = 8, 4, 64, 3, 0.01


@pytest.fixture(scope="module")
def clicks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vertical") / "clicks"
    make("clicks", 3000, out, test_rows=600, options={"overlap": 0.8})
    return out


def job(clicks: Path, out: Path, steps: int, *more: str) -> list[str]:
    return [
        "train", "--strategy", "vertical", "--parties",
        f"user={clicks / 'user'},item={clicks / 'item'}", "--split-model", "mlp",
        "--bottom-hidden", str(HIDDEN), "--steps", str(steps), "--batch-size", str(BATCH),
        "--seed", str(SEED), "--out", str(out), "--no-progress", "--no-report", *more,
    ]  # fmt: skip


def shoal(args: list[str], timeout: float = 120) -> str:
    """``shoal ARGS`` (forked from the test worker's preloaded server); its stderr."""
    done = run_shoal(*args, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def start(args: list[str]) -> subprocess.Popen:
    """``shoal ARGS`` started, not awaited (stderr piped)."""
    if FRESH:
        cmd = [sys.executable, "-m", "shoal", *args]
        return subprocess.Popen(cmd, env=shoal_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
    return forkserve.start(args, shoal_env(), stderr=subprocess.PIPE)  # type: ignore[return-value]


def pooled(clicks: Path, steps: int) -> Pooled:
    """The same model trained by one process on the joined table of the common ids: the
    same initial weights, batches and optimizer (Adam, lr 0.01)."""
    parties = {"user": str(clicks / "user"), "item": str(clicks / "item")}
    return train_pooled(parties, "item", "click", "mlp", steps=steps, batch=BATCH, seed=SEED,
                        lr=LR, hidden=HIDDEN, dim=DIM).model  # fmt: skip


def max_diff(run: Path, user_home: Path, ref: Pooled) -> float:
    label, user = (
        load_file(str(run / "model.safetensors")),
        load_file(str(user_home / "model.safetensors")),
    )
    pairs = [(label[f"top.{k}"], v) for k, v in ref.top.state_dict().items()]
    pairs += [(label[f"bottom.{k}"], v) for k, v in ref.bottoms[0].state_dict().items()]
    pairs += [(user[k], v) for k, v in ref.bottoms[1].state_dict().items()]
    return max(float((a - b).abs().max()) for a, b in pairs)


def samples(common: int, steps: int) -> int:
    """Samples in ``steps`` steps (an epoch's last batch is shorter)."""
    return sum(len(batch_rows(common, step, BATCH, SEED)) for step in range(steps))


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


@pytest.mark.timeout(180)
def test_two_parties_end_at_the_pooled_models_parameters(clicks, tmp_path):
    """Split between a user party and an item party (labels), aligned by PSI over ids
    each holds 80% of, each party a data-parallel group of two processes (process r
    trains half of every batch with the label party's process r, the halves'
    gradients summed in each party's group): the parameters of both end within 1e-5
    of one process's on the joined table; each epoch's samples are exactly the
    common ids (digests). (The other tests run a party as one process.)"""
    run = tmp_path / "run"
    steps = 40
    shoal(job(clicks, run, steps, "--eval-every", "20", "--tensorboard", "--party-workers", "2"))
    assert max_diff(run, run / "parties" / "user", pooled(clicks, steps)) < 1e-5
    assert any((run / "tensorboard").iterdir())
    s = summary(run)
    user = read_party("user", str(clicks / "user"), "id", "")
    item = read_party("item", str(clicks / "item"), "id", "click")
    common = np.intersect1d(user.train.ids, item.train.ids)
    v = s["vertical"]
    assert v["common_ids"] == len(common) and v["align"] == "psi"
    assert v["test_common_ids"] == len(np.intersect1d(user.test.ids, item.test.ids))  # type: ignore[union-attr]
    assert s["epochs"] and all(e["exact"] for e in s["epochs"])
    assert sum(e["samples"] for e in s["epochs"]) == samples(len(common), steps)
    # what crossed per step: the user's output for the batch and its gradient back
    payload = 2 * BATCH * HIDDEN * 4
    assert payload < v["bytes_per_step"] < payload + 2_000 + 200_000 / steps
    assert 0.5 < s["auc"] <= 1 and s["steps"] == steps
    assert v["processes_per_party"] == 2 and len(s["per_worker"]) == 4
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals if "eval" in r] == [20, 40]


@pytest.mark.timeout(240)
def test_a_party_killed_mid_run_resumes_with_the_others_from_their_common_checkpoint(
    clicks, tmp_path
):
    """SIGKILL the user party after its checkpoint of step 60 (of 150): the launcher stops the
    label party, starts both again, they agree on the newest step both hold, and the
    run ends at the unbroken run's parameters with exact digests."""
    run = tmp_path / "run"
    steps = 150
    proc = start(job(clicks, run, steps, "--checkpoint-every", "30"))
    killed = None
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and killed is None:
            if checkpoint.step_path(run / "parties" / "user", 60).is_dir():
                for pid in procs.role_processes(proc.pid, "party"):
                    if Path(f"/proc/{pid}/comm").read_text().strip() == "shoal-party0":
                        os.kill(pid, signal.SIGKILL)
                        killed = pid
            time.sleep(0.01)
        _, err = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert killed is not None and proc.returncode == 0, err[-3000:]
    assert "party user was killed by SIGKILL" in err, err[-3000:]
    assert "every party resumes from step" in err
    s = summary(run)
    assert s["resumed_from_step"] >= 60 and s["steps"] == steps
    assert all(e["exact"] for e in s["epochs"])
    assert sum(e["samples"] for e in s["epochs"]) == samples(s["vertical"]["common_ids"], steps)
    assert max_diff(run, run / "parties" / "user", pooled(clicks, steps)) < 1e-5


@pytest.mark.timeout(240)
def test_a_sigterm_stops_every_party_at_one_checkpoint_and_resume_goes_on(clicks, tmp_path):
    """A scheduler's SIGTERM to the launcher: every party stops after the same step with
    a checkpoint of it (exit 143, the preemption noted); ``--resume`` ends at the
    unbroken run's parameters, the summary listing the preemption."""
    run = tmp_path / "run"
    steps = 150
    proc = start(job(clicks, run, steps, "--checkpoint-every", "100"))
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (run / "metrics.jsonl").is_file():
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-3000:]
    record = json.loads((run / "preempted.jsonl").read_text().splitlines()[-1])
    step = record["step"]
    assert 0 < step < steps and record["signal"] == "SIGTERM"
    assert f"every worker stopped after step {step}" in err and "continue with" in err
    for home in (run, run / "parties" / "user"):
        assert checkpoint.list_checkpoints(home)[-1].name == checkpoint.step_path(home, step).name
    shoal(["train", "--resume", str(run), "--no-progress", "--no-report"])
    s = summary(run)
    assert s["resumed_from_step"] == step and s["steps"] == steps
    assert [p["step"] for p in s["preemptions"]] == [step]
    assert all(e["exact"] for e in s["epochs"])
    assert sum(e["samples"] for e in s["epochs"]) == samples(s["vertical"]["common_ids"], steps)
    assert max_diff(run, run / "parties" / "user", pooled(clicks, steps)) < 1e-5


def test_what_a_vertical_job_does_not_read_is_refused(clicks, tmp_path, capsys):
    parties = f"user={clicks / 'user'},item={clicks / 'item'}"
    base = ["train", "--strategy", "vertical", "--steps", "2", "--out", str(tmp_path / "r")]
    cases = [
        (["--parties", parties, "--data", "digits"], "--data: --strategy vertical does not read"),
        (["--parties", parties, "--workers", "2"], "--workers: --strategy vertical does not"),
        (["--parties", parties, "--hidden", "8"], "--hidden: --strategy vertical does not"),
        (["--parties", parties, "--party", "bank", "--label-address", "1.2.3.4:5"],
         "--party bank is not one of --parties"),
        (["--parties", parties, "--party", "user"], "give --label-address"),
        (["--parties", f"user={tmp_path / 'nowhere'},item={clicks / 'item'}"],
         "no such file or directory"),
        (["--parties", f"user={clicks / 'user'}"], "needs two parties or more"),
        (["--parties", parties, "--id-column", "uid"], "no column 'uid'"),
        (["--parties", parties, "--split-model", "linear", "--tower-dim", "8"],
         "--tower-dim: it is read only with --split-model two-tower or two-tower-mlp"),
        (["--parties", parties, "--dp-clip", "1", "--dp-noise", "1"],
         "does not run differential privacy"),
    ]  # fmt: skip
    for extra, message in cases:
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (extra, err)
        assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_one_shoal_train_per_party_on_two_hosts(clicks, tmp_path):
    """The item party (labels) on one network namespace, the user party on another,
    each started by its own ``shoal train --party``: the same parameters as the
    one-machine run."""
    from netns import hosts

    steps = 30
    env = {**os.environ, "SHOAL_SECRET": "ab" * 32}
    with hosts(subnet="10.231.13") as (a, b):
        address = f"{a.addr}:7313"

        def start(host, party: str, out: Path, *more: str) -> subprocess.Popen:
            args = [*job(clicks, out, steps, "--party", party, "--label-address", address)]
            return subprocess.Popen(
                [*host.prefix(), sys.executable, "-m", "shoal", *args, *more], env=env,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip

        label = start(a, "item", tmp_path / "item")
        user = start(b, "user", tmp_path / "user")
        try:
            _, label_err = label.communicate(timeout=150)
            _, user_err = user.communicate(timeout=30)
        finally:
            label.kill()
            user.kill()
        assert label.returncode == 0, label_err[-3000:]
        assert user.returncode == 0, user_err[-3000:]
        ref = pooled(clicks, steps)
        assert max_diff(tmp_path / "item", tmp_path / "user", ref) < 1e-5
        assert summary(tmp_path / "user")["steps"] == steps  # (the label party's word)
