"""In-place recovery (``--recovery inplace``): a lost worker does not stop the others."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import max_abs_diff, params, read_summary, train

pytestmark = pytest.mark.slow

JOB = ["--model", "mlp", "--workers", "4", "--steps", "300", "--batch-size", "64"]


@pytest.fixture(scope="module")
def unfailed(tmp_path_factory):
    """The job run without failures (and without in-place recovery)."""
    out = tmp_path_factory.mktemp("unfailed") / "run"
    train(out, *JOB)
    return out


@pytest.mark.timeout(180)
def test_a_killed_worker_leaves_the_others_running_and_the_run_ends_where_unfailed(
    tmp_path, unfailed
):
    """Slot 1 is SIGKILLed after step 50: the three others keep their processes and redo
    step 51 with the spare (``--spares 1``), which gets the state from a live peer, and
    the job ends at the unfailed run's parameters, every epoch's samples once."""
    out = tmp_path / "inplace"
    job = [*JOB, "--recovery", "inplace", "--spares", "1"]
    proc = train(out, *job, env={"SHOAL_FAULT": "crash:rank=1:step=50"})
    gens = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    first, without = gens[0], gens[1]
    assert first["members"] == ["0.0", "1.0", "2.0", "3.0"]  # (the spare, slot 4, waits)
    assert without["lost"] == ["1.0"] and without["step"] == 50  # (step 51 trained again)
    survivors = [u for u in first["members"] if u != "1.0"]
    assert without["members"] == ["0.0", "4.0", "2.0", "3.0"]  # (in the lost one's place)
    assert without["needs_state"] == ["4.0"]
    assert without["source"] in survivors
    assert all(g["pids"][u] == first["pids"][u] for g in gens for u in survivors)  # kept
    assert "the others go on without it" in proc.stderr
    s = read_summary(out)
    assert s["world_size"] == 4 and s["steps"] == 300
    assert all(e["exact"] for e in s["epochs"]), s["epochs"]
    assert s["samples_per_epoch"] == read_summary(unfailed)["samples_per_epoch"]
    assert max_abs_diff(params(out), params(unfailed)) < 1e-5


@pytest.mark.timeout(180)
def test_a_stopped_worker_is_dropped_within_the_heartbeat_timeout_and_the_run_stays_exact(
    tmp_path, unfailed
):
    """Slot 2 SIGSTOPs itself after step 80: the launcher kills it within
    ``--heartbeat-timeout`` plus a second, the others go on without restarting, and the
    samples and parameters are those of an unfailed run."""
    out = tmp_path / "inplace"
    job = [*JOB, "--heartbeat-timeout", "2"]
    proc = train(out, *job, "--recovery", "inplace", env={"SHOAL_FAULT": "hang:rank=2:step=80"})
    gens = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    stopped = (out / "faults" / "hang-rank2-step80").stat().st_mtime
    without = next(g for g in gens if "2.0" in g["lost"])
    assert without["formed_at"] - stopped < 2 + 1, without["formed_at"] - stopped
    assert "worker 2.0" in proc.stderr and "is hung" in proc.stderr
    kept = [u for u in without["members"] if u in gens[0]["pids"]]
    assert len(kept) == 3 and all(without["pids"][u] == gens[0]["pids"][u] for u in kept)
    s = read_summary(out)
    assert all(e["exact"] for e in s["epochs"]), s["epochs"]
    assert max_abs_diff(params(out), params(unfailed)) < 1e-5


def _slot_1_killed_with_a_spare(tmp_path, job: list[str], step: int) -> tuple[Path, dict]:
    """``job`` unfailed (in ``tmp_path/unfailed``), then in place with a spare while slot
    1 is SIGKILLed after ``step``: the spare takes its place, the survivors keep their
    processes. Returns the run directory and the generation without slot 1."""
    train(tmp_path / "unfailed", *job)
    out = tmp_path / "inplace"
    proc = train(
        out, *job, "--recovery", "inplace", "--spares", "1",
        env={"SHOAL_FAULT": f"crash:rank=1:step={step}"},
    )  # fmt: skip
    gens = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    without = gens[1]
    assert without["lost"] == ["1.0"] and "the others go on without it" in proc.stderr
    assert without["members"] == ["0.0", "4.0", "2.0", "3.0"], without  # (in slot 1's place)
    assert all(without["pids"][u] == gens[0]["pids"][u] for u in ("0.0", "2.0", "3.0"))
    return out, without


PERIODIC = ["--model", "mlp", "--workers", "4", "--steps", "160", "--batch-size", "64"]


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "strategy",
    [["local-sgd"], ["diloco", "--optimizer", "sgd"]],  # (see below)
    ids=["local-sgd", "diloco"],
)
def test_a_periodic_job_goes_back_to_its_last_synchronization_and_ends_where_unfailed(
    tmp_path, strategy
):
    """Local SGD and DiLoCo (replicas meet every 8 steps): slot 1 is SIGKILLed after step
    50; the survivors go back to the synchronization of step 48 (the model then, each
    its own inner optimizer as it was), the spare takes slot 1's place with a survivor's
    state, steps 49-50 are trained again, and the job ends at the unfailed run's
    parameters with every epoch's samples once. (Exactly so where the inner optimizer
    keeps no state: with momentum or Adam the spare's is a survivor's, as on a resume
    from a checkpoint.)"""
    job = [*PERIODIC, "--strategy", *strategy, "--sync-every", "8"]
    out, without = _slot_1_killed_with_a_spare(tmp_path, job, 50)
    assert without["step"] == 48, without
    s = read_summary(out)
    assert s["steps"] == 160 and all(e["exact"] for e in s["epochs"]), s["epochs"]
    assert s["samples_per_epoch"] == read_summary(tmp_path / "unfailed")["samples_per_epoch"]
    assert max_abs_diff(params(out), params(tmp_path / "unfailed")) < 1e-5


@pytest.mark.timeout(180)
def test_a_federated_round_whose_process_is_lost_is_trained_again_with_all_its_clients(
    tmp_path,
):
    """FedAvg simulated on 4 processes, 8 clients: slot 1 is SIGKILLed after round 5;
    the survivors redo round 6 with the spare in its place (every client of the round,
    the lost process's too), and the job ends at the unfailed run's model with every
    client update once."""
    job = ["--model", "linear", "--data", "synthetic-linear", "--num-samples", "1000",
           "--strategy", "fedavg", "--clients", "8", "--local-steps", "2",
           "--batch-size", "16", "--steps", "12", "--workers", "4"]  # fmt: skip
    out, without = _slot_1_killed_with_a_spare(tmp_path, job, 5)
    assert without["step"] == 5, without
    got, want = read_summary(out), read_summary(tmp_path / "unfailed")
    assert got["federated"]["rounds"] == want["federated"]["rounds"] == 12
    assert got["federated"]["client_updates"] == want["federated"]["client_updates"] == 96
    assert max_abs_diff(params(out), params(tmp_path / "unfailed")) < 1e-5


ADAM = ["--model", "mlp", "--optimizer", "adam", "--lr", "0.003", "--steps", "80"]
ADAM += ["--batch-size", "64"]
HSDP = [*ADAM, "--strategy", "fsdp", "--mesh", "dp=2,fsdp=2", "--workers", "4"]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The HSDP job's training on one process: the same global batches and Adam."""
    out = tmp_path_factory.mktemp("single") / "run"
    train(out, *ADAM, "--workers", "1")
    return out


@pytest.mark.timeout(180)
def test_hsdp_takes_a_lost_worker_s_shard_from_its_replica(tmp_path, single):
    """fsdp with a replicated dimension (--mesh dp=2,fsdp=2): slot 1 is SIGKILLed after
    step 40; the others keep their processes and wait for its replacement, which
    receives slot 1's shard of the parameters and Adam state from slot 3 (the same
    shard in the other replica), and the run ends at the one-process run's parameters
    with every epoch's samples once."""
    out = tmp_path / "hsdp"
    proc = train(out, *HSDP, env={"SHOAL_FAULT": "crash:rank=1:step=40"})
    gens = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 2, gens
    first, second = gens
    assert second["members"] == ["0.0", "1.1", "2.0", "3.0"] and second["step"] == 40
    assert second["lost"] == ["1.0"] and second["needs_state"] == ["1.1"]
    assert all(second["pids"][u] == first["pids"][u] for u in ("0.0", "2.0", "3.0"))
    assert "restart" not in proc.stderr, proc.stderr
    s = read_summary(out)
    assert all(e["exact"] for e in s["epochs"]), s["epochs"]
    assert max_abs_diff(params(out), params(single)) < 1e-5


@pytest.mark.timeout(180)
def test_hsdp_that_lost_every_copy_of_a_shard_starts_again_from_its_checkpoint(tmp_path, single):
    """Slots 0 and 2 (both copies of shard 0) are lost in one step: nothing holds that
    shard, so every worker starts again from the newest checkpoint, in place, and the run
    still ends at the one-process run's parameters."""
    out = tmp_path / "hsdp"
    fault = "crash:rank=0:step=45;crash:rank=2:step=45"
    proc = train(out, *HSDP, "--checkpoint-every", "20", env={"SHOAL_FAULT": fault})
    assert "every copy of shard 0 is lost" in proc.stderr, proc.stderr
    gens = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert gens[-1]["step"] == -1 and len(gens[-1]["members"]) == 4, gens
    s = read_summary(out)
    assert all(e["exact"] for e in s["epochs"]), s["epochs"]
    assert max_abs_diff(params(out), params(single)) < 1e-5
