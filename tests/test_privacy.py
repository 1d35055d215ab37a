"""Differential privacy: budgets, Poisson sampling, and DP-SGD against Opacus."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from opacus.optimizers import DPOptimizer

from shoal import privacy
from shoal.cli import main
from shoal.config import DataConfig, ModelConfig, TrainConfig
from shoal.data import build_dataset
from shoal.errors import UserError
from shoal.models import build_model
from shoal.models.tasks import per_sample_loss
from tests.conftest import max_abs_diff, params, read_summary, run_shoal, train


def test_budget_refuses_what_means_nothing():
    assert not privacy.budget(TrainConfig()).enabled
    for bad in ({"dp_noise": 1.0}, {"dp_epsilon": 3.0},
                {"dp_clip": 1.0, "dp_noise": 1.0, "dp_epsilon": 3.0}):  # fmt: skip
        with pytest.raises(UserError):
            privacy.budget(TrainConfig(**bad))


def test_noise_for_a_target_epsilon_is_opacus_s_and_reaches_it():
    b = privacy.budget(TrainConfig(dp_clip=1.0, dp_epsilon=3.0))
    sigma = privacy.noise_for(b, 0.05, 300)
    acct = privacy.Accountant(sigma, 0.05, b.delta)
    for _ in range(300):
        acct.step()
    assert 2.9 < acct.epsilon() <= 3.0
    assert privacy.noise_for(privacy.Budget(1.0, 0.7, 0.0, 1e-5), 0.05, 300) == 0.7


def test_poisson_rows_are_bernoulli_per_row_and_seeded():
    draws = [privacy.poisson_rows(0, step, 10_000, 0.03) for step in range(50)]
    sizes = np.array([len(d) for d in draws])
    assert abs(sizes.mean() - 300) < 10 and sizes.std() > 5  # not a fixed size
    assert np.array_equal(draws[3], privacy.poisson_rows(0, 3, 10_000, 0.03))
    assert not np.array_equal(draws[3], draws[4])
    assert all(np.all(np.diff(d) > 0) for d in draws)


# --- DP-SGD end to end ----------------------------------------------------------------

DP = ["--model", "mlp", "--hidden", "32", "--data", "digits", "--optimizer", "sgd",
      "--lr", "0.5", "--seed", "1", "--steps", "40", "--batch-size", "64",
      "--dp-clip", "1.0", "--dp-noise", "1.1", "--log-every", "10"]  # fmt: skip
SEEDED = [*DP, "--dp-insecure-seed"]
"""The same noise and samples for any number of workers: reproducible, not private."""


def _opacus_epsilon(steps: int, rate: float, sigma: float = 1.1) -> float:
    acct = RDPAccountant()
    for _ in range(steps):
        acct.step(noise_multiplier=sigma, sample_rate=rate)
    return acct.get_epsilon(delta=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_dp_sgd_epsilon_is_opacus_s_for_any_workers_and_after_a_kill(tmp_path):
    one, four, killed = tmp_path / "one", tmp_path / "four", tmp_path / "killed"
    train(one, *SEEDED, "--workers", "1")
    train(four, *SEEDED, "--workers", "4")
    train(killed, *SEEDED, "--workers", "2", "--checkpoint-every", "20", "--no-checkpoint-async",
          env={"SHOAL_FAULT": "crash:rank=1:step=30"})  # fmt: skip
    rate = 64 / build_dataset(DataConfig(name="digits")).num_train
    want = _opacus_epsilon(40, rate)
    for run in (one, four, killed):
        dp = read_summary(run)["privacy"]
        assert dp["steps"] == 40 and dp["sample_rate"] == pytest.approx(rate, rel=1e-12)
        assert abs(dp["epsilon"] - want) / want < 1e-3, (run.name, dp["epsilon"], want)
    assert read_summary(killed)["resumed_from_step"] == 20
    # the noise is added once per global step, from one generator: one worker, four,
    # and a run killed and resumed take the same steps (the same noise: --dp-insecure-seed)
    assert max_abs_diff(params(four), params(one)) < 1e-5
    assert max_abs_diff(params(killed), params(one)) < 1e-5
    records = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    eps = [r["epsilon"] for r in records if "epsilon" in r]
    assert len(eps) == 4 and eps == sorted(eps)
    assert eps[0] == pytest.approx(_opacus_epsilon(10, rate), rel=1e-3)
    # the report compares them: epsilon in the table, and the privacy plot
    report = run_shoal("report", str(one), str(four), "--out", str(tmp_path / "cmp"))
    assert report.returncode == 0, report.stderr
    page = (tmp_path / "cmp" / "report.html").read_text()
    assert "<td>epsilon</td>" in page and "sample-level" in page
    assert (tmp_path / "cmp" / "privacy.png").stat().st_size > 10_000


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_dp_sgd_without_noise_takes_opacus_s_steps(tmp_path):
    """Two workers of shoal's DP-SGD, no noise, against Opacus alone as its tutorials use
    it (mean loss, DPOptimizer with the expected batch size) on the same Poisson batches:
    the same clipped, summed, scaled and averaged gradients."""
    out = tmp_path / "run"
    job = [*DP[: DP.index("--dp-noise")], "--dp-noise", "0", "--steps", "10", "--dp-insecure-seed"]
    train(out, *job, "--workers", "2")
    assert read_summary(out)["privacy"]["epsilon"] is None  # no noise: no guarantee

    torch.manual_seed(1)
    data = build_dataset(DataConfig(name="digits"))
    model = build_model(ModelConfig(name="mlp", hidden=32), data)
    sampled = GradSampleModule(model)
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), noise_multiplier=0.0,
                      max_grad_norm=1.0, expected_batch_size=64)  # fmt: skip
    for step in range(10):
        x, y = data.rows.take(privacy.poisson_rows(1, step, data.num_train, 64 / data.num_train))
        opt.zero_grad()
        per_sample_loss("classification", sampled(x), y).mean().backward()
        opt.step()
    theirs = {k: v.detach() for k, v in model.state_dict().items()}
    assert max_abs_diff(params(out), theirs) < 1e-5


# --- the noise and the samples are secret -----------------------------------------------


def _files_but_checkpoints(run) -> list:
    return [f for f in run.rglob("*") if f.is_file() and "checkpoints" not in f.parts]


def _secret_of(run) -> int:
    """The run's secret, from its newest checkpoint (the one place it is kept)."""
    from shoal import checkpoint

    _, state = checkpoint.load_latest(run)
    return int(state["strategy"]["randomness"]["secret"])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_dp_noise_and_samples_cannot_be_rebuilt_from_the_run_and_resume_exactly(tmp_path):
    """An attacker with everything in the run directory but its checkpoints (config.toml
    with the seed, the summary, the metrics, the model) replays the run: the same job
    with the noise and samples drawn from what it knows, the seed. The replay matches a
    --dp-insecure-seed run (the attack works where the randomness follows the seed) and
    misses the real one (two real runs with one seed differ: the FedAvg test below); the
    secret is nowhere but in the checkpoints; and a run resumed from a checkpoint ends
    where it would have."""
    job = [*DP, "--steps", "20", "--checkpoint-every", "10", "--no-checkpoint-async",
           "--workers", "1"]  # fmt: skip
    real, seeded, replay = (tmp_path / n for n in ("real", "seeded", "replay"))
    train(real, *job)
    said = train(seeded, *job, "--dp-insecure-seed")
    assert "NOT private" in said.stdout  # (the summary table says so too)
    train(replay, *job, "--dp-insecure-seed")  # the attacker's best guess: the seed
    assert max_abs_diff(params(replay), params(seeded)) < 1e-6  # the attack can work
    assert max_abs_diff(params(replay), params(real)) > 1e-2  # but not on the real run
    dp = read_summary(real)["privacy"]
    assert "os.urandom" in dp["randomness"] and "NOT private" in read_summary(seeded)[
        "privacy"]["randomness"]  # fmt: skip
    secret = _secret_of(real)
    assert secret != 1 and secret.bit_length() > 64
    for f in _files_but_checkpoints(real):
        data = f.read_bytes()
        for form in (str(secret), format(secret, "x"), secret.to_bytes(16, "big")):
            assert (form.encode() if isinstance(form, str) else form) not in data, f
    # the step-10 checkpoint continues the same secret, noise and samples: a copy of the
    # run without its step-20 checkpoint, resumed, ends at the same model exactly
    import shutil

    from shoal.checkpoint import step_path

    resumed = tmp_path / "resumed"
    shutil.copytree(real, resumed)
    shutil.rmtree(step_path(resumed, 20))
    (resumed / "model.safetensors").unlink()
    proc = run_shoal("train", "--resume", str(resumed), "--no-progress", "--no-report")
    assert proc.returncode == 0, proc.stderr
    assert read_summary(resumed)["resumed_from_step"] == 10
    assert max_abs_diff(params(resumed), params(real)) == 0.0
    assert read_summary(resumed)["privacy"]["epsilon"] == dp["epsilon"]


@pytest.mark.timeout(120)
@pytest.mark.slow
def test_resume_refuses_to_change_privacy_and_keeps_the_epsilon_target(tmp_path, capsys):
    """Turning DP on (or changing it) at a resume is refused in one line; under
    --dp-epsilon, more steps on resume re-plan the noise of the steps left so that the
    whole run stays within the target."""
    plain = tmp_path / "plain"
    train(plain, "--model", "linear", "--steps", "6", "--checkpoint-every", "3",
          "--no-checkpoint-async")  # fmt: skip
    on = ["--dp-clip", "1", "--dp-noise", "1"]
    for flags in (on, [*on, "--dp-insecure-seed"], ["--dp-clip", "1", "--dp-epsilon", "3"]):
        # (in this process: the same ``main`` the command runs)
        code = main(["train", "--resume", str(plain), "--steps", "9", *flags])
        err = capsys.readouterr().err.strip()
        assert code != 0 and "Traceback" not in err
        assert len(err.splitlines()) == 1 and "privacy settings are fixed" in err, err

    budget = privacy.Budget(1.0, 0.0, 3.0, 1e-5)
    rate = 0.05
    first = privacy.noise_for(budget, rate, 100)
    acct = privacy.Accountant(first, rate, budget.delta, 100, budget)
    for _ in range(100):
        acct.step()
    saved = acct.state_dict()
    longer = privacy.Accountant(first, rate, budget.delta, 300, budget)
    longer.load_state_dict(saved)
    assert longer.noise > first  # more steps in the same budget: more noise
    for _ in range(200):
        longer.step()
    assert 2.9 < longer.epsilon() <= 3.0
    same = privacy.Accountant(first, rate, budget.delta, 100, budget)
    same.load_state_dict(saved)
    assert same.noise == first  # an unchanged plan continues exactly
    faster = privacy.Accountant(first, 4 * rate, budget.delta, 200, budget)
    faster.load_state_dict(saved)  # 100 more steps at four times the rate (more clients
    for _ in range(100):  # a round, say): re-planned too
        faster.step()
    assert faster.noise > first and faster.epsilon() <= 3.0
    spent = privacy.Accountant(first, rate, budget.delta, 300, privacy.Budget(1.0, 0, 0.5, 1e-5))
    with pytest.raises(UserError, match="already spent"):
        spent.load_state_dict(saved)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_client_level_noise_and_sample_are_secret_and_resume_exactly(tmp_path):
    """FedAvg under client-level DP: the sample of clients and the noise come from the
    run's secret, not the seed (a replay from the seed misses, two runs differ), the
    secret is not in what a remote client receives (the job: config.toml) nor anywhere
    but the checkpoints, and a resumed run ends where the unbroken one did."""
    import shutil

    from shoal.checkpoint import step_path

    job = ["--model", "linear", "--data", "synthetic-linear", "--num-samples", "1000",
           "--optimizer", "sgd", "--lr", "0.05", "--seed", "2", "--steps", "12",
           "--strategy", "fedavg", "--clients", "20", "--clients-per-round", "5",
           "--local-steps", "2", "--batch-size", "16", "--dp-clip", "0.5", "--dp-noise", "0.8",
           "--checkpoint-every", "6", "--no-checkpoint-async", "--workers", "1"]  # fmt: skip
    real, again, replay = tmp_path / "real", tmp_path / "again", tmp_path / "replay"
    train(real, *job)
    train(again, *job)
    train(replay, *job, "--dp-insecure-seed")
    assert max_abs_diff(params(replay), params(real)) > 1e-2
    assert max_abs_diff(params(again), params(real)) > 1e-2
    secret = _secret_of(real)
    for f in _files_but_checkpoints(real):
        assert str(secret).encode() not in f.read_bytes(), f
    resumed = tmp_path / "resumed"
    shutil.copytree(real, resumed)
    shutil.rmtree(step_path(resumed, 12))
    proc = run_shoal("train", "--resume", str(resumed), "--no-progress", "--no-report")
    assert proc.returncode == 0, proc.stderr
    assert read_summary(resumed)["resumed_from_step"] == 6
    assert max_abs_diff(params(resumed), params(real)) == 0.0


def test_a_poisson_round_may_leave_a_process_without_clients():
    """Client-level DP samples clients by Poisson: a round may hold fewer clients than
    there are processes, and a process with none still takes part in the round."""
    from shoal.strategies.federated.rounds import Federation

    parts = [np.arange(i * 10, i * 10 + 10) for i in range(20)]
    fed = Federation(parts, 1, 4, 2, 0, seed=0, poisson=True, sample_seed=12345)
    rounds = [r for r in range(200) if len(fed.chosen(r)) < 2]
    assert rounds  # at rate 1/20, most rounds hold 0 or 1 client
    task = fed.round(rounds[0], 1, 2)
    assert task.clients == [] and np.isfinite(task.loss_scale)
