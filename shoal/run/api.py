"""``shoal.train(job, **overrides)``: a job trained from Python, as ``shoal train``
trains it, with its result handed back.

::

    import shoal

    result = shoal.train(
        {"model": {"name": "mlp"}, "cluster": {"workers": 4}},
        train={"steps": 500}, optim={"name": "adam", "lr": 0.003},
    )
    result.summary["test_accuracy"]      # 0.97...
    result.metrics                       # one row per log window (a DataFrame with pandas)
    result.model_path                    # RUN_DIR/model.safetensors

The job is checked here, in this process (a mistake raises
:class:`~shoal.errors.UserError` with the line ``shoal train`` prints); the run
directory is taken here; the workers are started by shoal's launcher in a new
Python process of their own (its output relayed here), so that what this process
holds (threads, an OpenMP pool, signal handlers, a notebook's event loop) never
reaches them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from shoal.config import JobConfig, public_fields
from shoal.data import forget_datasets
from shoal.errors import TrainingFailed, UserError
from shoal.layout import METRICS_FILE, MODEL_FILE, SUMMARY_FILE, USER_ERROR_FILE
from shoal.run.directory import prepare_run_dir
from shoal.run.resolve import Request, as_config, resolve_job
from shoal.run.summary import finish

SECTIONS = tuple(f.name for f in dataclasses.fields(JobConfig))


@dataclass
class Result:
    """A finished run: where it is and what it measured."""

    run_dir: Path
    summary: dict[str, Any]
    """What ``RUN_DIR/summary.json`` holds: ``final_loss``, ``test_loss`` and the other
    evaluations, ``epochs`` (per-epoch sample digests), ``bytes_sent_total``,
    ``wall_time_s``, ..."""
    model_path: Path | None
    """The final model (safetensors), where the job wrote one."""
    job: JobConfig = field(repr=False)
    """The job as resolved and run (``RUN_DIR/config.toml``)."""

    @property
    def metrics(self) -> Any:
        """The metric records (``metrics.jsonl``), one row per log window or evaluation:
        a pandas DataFrame where pandas is installed, else a list of dicts."""
        path = self.run_dir / METRICS_FILE
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        try:
            import pandas
        except ImportError:
            return rows
        return pandas.DataFrame(rows)

    def __getitem__(self, key: str) -> Any:
        """``result["test_accuracy"]``: a number of the summary."""
        return self.summary[key]


def train(job: JobConfig | Mapping[str, Any] | str | os.PathLike, /, **overrides: Any) -> Result:
    """Train ``job`` on this machine, as ``shoal train`` would, and return its
    :class:`Result`.

    ``job``: a :class:`~shoal.config.JobConfig`, the job file's tables as a dict
    (``{"model": {"name": "mlp"}, "train": {"steps": 200}}``), or a job file's path.
    ``overrides`` set values over it by their TOML names, as flags do over ``--config``:
    a section's table (``train={"steps": 500}``, ``strategy={"name": "diloco",
    "diloco": {"sync_every": 8}}``) or one dotted name (``**{"train.steps": 500}``).

    Raises :class:`~shoal.errors.UserError` (one line, as ``shoal train`` prints it) for a
    mistake in the job, :class:`~shoal.errors.TrainingFailed` when the training failed
    (with the exception a worker raised, where one did), ``KeyboardInterrupt`` after
    Ctrl-C (the workers stop at a common step and checkpoint it, as under ``shoal
    train``).
    """
    request = Request(config=as_config(job), given=_given(overrides))
    try:
        resolved = resolve_job(request)
    finally:
        forget_datasets()  # (the workers build their own: this process keeps none)
    if resolved.cluster.engine != "shoal":
        from shoal.run import engines

        engines.check_for_engine(resolved, request, resolved.cluster.engine)
        run = engines.run_on_ray if resolved.cluster.engine == "ray" else engines.run_on_spark
        if run(resolved) != 0:
            raise TrainingFailed(f"the {resolved.cluster.engine} job failed (said above)")
        return _result(resolved)
    config_path, lock = prepare_run_dir(resolved)
    try:
        code, line = _launch_apart(config_path)
    finally:
        if lock is not None:
            lock.release()
    out = Path(resolved.output.out)
    if code == 2 and (out / USER_ERROR_FILE).is_file():
        raise UserError((out / USER_ERROR_FILE).read_text().strip())
    if code != 0:
        raise TrainingFailed(line or f"the launcher exited with status {code}", _raised(out))
    finish(resolved, table=resolved.output.progress)
    return _result(resolved)


def _given(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``train={"steps": 5}`` and ``**{"train.steps": 5}`` as :attr:`Request.given`."""
    given: dict[str, Any] = {}
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if section not in SECTIONS:
            raise UserError(f"unknown section {section!r}; known: {', '.join(SECTIONS)}")
        if name:
            values = {name: value}
        elif isinstance(value, Mapping):
            values = dict(value)
        else:
            raise UserError(f"{key}= must be a table of [{key}]'s keys, like {key}={{...}}")
        common = {f.name for f in public_fields(getattr(JobConfig(), section))}
        for k, v in values.items():
            rest = k.partition(".")[2]
            if section == "strategy" and (isinstance(v, Mapping) or rest):
                options = v if isinstance(v, Mapping) else {rest: v}
                given.update({f"option.{o}": x for o, x in options.items()})
            elif k not in common:
                raise UserError(f"unknown key {k!r} in [{section}]; known: {', '.join(common)}")
            elif (section, k) == ("cluster", "nnodes"):
                given[f"{section}.{k}"] = (0, v) if isinstance(v, int) else tuple(v)
            else:
                given[f"{section}.{k}"] = v
    return given


def _launch_apart(config_path: Path) -> tuple[int, str]:
    """shoal's launcher in a new Python (``python -m shoal.run.local CONFIG``), its output
    relayed to this process's; the exit status and its last error line."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_CPP_LOG_LEVEL": "ERROR"}
    proc = subprocess.Popen(
        [sys.executable, "-u", "-m", "shoal.run.local", str(config_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
        bufsize=1,
        start_new_session=True,  # (Ctrl-C here is passed on once, below, not twice)
    )
    last: list[str] = []
    relays = [
        threading.Thread(target=_relay, args=(proc.stdout, sys.stdout, []), daemon=True),
        threading.Thread(target=_relay, args=(proc.stderr, sys.stderr, last), daemon=True),
    ]
    for t in relays:
        t.start()

    def pass_on(signum: int, frame: Any) -> None:  # a scheduler's SIGTERM: theirs too
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signum)

    main = threading.current_thread() is threading.main_thread()
    term = signal.signal(signal.SIGTERM, pass_on) if main else None
    interrupted = False
    try:
        while True:
            try:
                code = proc.wait()
                break
            except KeyboardInterrupt:
                with contextlib.suppress(ProcessLookupError):  # a second Ctrl-C: at once
                    os.killpg(proc.pid, signal.SIGKILL if interrupted else signal.SIGINT)
                interrupted = True
    finally:
        if term is not None:
            signal.signal(signal.SIGTERM, term)
        for t in relays:
            t.join(timeout=5)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    if interrupted:
        raise KeyboardInterrupt
    ends = ("shoal: error: ", "shoal: preempted", "shoal: interrupted")
    said = [line for line in last if line.startswith(ends)]
    if not said:
        return code, ""
    return code, said[-1].removeprefix("shoal: error: ").removeprefix("shoal: ").strip()


def _relay(source: IO[str] | None, sink: Any, keep: list[str]) -> None:
    if source is None:
        return
    for line in source:
        keep.append(line)
        del keep[:-20]
        sink.write(line)
        sink.flush()


def _raised(out: Path) -> Any:
    """The first exception a worker raised, where one did (see :mod:`shoal.failure`)."""
    from shoal import failure
    from shoal.layout import FAILURES_DIR

    found = []
    for path in sorted((out / FAILURES_DIR).glob("*.json")):
        role, _, rank = path.stem.rpartition("-")
        record = failure.read(out / FAILURES_DIR, role, int(rank))
        if record is not None:
            found.append(record)
    return min(found, key=lambda f: f.time) if found else None


def _result(job: JobConfig) -> Result:
    out = Path(job.output.out)
    summary = json.loads((out / SUMMARY_FILE).read_text())
    model = out / MODEL_FILE
    return Result(out, summary, model if model.is_file() else None, job)
