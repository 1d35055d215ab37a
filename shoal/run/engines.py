"""shoal on Ray and Spark: the engine starts (and restarts) the processes, shoal
trains in them.

The driver (``shoal train --engine ray|spark``, or a user's script through
:mod:`shoal.ray` and :mod:`shoal.spark`) resolves and checks the job and takes
the run directory, as ``shoal train`` does, and holds it until it exits. The
engine runs :func:`engine_rank` in each of its worker processes: they join the
process group the engine made (Ray) or the one torchrun's environment describes
(TorchDistributor), and train as guests (:func:`shoal.run.guest.run_ranks`).
When Ray restarts the workers after a failure, they resume from the run's newest
checkpoint. The run directory must be where every worker can reach it (one
machine, or a shared filesystem).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shoal import checkpoint, rundir
from shoal.config import JobConfig
from shoal.dist import init
from shoal.errors import UserError
from shoal.jobfile import dumps_toml, loads_toml
from shoal.layout import ATTEMPTS_FILE, SECRET_FILE, SUMMARY_FILE, USER_ERROR_FILE, write_atomic
from shoal.net.wire import OLD_SECRET_ENV, SECRET_ENV, secret_hex
from shoal.run.directory import prepare_run_dir
from shoal.run.guest import continued, fit_to_launcher, run_ranks
from shoal.run.resolve import Request, as_config, layered, resolve_job
from shoal.run.summary import finish
from shoal.strategies import resolve as plugin_of

JobLike = JobConfig | Mapping | str | os.PathLike
"""A job as the engines' functions take it: a :class:`~shoal.config.JobConfig`, its TOML
sections as a dict, or a job file."""

_HELD: dict[str, rundir.RunLock] = {}
"""Run directories this driver holds, by path, until it exits or :func:`release`."""


# --- the driver ---------------------------------------------------------------------


def resolve(job: JobLike, engine: str, given: Mapping[str, Any] | None = None) -> JobConfig:
    """The job, resolved and checked as ``shoal train`` would, for ``engine``; ``given``:
    values set by name over it (``{"cluster.workers": 4}``)."""
    config, given = as_config(job), dict(given or {})
    output = layered(Request(config=config))[0].output
    for name in ("resume", "auto_resume"):  # (the job is all these callers can give)
        if getattr(output, name) and f"output.{name}" not in given:
            given[f"output.{name}"] = getattr(output, name)
    request = Request(config=config, given=given, guest=engine)
    return check_for_engine(resolve_job(request), request, engine)


def check_for_engine(job: JobConfig, request: Request, engine: str) -> JobConfig:
    """Refuse what the engine decides itself; make paths absolute (the engine's
    workers start in directories of their own)."""
    for name in ("nnodes", "node_rank", "rdzv_endpoint"):
        if request.gave("cluster", name):
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag}: under --engine {engine} the engine places the workers on "
                            f"its machines; drop {flag}")  # fmt: skip
    job.cluster.engine = engine
    job.output.out = os.path.abspath(job.output.out)
    if job.output.resume:
        job.output.resume = job.output.out
    if job.data.name.startswith("parquet:"):
        job.data.name = "parquet:" + os.path.abspath(job.data.name.removeprefix("parquet:"))
    return job


def take_run_dir(job: JobConfig) -> str:
    """Take the run directory for the driver's lifetime; the job as its workers read it."""
    _, lock = prepare_run_dir(job, own_port=False)
    if lock is not None:
        _HELD[job.output.out] = lock
    return dumps_toml(job)


def release(job: JobConfig) -> None:
    """Let go of the run directory (the engine's job ended)."""
    lock = _HELD.pop(job.output.out, None)
    if lock is not None:
        lock.release()


def has_checkpoint(job: JobConfig) -> bool:
    """Whether the run has a checkpoint to resume from."""
    return bool(checkpoint.list_checkpoints(plugin_of(job).checkpoint_root(Path(job.output.out))))


def outcome(job: JobConfig, error: BaseException | None, engine: str) -> int:
    """The exit code of an engine's job, with one line for a failure; the summary
    table and report of a finished one."""
    out = Path(job.output.out)
    if error is not None or not (out / SUMMARY_FILE).is_file():
        if (out / USER_ERROR_FILE).is_file():
            print(f"shoal: error: {(out / USER_ERROR_FILE).read_text().strip()}", file=sys.stderr)
            return 2
        why = str(error).strip().splitlines()[-1][:300] if error else "no summary was written"
        print(f"shoal: error: training failed under {engine}: {why}", file=sys.stderr)
        return 1
    finish(job, report=False)  # (rank 0 wrote the report)
    return 0


# --- the workers ----------------------------------------------------------------------


def engine_rank(text: str, restarts: bool) -> tuple[int, dict[str, Any] | None]:
    """One worker process of an engine's job (``text``: the job as TOML). Returns the
    exit code and the summary (every rank: TorchDistributor keeps whichever rank's
    return value it reads last). ``restarts``: the engine may run this
    again after a failure (rank 0 counts the attempts in the run directory)."""
    job = loads_toml(text)
    _take_secret(Path(job.output.out))
    env = init(job.train.device)

    def decide() -> tuple[str, int]:
        fitted = loads_toml(text)
        fit_to_launcher(fitted, env)
        attempt = _next_attempt(Path(job.output.out)) if restarts else 0
        return (continued(fitted) if attempt else dumps_toml(fitted)), attempt

    code, _ = run_ranks(env, decide)
    summary = None
    path = Path(job.output.out) / SUMMARY_FILE  # (written before the ranks' last meeting)
    if code == 0 and path.is_file():
        summary = json.loads(path.read_text())
    return code, summary


def _next_attempt(out: Path) -> int:
    """0 the first time the engine starts the workers, then 1, 2, ... (its restarts)."""
    path = out / ATTEMPTS_FILE
    try:
        n = int(path.read_text()) + 1
    except (OSError, ValueError):
        n = 0
    write_atomic(path, f"{n}\n")  # (a crash mid-write would restart the count at 0)
    return n


# --- the job's secret ---------------------------------------------------------------------
# An engine's workers need the driver's SHOAL_SECRET (a federation's server that
# listens for `shoal federate` clients must know theirs). Ray's runtime_env would carry
# it, but Ray stores a job's runtime_env in its cluster, where whoever can use the
# cluster reads it (`ray list jobs`, the dashboard, the job table). A file in the run
# directory, readable by its owner only, reaches the workers as the run directory
# itself does (this machine, or the shared filesystem the engine requires); the driver
# removes it when the job ends. The workers of a parameter-server job need no secret
# from the driver: rank 0 makes one and hands it to the others through the group.


def give_secret(out: Path) -> None:
    """Driver: leave its ``SHOAL_SECRET`` (if any) where the job's workers read it,
    readable by this user only; remove a stale one otherwise."""
    path = out / SECRET_FILE
    secret = secret_hex()
    if not secret:
        path.unlink(missing_ok=True)  # (one a killed driver left must not stand in)
        return
    write_atomic(path, secret)  # (mkstemp: created 0600, and the rename keeps that)
    os.chmod(path, 0o600)


def take_back_secret(out: Path) -> None:
    """Driver: the job ended; its secret leaves the run directory."""
    (out / SECRET_FILE).unlink(missing_ok=True)


def _take_secret(out: Path) -> None:
    """Worker: the driver's ``SHOAL_SECRET``, from the run directory, where it left one."""
    try:
        secret = (out / SECRET_FILE).read_text().strip()
    except OSError:
        return
    if secret:
        os.environ[SECRET_ENV] = secret


# --- Ray ----------------------------------------------------------------------------------


class RayLoop:
    """``train_loop_per_worker`` of a Ray Train ``TorchTrainer`` (picklable): one
    shoal worker per Ray worker. Raises when the worker failed, so that Ray's
    ``FailureConfig`` restarts the group. The results are in the run directory
    (``summary.json``, ``model.safetensors``), as ``shoal train`` leaves them."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __call__(self, config: dict | None = None) -> None:
        _plain_print()
        code, _ = engine_rank(self.text, restarts=True)
        if code != 0:
            raise RuntimeError(f"shoal worker {os.environ.get('RANK', '?')} exited with {code}")


def _plain_print() -> None:
    """Ray Train replaces ``print`` in its workers with one that logs each line and, where
    the stream is wrapped (it is), prints it too: every line of shoal's came out twice.
    Its own copy of the original ``print`` is put back (where this Ray has one)."""
    import builtins

    patch = sys.modules.get("ray.train.v2._internal.logging.patch_print")
    original = getattr(patch, "_original_print", None)
    if original is not None:
        builtins.print = original


def run_on_ray(job: JobConfig) -> int:
    """``shoal train --engine ray``: a TorchTrainer of ``job.cluster.workers`` workers on
    the Ray cluster at ``--address`` (or a Ray instance started here)."""
    ray, train, torch_trainer = _import_ray()
    text = take_run_dir(job)
    out = Path(job.output.out)
    c = job.cluster
    if not c.address:  # a Ray started here: its workers at the priority of a shoal worker
        os.environ.setdefault("RAY_worker_niceness", "0")  # (Ray's default: nice 15)
    # shoal's other variables (SHOAL_FAULT, ...) travel in the runtime_env; the secret
    # does not (see give_secret)
    secrets = (SECRET_ENV, OLD_SECRET_ENV)
    forwarded = {k: v for k, v in os.environ.items() if "SHOAL" in k and k not in secrets}
    try:
        give_secret(out)
        ray.init(
            address=c.address or None,
            num_cpus=None if c.address else max(os.cpu_count() or 1, c.workers),
            include_dashboard=False,
            logging_level=logging.WARNING,
            runtime_env={"env_vars": forwarded},
        )
        trainer = torch_trainer(
            RayLoop(text),
            scaling_config=train.ScalingConfig(
                num_workers=c.workers, use_gpu=job.train.device == "cuda"
            ),
            run_config=train.RunConfig(
                name="ray",
                storage_path=job.output.out,
                failure_config=train.FailureConfig(max_failures=c.max_restarts),
                **_quiet(train),
            ),
        )
        error = None
        try:
            trainer.fit()
        except Exception as e:  # Ray's TrainingFailedError, with the worker's error in it
            error = e
        return outcome(job, error, "Ray")
    finally:
        take_back_secret(out)
        ray.shutdown()
        release(job)


def _quiet(train: Any) -> dict[str, Any]:
    """Ray Train's own console logs at warnings only (where this Ray has the setting)."""
    config = getattr(train, "LoggingConfig", None)
    return {"logging_config": config(log_level="WARNING")} if config else {}


def _import_ray() -> tuple[Any, Any, Any]:
    try:
        import ray
        import ray.train
        from ray.train.torch import TorchTrainer
    except ImportError:
        raise UserError("--engine ray needs Ray: pip install 'shoal[ray]'") from None
    return ray, ray.train, TorchTrainer


# --- Spark -----------------------------------------------------------------------------


def spark_rank(text: str) -> dict[str, Any] | None:
    """The function TorchDistributor runs in each process it starts (with torchrun);
    what it returns (the summary) TorchDistributor hands back to the driver."""
    code, summary = engine_rank(text, restarts=False)
    if code != 0:
        raise RuntimeError(f"shoal worker {os.environ.get('RANK', '?')} exited with {code}")
    return summary


def distribute(job: JobConfig, num_processes: int, local_mode: bool) -> dict[str, Any] | None:
    """Run ``job`` through PySpark's TorchDistributor (an active SparkSession is needed);
    the run directory must be taken already (:func:`take_run_dir`)."""
    try:
        from pyspark.ml.torch.distributor import TorchDistributor
    except ImportError:
        raise UserError("Spark needs PySpark: pip install 'shoal[spark]'") from None
    distributor = TorchDistributor(
        num_processes=num_processes, local_mode=local_mode, use_gpu=job.train.device == "cuda"
    )
    distributor.logger.setLevel(logging.WARNING)
    return distributor.run(spark_rank, dumps_toml(job))


def spark_session(master: str, app: str) -> Any:
    """A SparkSession at ``master`` (one already active is used as it is)."""
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise UserError("--engine spark needs PySpark: pip install 'shoal[spark]'") from None
    if not _java_found():
        raise UserError("--engine spark needs Java 17 or later (java on PATH or JAVA_HOME)")
    spark = SparkSession.builder.master(master).appName(app).getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def run_on_spark(job: JobConfig) -> int:
    """``shoal train --engine spark``: ``--workers`` processes through TorchDistributor,
    on this machine (``local[...]``) or on the executors of the master at ``--address``."""
    master = job.cluster.address or f"local[{job.cluster.workers}]"
    spark = spark_session(master, f"shoal {Path(job.output.out).name}")
    take_run_dir(job)
    error = None
    try:
        distribute(job, job.cluster.workers, local_mode=master.startswith("local"))
    except Exception as e:
        error = e
    finally:
        release(job)
        spark.stop()
    return outcome(job, error, "Spark")


def _java_found() -> bool:
    import shutil

    home = os.environ.get("JAVA_HOME")
    return bool(shutil.which("java") or (home and Path(home, "bin", "java").is_file()))
