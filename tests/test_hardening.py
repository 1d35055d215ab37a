"""Smaller security and robustness guarantees: what a run leaves on disk (the engine
driver's secret, a DataFrame's copy, the attempt count), where user code is imported
from, and a SIGTERM that arrives while the final checkpoint and summary are written."""

from __future__ import annotations

import importlib
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import LINEAR_JOB, read_summary, shoal_env, tables, train

SECRET = "5e" * 32


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- the driver's secret, for an engine's workers -----------------------------------------


@pytest.mark.timeout(30)
def test_the_drivers_secret_reaches_the_workers_through_a_private_file(tmp_path, monkeypatch):
    from shoal.layout import SECRET_FILE
    from shoal.net.wire import SECRET_ENV
    from shoal.run import engines

    monkeypatch.setenv(SECRET_ENV, SECRET)
    engines.give_secret(tmp_path)
    assert _mode(tmp_path / SECRET_FILE) == 0o600
    monkeypatch.delenv(SECRET_ENV)  # (a worker on a machine without it)
    engines._take_secret(tmp_path)
    assert os.environ[SECRET_ENV] == SECRET
    engines.take_back_secret(tmp_path)
    assert not (tmp_path / SECRET_FILE).exists()
    (tmp_path / SECRET_FILE).write_text("ab" * 32)  # a killed driver's, and none given now
    monkeypatch.delenv(SECRET_ENV)
    engines.give_secret(tmp_path)
    assert not (tmp_path / SECRET_FILE).exists()


# --- Ray's attempt count ------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_the_attempt_count_is_replaced_whole_not_rewritten_in_place(tmp_path):
    from shoal.layout import ATTEMPTS_FILE
    from shoal.run.engines import _next_attempt

    assert _next_attempt(tmp_path) == 0
    before = (tmp_path / ATTEMPTS_FILE).stat().st_ino
    assert _next_attempt(tmp_path) == 1
    # a new file renamed over the old one: a reader sees the old count or the new, whole
    assert (tmp_path / ATTEMPTS_FILE).stat().st_ino != before
    assert (tmp_path / ATTEMPTS_FILE).read_text() == "1\n"
    assert [p.name for p in tmp_path.iterdir()] == [ATTEMPTS_FILE]  # (no temp file left)


# --- a DataFrame's copy for Spark ---------------------------------------------------------


class _FakeFrame:
    """What shoal.spark asks of a DataFrame (``df.write.mode(m).parquet(path)``): writes
    real Parquet, and notes the directory's permissions as Spark finds them."""

    def __init__(self) -> None:
        self.seen_mode: int | None = None
        self.write = self

    def mode(self, how: str) -> _FakeFrame:
        return self

    def parquet(self, path: str) -> None:
        self.seen_mode = _mode(Path(path)) if Path(path).is_dir() else None
        Path(path).mkdir(exist_ok=True)
        x = [float(i % 7) for i in range(256)]
        pq.write_table(pa.table({"f0": x, "y": [2 * v for v in x]}), f"{path}/part-0.parquet")


def _spark_train(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, distribute, fails: bool = True
) -> Path:
    """``shoal.spark.train`` on a :class:`_FakeFrame`, with ``distribute`` in place of
    TorchDistributor (it ``fails``, or writes a summary); returns the run directory."""
    import shoal.spark

    monkeypatch.setattr(shoal.spark, "distribute", distribute)
    out = tmp_path / "run"
    df = _FakeFrame()
    flags = tables("--model", "linear", "--features", "f*", "--label", "y", "--steps", "5",
                   "--out", str(out), "--no-progress", "--no-report")  # fmt: skip
    if fails:
        with pytest.raises(RuntimeError, match="a Spark task failed"):
            shoal.spark.train(flags, data=df, num_processes=1)
    else:
        shoal.spark.train(flags, data=df, num_processes=1)
    assert df.seen_mode == 0o700, df.seen_mode  # only this user may read the rows
    return out


@pytest.mark.timeout(60)
def test_a_dataframes_copy_is_private_and_removed_when_the_run_ends(tmp_path, monkeypatch):
    def finishes(job, num_processes, local_mode):
        (Path(job.output.out) / "summary.json").write_text("{}")

    def fails_at_once(job, num_processes, local_mode):
        raise RuntimeError("a Spark task failed")

    out = _spark_train(tmp_path, monkeypatch, finishes, fails=False)
    assert not Path(f"{out}-data").exists()
    out = _spark_train(tmp_path / "failed", monkeypatch, fails_at_once)
    assert not Path(f"{out}-data").exists()  # (nothing to resume: no checkpoint)


@pytest.mark.timeout(60)
def test_a_failed_spark_run_with_a_checkpoint_keeps_its_rows_for_resume(tmp_path, monkeypatch):
    def fails_after_a_checkpoint(job, num_processes, local_mode):
        (Path(job.output.out) / "checkpoints" / "step-00000002").mkdir(parents=True)
        raise RuntimeError("a Spark task failed")

    out = _spark_train(tmp_path, monkeypatch, fails_after_a_checkpoint)
    data = Path(f"{out}-data")
    assert (data / "part-0.parquet").is_file() and _mode(data) == 0o700


# --- where user code is imported from -----------------------------------------------------


@pytest.mark.timeout(30)
def test_a_module_in_the_working_directory_cannot_shadow_the_standard_library(
    tmp_path, monkeypatch
):
    from shoal.registry import import_ref

    (tmp_path / "colorsys.py").write_text("raise ImportError('the cwd shadowed colorsys')\n")
    (tmp_path / "shoal_user_model_x.py").write_text("def build(*a):\n    return 42\n")
    monkeypatch.chdir(tmp_path)
    # (as the `shoal` command starts: its script's directory first, not the cwd)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "colorsys", raising=False)
    importlib.invalidate_caches()
    try:
        assert import_ref("shoal_user_model_x:build", "model")() == 42  # still found
        colorsys = importlib.import_module("colorsys")
        assert Path(colorsys.__file__).parent != tmp_path and hasattr(colorsys, "rgb_to_hls")
    finally:
        sys.modules.pop("shoal_user_model_x", None)
        sys.modules.pop("colorsys", None)


# --- a SIGTERM while the final checkpoint and summary are written -------------------------


@pytest.mark.timeout(30)
def test_a_fault_can_fire_as_training_ends():
    from shoal.faults import END, parse

    (fault,) = parse("term:rank=1:step=end")
    assert (fault.kind, fault.rank, fault.step) == ("term", 1, END)
    with pytest.raises(ValueError, match=re.escape("must look like term:rank=R:step=S|end")):
        parse("term:rank=1:step=later")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_sigterm_during_the_final_checkpoint_finishes_it_then_exits_143(tmp_path):
    """Rank 1 is sent SIGTERM after its last step, before the final checkpoint and
    summary: both are written, then every rank stops as a preempted one does."""
    out = tmp_path / "run"
    job = [*LINEAR_JOB, "--steps", "20", "--workers", "2"]
    proc = train(out, *job, env={"SHOAL_FAULT": "term:rank=1:step=end"}, check=False)
    assert proc.returncode == 143, proc.stderr
    assert "shoal: preempted (SIGTERM): every worker stopped after step 20" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert (out / "faults" / "term-rank1-stepend").exists()  # (the signal was sent)
    s = read_summary(out)
    assert s["steps"] == 20 and all(e["exact"] for e in s["epochs"])
    assert (out / "model.safetensors").is_file()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000020"]
    (record,) = [json.loads(line) for line in (out / "preempted.jsonl").read_text().splitlines()]
    assert record["step"] == 20 and record["signal"] == "SIGTERM"


# --- the launcher's stop, landing where Python drops exceptions ---------------------------

STOP_IN_A_FINALIZER = """
import os, signal, time
from torch.distributed.elastic.multiprocessing import api
from shoal import launch

launch._pass_ctrl_c_on_as_sigterm()
signal.signal(signal.SIGTERM, api._terminate_process_handler)  # (as the agent does)


class Dropped:
    def __del__(self):  # (a Connection's, closed by the garbage collector)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)  # the handler runs here: inside the finalizer


try:
    x = Dropped()
    del x
    time.sleep(2)
    print("not stopped")
except api.SignalException as e:
    print("stopped by", e.sigval.name)
"""


@pytest.mark.timeout(60)
def test_a_stop_that_lands_in_a_finalizer_still_stops_the_launcher_and_prints_no_traceback():
    """The launcher stops its agent with SIGTERM, whose handler raises in the main thread
    wherever it is; in a finalizer run by the garbage collector Python prints the
    exception as "Exception ignored in ..." with a traceback and drops it (seen once under
    a refused job). The stop must still come, and no traceback be shown."""
    proc = subprocess.run(
        [sys.executable, "-c", STOP_IN_A_FINALIZER],
        env=shoal_env(), capture_output=True, text=True, timeout=50,
    )  # fmt: skip
    assert proc.stdout.strip() == "stopped by SIGTERM", (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr
