"""In-place recovery (``--recovery inplace``): a lost worker does not stop the others."""

from __future__ import annotations

import json

import pytest

from tests.conftest import max_abs_diff, params, read_summary, train

pytestmark = pytest.mark.slow

JOB = ["--model", "mlp", "--workers", "4", "--steps", "300", "--batch-size", "64"]


@pytest.mark.timeout(180)
def test_a_killed_worker_leaves_the_others_running_and_the_run_ends_where_unfailed(tmp_path):
    """Slot 1 is SIGKILLed after step 50: the three others keep their processes and redo
    step 51 on three, a replacement gets the state from a live peer and joins at a
    later step boundary, and the job ends at the unfailed run's parameters, every
    epoch's samples once."""
    unfailed, out = tmp_path / "unfailed", tmp_path / "inplace"
    train(unfailed, *JOB)
    proc = train(out, *JOB, "--recovery", "inplace", env={"SHOAL_FAULT": "crash:rank=1:step=50"})
    gens = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    first, without, rejoined = gens[0], gens[1], gens[-1]
    assert first["members"] == ["0.0", "1.0", "2.0", "3.0"]
    assert without["lost"] == ["1.0"] and without["step"] == 50  # (step 51 trained again)
    survivors = [u for u in first["members"] if u != "1.0"]
    assert all(without["pids"][u] == first["pids"][u] for u in survivors)  # not restarted
    assert all(rejoined["pids"][u] == first["pids"][u] for u in survivors)
    assert "1.1" in rejoined["members"] and rejoined["needs_state"] == ["1.1"]
    assert rejoined["source"] in survivors and rejoined["step"] > 50
    assert "the others go on without it" in proc.stderr
    s = read_summary(out)
    assert s["world_size"] == 4 and s["steps"] == 300
    assert all(e["exact"] for e in s["epochs"]), s["epochs"]
    assert s["samples_per_epoch"] == read_summary(unfailed)["samples_per_epoch"]
    assert max_abs_diff(params(out), params(unfailed)) < 1e-5
