"""Streaming DiLoCo: fragments on a staggered schedule, exchanges overlapped with the
inner steps, quantized outer updates, and the points where the replicas meet in full."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.conftest import (
    free_port,
    max_abs_diff,
    params,
    read_summary,
    shared_run,
    shoal_env,
    train,
)

pytestmark = pytest.mark.slow  # trains through the launcher: not in the quick tier

LM = ["--model", "transformer", "--hidden", "64", "--layers", "2", "--heads", "4"]
LM += ["--context", "32", "--batch-size", "24", "--optimizer", "adamw", "--lr", "0.003"]
STREAM = ["--strategy", "diloco", "--sync-every", "8", "--fragments", "4", "--overlap", "2"]
SGD_STREAM = [*LM, *STREAM, "--steps", "40", "--workers", "2", "--compress", "int8"]
SGD_STREAM += ["--optimizer", "sgd", "--lr", "0.3"]
"""A streaming job whose inner optimizer keeps no state: a replica that takes another's
state (a spare, a resumed run) goes on as the replica it replaces would have."""


@pytest.fixture(scope="session")
def sgd_stream_unbroken(tmp_path_factory: pytest.TempPathFactory):
    """SGD_STREAM, meeting in full at its checkpoints (every 16 steps), never stopped."""
    make = lambda out: train(out, *SGD_STREAM, "--checkpoint-every", "16")  # noqa: E731
    return shared_run(tmp_path_factory, "sgd-stream-unbroken", make)


@pytest.mark.timeout(240)
def test_quantized_outer_updates_keep_the_perplexity_and_send_a_quarter_or_an_eighth(
    tmp_path,
):
    """The same streaming job (4 fragments, exchanges 2 steps behind) with float32,
    int8 and int4 outer updates: held-out perplexity within 2% of float32 after the same
    steps; each fragment's exchange carries a byte (int8) or half a byte (int4) per
    parameter, plus a scale per 1,024."""
    runs = {}
    for codec in ("none", "int8", "int4"):
        out = tmp_path / codec
        train(out, *LM, *STREAM, "--steps", "160", "--workers", "2", "--compress", codec)
        runs[codec] = read_summary(out)
    base = runs["none"]["test_perplexity"]
    assert base < 0.6 * runs["none"]["unigram_perplexity"]  # (it learned something)
    for codec in ("int8", "int4"):
        assert abs(runs[codec]["test_perplexity"] / base - 1) < 0.02, (codec, runs[codec])
    f32 = runs["none"]["synchronization"]
    assert f32["fragments"] == 4 and f32["syncs"] == 4 * 160 // 8 - 1  # (the last: in full)
    assert f32["meetings"] == 1 and f32["meet_every"] == 0  # (after the last step alone)
    sizes = f32["fragment_bytes"]
    assert max(sizes) < 1.6 * min(sizes), sizes  # about equal bytes
    assert f32["bytes_per_sync"] == sizes  # 2 ranks: a ring all-reduce sends the fragment
    for codec, per_byte in (("int8", 4), ("int4", 8)):
        sync = runs[codec]["synchronization"]
        for whole, sent in zip(sizes, sync["bytes_per_sync"]):
            n = whole // 4
            scales = 4 * math.ceil(n / 1024)
            assert sent == math.ceil(whole / per_byte) + scales, (codec, whole, sent)
        assert all(0 < u <= 1 for u in sync["compute_utilisation"])


@pytest.mark.timeout(240)
def test_three_hosts_end_where_one_host_ends(tmp_path):
    """3 workers in one launcher, and 3 launchers of one worker each (nodes on loopback):
    the schedule is a function of the step, not of when an exchange lands, so both end
    with the same parameters; and with 1 fragment, no overlap and no codec the
    streaming flags are plain DiLoCo's blocking synchronization."""
    job = [*LM, "--steps", "48", "--strategy", "diloco", "--sync-every", "6"]
    job += ["--fragments", "3", "--overlap", "2", "--compress", "int4"]
    train(tmp_path / "one", *job, "--workers", "3")
    endpoint = f"127.0.0.1:{free_port()}"
    node = ["--workers", "1", "--nnodes", "3", "--rdzv-endpoint", endpoint]
    # each node on one core, as the one host's 3 workers on 2 cores get one thread each:
    # a matrix product's sums in another order would differ in the last bits
    procs = []
    for rank in range(3):
        out = tmp_path / ("three" if rank == 0 else f"node{rank}")
        cmd = ["taskset", "-c", str(rank % 2), sys.executable, "-m", "shoal", "train"]
        cmd += ["--out", str(out), "--no-progress", "--no-report", *job, *node]
        procs.append(subprocess.Popen(
            [*cmd, "--node-rank", str(rank)], env=shoal_env(None),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        ))  # fmt: skip
    for proc in procs:
        _, err = proc.communicate(timeout=200)
        assert proc.returncode == 0, err
    assert max_abs_diff(params(tmp_path / "one"), params(tmp_path / "three")) < 1e-6
    plain = [*LM, "--steps", "24", "--workers", "2", "--strategy", "diloco"]
    train(tmp_path / "plain", *plain)
    train(tmp_path / "flags", *plain, "--fragments", "1", "--overlap", "0")
    assert max_abs_diff(params(tmp_path / "plain"), params(tmp_path / "flags")) == 0


@pytest.mark.timeout(240)
def test_a_lost_worker_goes_back_to_the_last_full_meeting(tmp_path, sgd_stream_unbroken):
    """In place, with a spare: slot 1 is SIGKILLed after step 21 of a streaming job that
    meets in full every 16 steps (--meet-every: no checkpoint is written); the others
    keep their processes, go back to step 16 (model, inner and outer optimizers,
    fragments' anchors), the spare takes slot 1's place, and the job ends at the
    parameters of the unfailed run that meets at its checkpoints instead, with every
    epoch's samples once. (Exactly so with an inner optimizer that keeps no state: with
    Adam the spare's would be a survivor's, as on a resume from a checkpoint.)"""
    out = tmp_path / "failed"
    proc = train(
        out, *SGD_STREAM, "--meet-every", "16", "--recovery", "inplace", "--spares", "1",
        env={"SHOAL_FAULT": "crash:rank=1:step=21"},
    )  # fmt: skip
    saved = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert saved == ["step-00000040"], saved  # (the last step's, as every run has)
    gens = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert gens[1]["lost"] == ["1.0"] and gens[1]["step"] == 16, gens
    assert gens[1]["pids"]["0.0"] == gens[0]["pids"]["0.0"], proc.stderr
    s = read_summary(out)
    assert s["steps"] == 40 and all(e["exact"] for e in s["epochs"]), s["epochs"]
    # rank 0 met at 16 (then went back there), 32 and after step 40
    assert s["synchronization"]["meetings"] == 3, s["synchronization"]
    assert max_abs_diff(params(out), params(sgd_stream_unbroken)) < 1e-5


@pytest.mark.timeout(120)
def test_streaming_flags_that_cannot_work_are_refused_in_one_line(tmp_path):
    four = ["--sync-every", "8", "--fragments", "4"]
    for i, (args, needle) in enumerate((
        (["--sync-every", "8", "--fragments", "3"], "--fragments 3 must divide --sync-every 8"),
        (["--sync-every", "8", "--fragments", "4", "--overlap", "3"], "--overlap 3 must be"),
        (["--fragments", "8", "--sync-every", "8", "--model", "linear"], "only 2 parameter"),
        (["--meet-every", "16"], "--meet-every 16 is for streaming"),
        ([*four, "--meet-every", "12"], "--meet-every 12 must be a multiple of --sync-every"),
        ([*four, "--meet-every", "16", "--checkpoint-every", "24"], "be a multiple of --meet"),
        ([*four, "--recovery", "inplace"], "set --meet-every or --checkpoint-every"),
    )):  # fmt: skip
        proc = train(tmp_path / f"run{i}", "--strategy", "diloco", *args, check=False)
        assert proc.returncode != 0 and needle in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.timeout(240)
def test_a_worker_lost_and_one_joining_later_never_stop_the_others(tmp_path):
    """3 workers of a streaming job; worker 1 is SIGKILLed after step 21. The two others
    keep their processes and go on from the full meeting of step 16 without it; its
    replacement joins later, at a full meeting; the job finishes, and every epoch's
    samples are counted once. (How long the others' steps took around the loss is
    measured by bench/streaming_elastic.py, not asserted here.)"""
    job = [*LM, *STREAM, "--steps", "80", "--workers", "3", "--compress", "int8"]
    job += ["--checkpoint-every", "16"]
    out = tmp_path / "run"
    proc = train(out, *job, env={"SHOAL_FAULT": "crash:rank=1:step=21"})
    gens = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert gens[1]["lost"] == ["1.0"] and gens[1]["step"] == 16, gens
    assert len(gens[1]["members"]) == 2, gens
    assert sorted(gens[2]["members"]) == ["0.0", "1.1", "2.0"], gens
    assert gens[2]["step"] >= 32 and gens[2]["step"] % 16 == 0, gens
    for g in gens[1:]:
        assert all(g["pids"][u] == gens[0]["pids"][u] for u in ("0.0", "2.0")), proc.stderr
    s = read_summary(out)
    assert s["steps"] == 80 and all(e["exact"] for e in s["epochs"]), s["epochs"]


@pytest.mark.timeout(240)
def test_a_preemption_stops_at_a_meeting_that_saves_nothing_and_resumes_exactly(
    tmp_path, sgd_stream_unbroken
):
    """SIGTERM after step 10 of a streaming job (int8) that meets every 16 steps and
    checkpoints only at the end: every worker trains on to a meeting (the ranks agree on
    the signal in the background, so it is one of the next), the checkpoint is written
    there, and the resumed run ends at the parameters of the run that was never stopped
    and met at its checkpoints (a meeting leaves nothing in any codec; the checkpoint
    keeps rank 0's inner optimizer for every replica, so exactly so with one that keeps
    no state)."""
    out = tmp_path / "run"
    # (slowed: the run outlasts the ranks' agreement on the signal)
    fault = {"SHOAL_FAULT": "slow:rank=*:ms=20;term:rank=1:step=10"}
    proc = train(out, *SGD_STREAM, "--meet-every", "16", env=fault, check=False)
    assert proc.returncode == 143, proc.stderr
    (record,) = [json.loads(line) for line in (out / "preempted.jsonl").read_text().splitlines()]
    stop = record["step"]
    assert stop in (16, 32), record
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step-{stop:08d}"]
    train(out, "--resume", str(out))
    s = read_summary(out)
    assert s["resumed_from_step"] == stop and s["steps"] == 40, s
    assert all(e["exact"] for e in s["epochs"]), s["epochs"]
    assert max_abs_diff(params(out), params(sgd_stream_unbroken)) < 1e-6
