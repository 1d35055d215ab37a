"""The run directory a job takes: locked, checked against the job (a run to continue,
or an empty place to start one), and given the resolved job its workers read."""

from __future__ import annotations

import atexit
import contextlib
import json
import shutil
import tempfile
from pathlib import Path

from shoal import checkpoint, rundir
from shoal.config import JobConfig
from shoal.data.files import check_unchanged, fingerprints
from shoal.errors import UserError
from shoal.jobfile import load_toml
from shoal.launch import check_port
from shoal.layout import (
    CONFIG_FILE,
    DATASET_FILE,
    LOCK_FILE,
    USER_ERROR_FILE,
    write_atomic,
    write_config,
)
from shoal.run.resolve import check_layout
from shoal.strategies import resolve


def prepare_run_dir(job: JobConfig, own_port: bool = True) -> tuple[Path, rundir.RunLock | None]:
    """Take and check the run directory (node 0 holds its lock for the whole job); return
    where the workers read the resolved job. A refusal leaves the directory as it was.
    ``own_port``: shoal's launcher is to open the rendezvous port, so it must be free."""
    out = Path(job.output.out)
    if job.cluster.node_rank != 0:
        check_port(job.cluster)
        # Other machines only read the job; rank 0 (on node 0) owns the run directory.
        tmp = Path(tempfile.mkdtemp(prefix="shoal-node-"))
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # (this process outlives it)
        return write_config(job, tmp), None
    existed, had_lock = out.exists(), (out / LOCK_FILE).exists()
    made = [p for p in [out.absolute(), *out.absolute().parents] if not p.exists()]
    lock = None
    try:
        lock = rundir.lock(out)
        _check_run_dir(job, out)
        if own_port:
            check_port(job.cluster)
        _check_data_files(job, out)
        write_config(job, out)
    except BaseException:
        if lock is not None:
            lock.release()
        if not existed:  # what this call made, and nothing another job may have put there
            (out / LOCK_FILE).unlink(missing_ok=True)
            for path in made:
                with contextlib.suppress(OSError):
                    path.rmdir()  # (only if empty)
        elif not had_lock:
            (out / LOCK_FILE).unlink(missing_ok=True)
        raise
    return out / CONFIG_FILE, lock


def _check_data_files(job: JobConfig, out: Path) -> None:
    """Files on disk: a resumed run's must be those it started with (``dataset.json``
    keeps each one's fingerprint)."""
    now = fingerprints(job.data)
    if now is None:
        return
    saved = out / DATASET_FILE
    if job.output.resume and saved.is_file():
        check_unchanged(json.loads(saved.read_text())["files"], now, job.data.name)
    write_atomic(saved, json.dumps({"data": job.data.name, "files": now}, indent=1) + "\n")


def _check_run_dir(job: JobConfig, out: Path) -> None:
    if job.output.resume:
        root = resolve(job).checkpoint_root(out)
        if not checkpoint.list_checkpoints(root):
            raise UserError(
                f"--resume {out}: the run stopped before its first checkpoint, so there is "
                f"nothing to resume; --auto-resume --out {out} starts it over there"
            )
        latest = checkpoint.load_latest(root)
        if latest is None:
            raise UserError(f"--resume {out}: every checkpoint is corrupt")
        check_layout(job, latest[0])
        if 0 < job.train.steps <= latest[1]["step"]:
            raise UserError(
                f"--resume {out}: the run is already at step {latest[1]['step']}; "
                f"give --steps above it to continue"
            )
        (out / USER_ERROR_FILE).unlink(missing_ok=True)  # a mistake reported by the run before
    elif not rundir.is_empty(out):
        if job.output.auto_resume and (out / CONFIG_FILE).is_file():
            # the same job, stopped before its first checkpoint: it starts again in place
            rundir.check_resume(load_toml(out / CONFIG_FILE), job)
            return
        if (out / CONFIG_FILE).is_file() and not checkpoint.list_checkpoints(
            resolve(load_toml(out / CONFIG_FILE)).checkpoint_root(out)
        ):
            raise UserError(
                f"run directory {out} holds a run that stopped before its first checkpoint: "
                "add --auto-resume to start it over there, or choose another --out"
            )
        raise UserError(f"run directory {out} already exists; choose another --out or --resume it")
