"""Model parallelism: each layout trains the same parameters as one process.

Every run here is the same small transformer on the shipped text with the same
global batch; the reference is ``--strategy allreduce --workers 1`` (plain
single-process training). Sharded layouts must end at its parameters within
float tolerance, and hold about 1/P of its parameter and optimizer bytes.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.conftest import max_abs_diff, params, read_summary, train

LM_JOB = ["--model", "transformer", "--hidden", "32", "--layers", "2", "--heads", "4"]
LM_JOB += ["--context", "16", "--batch-size", "16", "--steps", "6", "--log-every", "2"]
LM_JOB += ["--optimizer", "adam", "--lr", "0.003", "--seed", "3"]
"""A few Adam steps of a 2-block transformer: enough for every parameter to move."""
TOLERANCE = 2e-5


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lm") / "single"
    train(out, *LM_JOB, "--strategy", "allreduce", "--workers", "1")
    return out


def _state_bytes(summary: dict) -> int:
    memory = summary["memory"]
    return memory["params"] + memory["optimizer"]


@pytest.mark.timeout(180)
def test_fsdp_matches_one_process_with_half_the_state_per_rank(tmp_path, single):
    out = tmp_path / "fsdp"
    train(out, *LM_JOB, "--strategy", "fsdp", "--workers", "2")
    assert max_abs_diff(params(out), params(single)) < TOLERANCE
    s, ref = read_summary(out), read_summary(single)
    assert s["samples_per_epoch"] == ref["samples_per_epoch"]
    assert math.isclose(s["final_loss"], ref["final_loss"], rel_tol=1e-5)
    ratio = _state_bytes(s) / _state_bytes(ref)
    assert 0.45 < ratio < 0.55, ratio  # 1/P, P = 2 (shards round up)
    assert all(w["memory"]["activations_peak"] > 0 for w in s["per_worker"])


@pytest.mark.timeout(180)
def test_tensor_parallel_matches_one_process_with_half_the_state_per_rank(tmp_path, single):
    out = tmp_path / "tensor"
    train(out, *LM_JOB, "--strategy", "tensor", "--workers", "2")
    assert max_abs_diff(params(out), params(single)) < TOLERANCE
    s, ref = read_summary(out), read_summary(single)
    assert s["samples_per_epoch"] == ref["samples_per_epoch"]
    ratio = _state_bytes(s) / _state_bytes(ref)
    assert 0.45 < ratio < 0.6, ratio  # layer norms, position embeddings, some biases: whole


@pytest.mark.timeout(240)
def test_a_dp_by_tp_mesh_matches_one_process(tmp_path, single):
    out = tmp_path / "dp2tp2"
    train(out, *LM_JOB, "--strategy", "tensor", "--mesh", "dp=2,tp=2", "--workers", "4")
    assert max_abs_diff(params(out), params(single)) < TOLERANCE
    assert read_summary(out)["samples_per_epoch"] == read_summary(single)["samples_per_epoch"]
