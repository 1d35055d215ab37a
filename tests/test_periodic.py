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
    assert half["bytes_sent_total"] * 2 == full["bytes_sent_total"]
    assert half["test_loss"] < 2 * NOISE_FLOOR
