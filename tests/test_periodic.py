"""Local SGD and DiLoCo end to end: references, bytes, and the loss targets."""

from __future__ import annotations

import pytest

from tests.conftest import (
    LINEAR_JOB,
    NOISE_FLOOR,
    max_abs_diff,
    params,
    read_summary,
    shared_run,
    train,
)

pytestmark = pytest.mark.slow  # trains through the launcher: not in the quick tier

LINEAR = LINEAR_JOB
DIGITS = ["--model", "mlp", "--steps", "304", "--batch-size", "64", "--optimizer", "adam"]
DIGITS += ["--lr", "0.003"]
W2 = ["--workers", "2"]


@pytest.fixture(scope="module")
def allreduce_runs(tmp_path_factory, linear_reference):
    dig = shared_run(tmp_path_factory, "digits-w2", lambda out: train(out, *DIGITS, *W2))
    return read_summary(linear_reference), read_summary(dig)


@pytest.mark.timeout(120)
def test_local_sgd_every_step_with_sgd_is_allreduce(tmp_path, linear_reference):
    """Averaging parameters after every plain SGD step == averaging gradients."""
    out = tmp_path / "h1"
    train(out, *LINEAR, *W2, "--strategy", "local-sgd", "--sync-every", "1")
    assert max_abs_diff(params(out), params(linear_reference)) < 1e-5


@pytest.mark.timeout(120)
def test_diloco_with_plain_outer_sgd_is_local_sgd(tmp_path, local_sgd_reference):
    """Outer lr 1, no momentum: the outer step is the average; inner SGD: local SGD."""
    train(
        tmp_path / "diloco",
        *LINEAR,
        *W2,
        "--strategy",
        "diloco",
        "--optimizer",
        "sgd",
        "--outer-lr",
        "1",
        "--outer-momentum",
        "0",
    )
    assert max_abs_diff(params(local_sgd_reference), params(tmp_path / "diloco")) < 1e-5


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "strategy",
    [["--strategy", "local-sgd"], ["--strategy", "diloco", "--outer-momentum", "0.5"]],
    ids=["local-sgd", "diloco"],
)
def test_one_eighth_of_the_bytes_and_the_same_targets(strategy, tmp_path, allreduce_runs):
    ref_linear, ref_digits = allreduce_runs
    lin, dig = tmp_path / "linear", tmp_path / "digits"
    train(lin, *LINEAR, *W2, *strategy, "--sync-every", "8")
    train(dig, *DIGITS, *W2, *strategy, "--sync-every", "8")
    for run, ref in ((read_summary(lin), ref_linear), (read_summary(dig), ref_digits)):
        sent = [w["bytes_sent"] for w in run["per_worker"]]
        assert sent == [w["bytes_sent"] // 8 for w in ref["per_worker"]]
    assert read_summary(lin)["test_loss"] < 2 * NOISE_FLOOR
    assert ref_linear["test_loss"] < 2 * NOISE_FLOOR
    assert read_summary(dig)["test_accuracy"] >= 0.90 and ref_digits["test_accuracy"] >= 0.90


@pytest.mark.timeout(120)
def test_local_sgd_compresses_what_it_sends(tmp_path):
    train(tmp_path / "f32", *LINEAR, *W2, "--strategy", "local-sgd")
    train(tmp_path / "f16", *LINEAR, *W2, "--strategy", "local-sgd", "--compress", "fp16")
    full, half = read_summary(tmp_path / "f32"), read_summary(tmp_path / "f16")
    # 25 synchronizations (200 steps, H 8): all but the last in half precision; after
    # the last step the replicas meet in full, in float32 with the residuals
    per_sync = full["bytes_sent_total"] // 25
    assert per_sync * 25 == full["bytes_sent_total"]
    assert half["bytes_sent_total"] == 24 * per_sync // 2 + per_sync
    assert half["test_loss"] < 2 * NOISE_FLOOR


@pytest.mark.timeout(60)
@pytest.mark.parametrize("strategy", ["local-sgd", "diloco"])
def test_a_rollback_goes_back_to_the_last_synchronization_every_time(
    tmp_path, strategy, monkeypatch
):
    """--recovery inplace: after a synchronization, local steps then rollback(), twice
    in one interval (a second loss before the next synchronization): each time the
    model, the inner Adam state and the schedule are the synchronization's, not those of
    the steps trained since (a kept copy that the live optimizer shared would drift)."""
    import copy

    import numpy as np
    import torch
    import torch.distributed as dist

    from shoal.data import build_dataset
    from shoal.dist import INPLACE_STORE_ENV, DistEnv
    from shoal.memory import ActivationMeter
    from shoal.metrics import PhaseTimer
    from shoal.models import build_model
    from shoal.run.resolve import Request, resolve_job
    from shoal.strategies import resolve

    given = {"output.out": str(tmp_path / "run"), "strategy.name": strategy,
             "option.sync_every": 4, "optim.name": "adam", "optim.lr": 0.01,
             "optim.schedule": "cosine", "model.name": "linear", "train.steps": 100,
             "cluster.recovery": "inplace"}  # fmt: skip
    job = resolve_job(Request(given=given))
    # a worker of an in-place job (under its launcher, with the store's address) keeps
    # what a rollback goes back to
    monkeypatch.setenv(INPLACE_STORE_ENV, "127.0.0.1:1")
    env = DistEnv(0, 1, 0, 1, torch.device("cpu"), "gloo", "localhost")
    data = build_dataset(job.data)
    x, y = data.rows.take(np.arange(64))

    def loss_fn(model, batch):
        return (model(batch[0]).squeeze(-1) - batch[1]) ** 2

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        rt = resolve(job).build(job, env)
        rt.data = data
        rt.setup(build_model(job.model, data), 100, (x, y), ActivationMeter())
        for _ in range(4):  # the 4th synchronizes
            rt.train_step((x, y), loss_fn, 1 / 64, PhaseTimer(env.device))
        model, opt = copy.deepcopy(rt.model.state_dict()), copy.deepcopy(rt.optimizer.state_dict())
        assert opt["state"], "Adam keeps state after the synchronization"
        for _ in range(2):
            for _ in range(3):
                rt.train_step((x, y), loss_fn, 1 / 64, PhaseTimer(env.device))
            assert rt.lr != opt["param_groups"][0]["lr"]  # (the schedule moved on)
            rt.rollback()
            assert rt.steps == 4 and rt.lr == opt["param_groups"][0]["lr"]
            for k, t in rt.model.state_dict().items():
                assert torch.equal(t, model[k]), k
            for i, state in rt.optimizer.state_dict()["state"].items():
                for k, t in state.items():
                    assert torch.equal(torch.as_tensor(t), torch.as_tensor(opt["state"][i][k])), k
    finally:
        dist.destroy_process_group()
