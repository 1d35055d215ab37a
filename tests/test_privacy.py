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


def _opacus_epsilon(steps: int, rate: float, sigma: float = 1.1) -> float:
    acct = RDPAccountant()
    for _ in range(steps):
        acct.step(noise_multiplier=sigma, sample_rate=rate)
    return acct.get_epsilon(delta=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_dp_sgd_epsilon_is_opacus_s_for_any_workers_and_after_a_kill(tmp_path):
    one, four, killed = tmp_path / "one", tmp_path / "four", tmp_path / "killed"
    train(one, *DP, "--workers", "1")
    train(four, *DP, "--workers", "4")
    train(killed, *DP, "--workers", "2", "--checkpoint-every", "20", "--no-checkpoint-async",
          env={"SHOAL_FAULT": "crash:rank=1:step=30"})  # fmt: skip
    rate = 64 / build_dataset(DataConfig(name="digits")).num_train
    want = _opacus_epsilon(40, rate)
    for run in (one, four, killed):
        dp = read_summary(run)["privacy"]
        assert dp["steps"] == 40 and dp["sample_rate"] == pytest.approx(rate, rel=1e-12)
        assert abs(dp["epsilon"] - want) / want < 1e-3, (run.name, dp["epsilon"], want)
    assert read_summary(killed)["resumed_from_step"] == 20
    # the noise is added once per global step, from one seeded generator: one worker,
    # four, and a run killed and resumed take the same steps
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
    job = [*DP[: DP.index("--dp-noise")], "--dp-noise", "0", "--steps", "10"]
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
