"""shoal as a guest: the processes are another launcher's (torchrun, ``srun``, a
Kubeflow pod, PySpark's TorchDistributor) or an engine's (Ray Train), and shoal
trains in them.

Whoever started them, the ranks do the same thing (:func:`run_ranks`): rank 0
decides the job (checks it and takes the run directory, or finds the run it is to
continue) while the others wait; every rank receives the job rank 0 decided, so
they never disagree; each trains its part; rank 0 writes the report.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch.distributed as tdist

from shoal import checkpoint, rundir, worker
from shoal.config import JobConfig
from shoal.dist import ATTEMPT_ENV, DistEnv, init
from shoal.environment import slurm_worker_env
from shoal.errors import UserError
from shoal.jobfile import dumps_toml, loads_toml
from shoal.launch import LAUNCHER_ENV
from shoal.layout import CONFIG_FILE, SUMMARY_FILE
from shoal.run.directory import prepare_run_dir
from shoal.run.resolve import Request, layered, resolve_job
from shoal.run.summary import finish
from shoal.strategies import resolve

Decision = tuple[str | None, int]
"""What rank 0 decided: the job as TOML (``None`` once it said what is wrong, ``""``
for a dry run), and how many times the workers were restarted before."""


def guest_of() -> str | None:
    """The launcher that started this process as one worker of a job, if another one
    did: the environment names this process's ``RANK`` in a ``WORLD_SIZE`` (torchrun,
    a Kubeflow PyTorchJob, TorchDistributor) and shoal's own launcher did not set it."""
    if LAUNCHER_ENV in os.environ:
        return None
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return "torchrun"
    srun = slurm_worker_env(os.environ)
    if srun:  # srun with a task per process: each task is a worker
        os.environ.update(srun)
        return "srun"
    if "PET_NNODES" in os.environ:  # Kubeflow: this pod's command is the machine's launcher
        return None
    return "the launcher" if {"RANK", "WORLD_SIZE"} <= os.environ.keys() else None


def run_ranks(env: DistEnv, decide: Callable[[], Decision]) -> tuple[int, JobConfig | None]:
    """Every rank of a guest job: rank 0 calls ``decide``, the others receive what it
    decided; each then trains its part. Returns the exit code and the job (``None``
    when there was none to run). A mistake is one line, from rank 0."""
    message: list = [None, 0]
    try:
        if env.rank == 0:
            try:
                message = list(decide())
            except UserError as e:
                print(f"shoal: error: {e}", file=sys.stderr)
    finally:  # (anything else rank 0 raises still lets the others go)
        if env.world_size > 1:
            tdist.broadcast_object_list(message, src=0)
    text, attempt = message
    if text is None:
        return 2, None  # rank 0 said why
    if not text:
        return 0, None  # --dry-run
    os.environ[ATTEMPT_ENV] = str(attempt)
    job = loads_toml(text)
    code = worker.run(job)
    if env.rank == 0 and code == 0 and job.output.report:
        from shoal.report import write_report

        out = Path(job.output.out)
        if (out / SUMMARY_FILE).is_file():
            write_report([out], out)
    return code, job


def fit_to_launcher(job: JobConfig, env: DistEnv) -> None:
    """The processes the launcher started are the job's: its workers, or (``--strategy
    ps``) its first ``--servers`` ranks the server shards and the others the workers."""
    c = job.cluster
    c.nnodes = max(1, env.world_size // env.local_world_size)
    c.node_rank, c.rdzv_endpoint = 0, ""
    if resolve(job).needs_process_group:
        c.workers = env.local_world_size
        return
    if env.world_size <= c.servers:
        raise UserError(
            f"--strategy {job.strategy.name} under a launcher: the first --servers {c.servers} "
            f"ranks serve and the others train, so it needs more than {c.servers} processes "
            f"(it has {env.world_size})"
        )
    c.nnodes, c.workers = 1, env.world_size - c.servers


def continued(job: JobConfig) -> str:
    """The job of a run the launcher restarted after a failure: it resumes from the run's
    newest checkpoint where there is one (the parameter server's coordinator reads it
    only when told to), from the start otherwise."""
    root = resolve(job).checkpoint_root(Path(job.output.out))
    if checkpoint.list_checkpoints(root):
        job.output.resume = job.output.out
    return dumps_toml(job)


def run_as_guest(request: Request, who: str) -> int:
    """``torchrun ... -m shoal train ...``: this process is one worker of a job another
    launcher started. A restart of torchrun's agent continues the run in ``--out``."""
    request.guest = who
    env = init(_device_of(request))
    lock: list[rundir.RunLock | None] = [None]

    def decide() -> Decision:
        out = request.value("output", "out") or request.value("output", "resume")
        restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if restarts and out and (Path(out) / CONFIG_FILE).is_file():
            # the launcher restarted the workers after a failure: the run goes on from
            # its newest checkpoint (--out names it, so all agree)
            lock[0] = rundir.lock(Path(out))
            return continued(loads_toml((Path(out) / CONFIG_FILE).read_text())), restarts
        job = resolve_job(request)
        _refuse_placement(request, env, who, resolve(job).needs_process_group)
        fit_to_launcher(job, env)
        if request.dry_run:
            print(dumps_toml(job))
            return "", 0
        _, lock[0] = prepare_run_dir(job, own_port=False)
        return dumps_toml(job), restarts

    try:
        code, job = run_ranks(env, decide)
    finally:
        if lock[0] is not None:
            lock[0].release()
    if env.rank == 0 and code == 0 and job is not None:
        finish(job, report=False)  # (rank 0 wrote it already)
    return code


def _device_of(request: Request) -> str:
    """The job's ``--device`` before the job is checked (to join the process group)."""
    try:
        return layered(request, request.value("output", "resume"))[0].train.device
    except (UserError, OSError):  # rank 0 says what is wrong once the group is up
        return "cpu"


def _refuse_placement(request: Request, env: DistEnv, who: str, grouped: bool) -> None:
    """The launcher decides the processes and machines; flags that would too are refused
    (``--servers`` picks the ranks that serve, where a strategy has servers)."""
    for name in ("workers", "nnodes", "node_rank", "rdzv_endpoint", "servers"):
        if request.gave("cluster", name) and (name != "servers" or grouped):
            flag = "--" + name.replace("_", "-")
            raise UserError(
                f"{flag}: under {who} the launcher starts the processes ({env.world_size} "
                f"in all, {env.local_world_size} on this machine); drop {flag}"
            )
