"""Model parallelism: each layout trains the same parameters as one process.

Every run here is the same small transformer on the shipped text with the same
global batch; the reference is ``--strategy allreduce --workers 1`` (plain
single-process training). Sharded layouts must end at its parameters within
float tolerance, and hold about 1/P of its parameter and optimizer bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import shutil
from pathlib import Path

import pytest

from shoal.strategies.pipeline import partition
from tests.conftest import max_abs_diff, params, read_summary, shared_run, train

pytestmark = pytest.mark.slow  # trains through the launcher: not in the quick tier

LM_JOB = ["--model", "transformer", "--hidden", "32", "--layers", "2", "--heads", "4"]
LM_JOB += ["--context", "16", "--batch-size", "16", "--steps", "6", "--log-every", "2"]
LM_JOB += ["--optimizer", "adam", "--lr", "0.003", "--seed", "3"]
"""A few Adam steps of a 2-block transformer: enough for every parameter to move."""
TOLERANCE = 2e-5


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Path:
    job = [*LM_JOB, "--strategy", "allreduce", "--workers", "1"]
    return shared_run(tmp_path_factory, "lm-single", lambda out: train(out, *job))


def _losses(run: Path) -> list[float]:
    records = (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())
    return [r["loss"] for r in records if "loss" in r]


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


@pytest.mark.timeout(180)
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_pipeline_matches_one_process(schedule, tmp_path, single):
    out = tmp_path / schedule
    train(out, *LM_JOB, "--strategy", "pipeline", "--schedule", schedule, "--workers", "2")
    assert max_abs_diff(params(out), params(single)) < TOLERANCE
    s = read_summary(out)
    assert s["samples_per_epoch"] == read_summary(single)["samples_per_epoch"]
    assert _losses(out) == pytest.approx(_losses(single), rel=1e-5)  # the last stage's
    pipe = s["pipeline"]
    assert pipe["units"] == [["embed", "block0"], ["block1", "head"]]  # equal parameters
    assert 0.0 < pipe["bubble"] < 1.0 and len(pipe["idle_per_rank"]) == 2


@pytest.mark.timeout(240)
def test_a_dp_by_pp_mesh_with_the_interleaved_schedule_matches_one_process(tmp_path, single):
    """Two pipelines of two ranks, each rank holding two of the four stages."""
    out = tmp_path / "dp2pp2"
    mesh = ["--mesh", "dp=2,pp=2", "--schedule", "interleaved", "--workers", "4"]
    mesh += ["--stage-balance", "time"]  # four units, four stages: measured, but one unit each
    train(out, *LM_JOB, "--strategy", "pipeline", *mesh)
    assert max_abs_diff(params(out), params(single)) < TOLERANCE
    s = read_summary(out)
    assert s["samples_per_epoch"] == read_summary(single)["samples_per_epoch"]
    assert s["pipeline"]["units"] == [["embed"], ["block0"], ["block1"], ["head"]]


@pytest.mark.timeout(240)
def test_the_mlp_split_by_hand_or_by_columns_and_rows_matches_one_process(tmp_path):
    """Digits MLP: a pipeline cut where --split-at says, whose epoch ends in a batch of 30
    that 4 microbatches cannot share evenly (padded, the padding left out of the loss),
    and the MLP's tensor-parallel plan."""
    job = ["--model", "mlp", "--batch-size", "64", "--epochs", "1", "--lr", "0.1", "--seed", "1"]
    train(tmp_path / "single", *job, "--workers", "1")
    ref = read_summary(tmp_path / "single")
    pipe = ["--strategy", "pipeline", "--split-at", "3"]  # (flatten, linear, relu) | the rest
    tensor = ["--strategy", "tensor"]
    for name, how in (("pipe", pipe), ("tensor", tensor)):
        train(tmp_path / name, *job, *how, "--workers", "2")
        assert max_abs_diff(params(tmp_path / name), params(tmp_path / "single")) < TOLERANCE
        s = read_summary(tmp_path / name)
        assert s["samples_per_epoch"] == ref["samples_per_epoch"]
        assert math.isclose(s["final_loss"], ref["final_loss"], rel_tol=1e-5)
    units = read_summary(tmp_path / "pipe")["pipeline"]["units"]
    assert units == [["0", "1", "2"], ["3", "4", "5"]]


def test_partition_minimizes_the_largest_stage():
    assert partition([1, 1, 1, 1], 2) == [0, 2]
    assert partition([5, 1, 1, 1, 1, 1], 2) == [0, 1]
    assert partition([1, 2, 3, 4, 5], 3) == [0, 3, 4]  # 6 | 4 | 5
    assert partition([1, 1, 1], 3) == [0, 1, 2]


@pytest.mark.timeout(240)
def test_a_pipeline_checkpoint_resumes_as_data_parallel(tmp_path, single):
    """4 steps on a 2-stage pipeline (a DCP checkpoint), then 2 more as plain data
    parallel on 2 workers, or as fsdp: the parameters of 6 uninterrupted steps."""
    out = tmp_path / "run"
    first = [*LM_JOB[: LM_JOB.index("--steps")], *LM_JOB[LM_JOB.index("--steps") + 2 :]]
    train(out, *first, "--steps", "4", "--strategy", "pipeline", "--workers", "2")
    assert (out / "checkpoints" / "step-00000004" / "model" / ".metadata").exists()
    shutil.copytree(out, tmp_path / "as-fsdp")
    _refuses_metadata_that_runs_code(out, tmp_path / "hostile")
    for strategy, run in (("allreduce", out), ("fsdp", tmp_path / "as-fsdp")):
        train(run, "--resume", str(run), "--steps", "6", "--strategy", strategy, "--workers", "2")
        s = read_summary(run)
        assert s["strategy"] == strategy and s["resumed_from_step"] == 4
        assert max_abs_diff(params(run), params(single)) < TOLERANCE


class _Payload:
    """What a hostile ``.metadata`` holds: unpickling it would run a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _refuses_metadata_that_runs_code(run: Path, copy: Path) -> None:
    """DCP's metadata replaced by a pickle that would run code, its checksum in meta.json
    updated as a careful attacker would: --resume refuses it in one line, nothing runs."""
    shutil.copytree(run, copy)
    step = copy / "checkpoints" / "step-00000004"
    marker = copy / "pwned"
    (step / "model" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    meta = json.loads((step / "meta.json").read_text())
    meta["files"]["model/.metadata"] = hashlib.sha256(
        (step / "model" / ".metadata").read_bytes()
    ).hexdigest()
    (step / "meta.json").write_text(json.dumps(meta))
    proc = train(copy, "--resume", str(copy), "--steps", "6", "--workers", "2", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "posix.system" in lines[0] and "refusing" in lines[0], lines
    assert not marker.exists()


@pytest.mark.timeout(180)
def test_the_transformer_beats_the_unigram_baseline(tmp_path):
    out = tmp_path / "lm"
    job = ["--model", "transformer", "--hidden", "64", "--context", "32", "--batch-size", "32"]
    train(out, *job, "--steps", "300", "--optimizer", "adam", "--lr", "0.003", "--workers", "2")
    s = read_summary(out)
    assert s["data"] == "text" and s["unigram_perplexity"] > 20
    assert s["test_perplexity"] < 0.5 * s["unigram_perplexity"]


@pytest.mark.timeout(60)
def test_the_transformer_takes_a_batch_of_no_windows():
    """A rank's slice of a step can be empty (seen: worker 1 of a restarted two-node
    diloco job, "cannot reshape tensor of 0 elements"): forward and backward of no
    windows give no outputs and zero gradients."""
    import torch

    from shoal.models.transformer import Block

    block = Block(32, 4)
    x = torch.zeros(0, 16, 32, requires_grad=True)
    y = block(x)
    y.sum().backward()
    assert y.shape == (0, 16, 32)
    assert all(float(p.grad.abs().sum()) == 0 for p in block.parameters() if p.grad is not None)


@pytest.mark.timeout(120)
def test_a_mistake_found_by_the_workers_is_said_once_and_not_retried(tmp_path):
    """Unit names are known only once the model is built, in the workers: both ranks
    refuse, the agent's restarts end at once, and the user sees the reason."""
    proc = train(
        tmp_path / "run",
        *LM_JOB,
        *["--strategy", "pipeline", "--workers", "2", "--split-at", "block9"],
        check=False,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("shoal:")]
    assert lines and all("--split-at block9: no such unit" in line for line in lines), lines
    assert len(lines) <= 2  # once per rank, not once per restart
