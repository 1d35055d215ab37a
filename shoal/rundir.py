"""The run directory as a whole: who holds it, and which jobs may continue it.

A run directory belongs to one live job at a time: node 0's ``shoal train``
holds an ``fcntl`` lock on ``RUN_DIR/.lock`` for the whole job (the kernel
drops it when the process ends, however it ends), and a second ``shoal train``
on the same directory, ``--resume`` included, stops before it touches anything.
The lock is advisory and local: on a network filesystem shared by several
machines it holds only where the filesystem supports ``flock``.

``--resume`` may change how a job runs but not what it computes:
:data:`FIXED` lists the settings a checkpoint's samples and state depend on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from shoal.config import JobConfig
from shoal.errors import UserError
from shoal.layout import LOCK_FILE

FIXED: dict[str, tuple[str, ...]] = {
    "model": ("name", "hidden", "layers", "heads"),
    "data": (
        "name",
        "num_samples",
        "num_features",
        "noise",
        "table_rows",
        "context",
        "test_fraction",
        "data_seed",
        "drop_last",
        "features",
        "label",
        "transform",
        "task",
        "shuffle",
        "shuffle_block",
        "shuffle_window",
    ),
    "train": ("seed", "batch_size"),
    "optim": ("name",),
}
"""Settings ``--resume`` refuses to change: they decide which samples make each step
(seed, data, batch size) or the shape of the saved state (model, optimizer). Every
other setting may change on resume: more steps or epochs, the learning rate and its
schedule, logging, evaluation and checkpoint intervals, the number of workers and
machines, compression, timeouts. The strategy may change where the checkpoint can be
read by the new one (see ``check_layout``); the parameter server keeps its
``--servers``. Of these, a setting the run's model or dataset does not read may change
(``--hidden`` of a linear model)."""


class RunLock:
    """The lock of one run directory, held until :meth:`release` or the process ends."""

    def __init__(self, fh: IO[str]) -> None:
        self._fh = fh

    def release(self) -> None:
        with contextlib.suppress(OSError):
            fcntl.flock(self._fh, fcntl.LOCK_UN)
        self._fh.close()


def lock(out: Path) -> RunLock:
    """Take ``out``'s lock (creating the directory), or raise :class:`UserError` naming
    the process that holds it. Nothing else in ``out`` is touched."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        fh = (out / LOCK_FILE).open("a+")
    except NotADirectoryError:
        raise UserError(f"--out {out}: a file is in the way (not a directory)") from None
    except OSError as e:
        raise UserError(f"--out {out}: cannot create the run directory ({e.strerror})") from None
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        fh.seek(0)
        holder = _describe(fh.read())
        fh.close()
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise UserError(
                f"--out {out}: cannot lock the run directory ({e.strerror}); its filesystem "
                "does not support flock"
            ) from None
        raise UserError(
            f"run directory {out} is in use by {holder}; wait for it to end, or choose "
            "another --out"
        ) from None
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": started}
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps(holder) + "\n")
        fh.flush()
    except OSError as e:  # (a full disk: the lock holds all the same)
        print(f"shoal: warning: cannot write {out / LOCK_FILE}: {e.strerror}", file=sys.stderr)
    return RunLock(fh)


def _describe(text: str) -> str:
    try:
        h = json.loads(text)
        return f"shoal train (pid {h['pid']} on {h['host']}, since {h['since']})"
    except (ValueError, KeyError, TypeError):
        return "another shoal train"


def check_out(out: Path) -> None:
    """Whether ``out`` can be a run directory, without creating anything."""
    try:
        _check_out(out)
    except OSError as e:  # (a parent we may not even look into)
        raise UserError(f"--out {out}: {e.strerror}") from None


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: a file is in the way (not a directory)")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"--out {out}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: cannot create it ({parent} is not writable)")


def is_empty(out: Path) -> bool:
    """Whether ``out`` holds nothing but its lock."""
    return not out.exists() or all(p.name == LOCK_FILE for p in out.iterdir())


PRIVACY = ("dp_clip", "dp_noise", "dp_epsilon", "dp_delta", "dp_insecure_seed")
"""The privacy settings, fixed for a run's life: its checkpoints' accountant continues
exactly these (turning DP on at a resume would report an epsilon for the steps after it
only, of a model trained without it before)."""


def check_resume(
    stored: JobConfig, job: JobConfig, reads: Callable[[str, str], bool] | None = None
) -> None:
    """Refuse a resumed ``job`` that changes a :data:`FIXED` setting of the ``stored`` one,
    or any of its :data:`PRIVACY` settings. ``reads(section, name)``: whether the stored
    job's model and dataset read a setting (one they ignore may change, where the model
    or dataset stays the same)."""
    fields = {f.name: f for f in dataclasses.fields(stored.train)}
    for name in PRIVACY:
        old, new = getattr(stored.train, name), getattr(job.train, name)
        if old != new:
            flag = fields[name].metadata.get("flag", "--" + name.replace("_", "-"))
            raise UserError(
                f"--resume {job.output.out}: {flag} was {_show(old)} in the run and is "
                f"{_show(new)} now: a run's privacy settings are fixed when it starts (its "
                "accountant continues them); resume with the run's values, or start a new run"
            )
    for section, names in FIXED.items():
        before, now = getattr(stored, section), getattr(job, section)
        fields = {f.name: f for f in dataclasses.fields(before)}
        same = getattr(before, "name", None) == getattr(now, "name", None)
        for name in names:
            if same and reads is not None and not reads(section, name):
                continue
            old, new = getattr(before, name), getattr(now, name)
            if old != new:
                flag = fields[name].metadata.get("flag", "--" + name.replace("_", "-"))
                what = "the saved state's shape" if section in ("model", "optim") else "the steps"
                raise UserError(
                    f"--resume {job.output.out}: {flag} was {_show(old)} in the run and is "
                    f"{_show(new)} now, which changes {what}: resume with the run's value, "
                    "or start a new run"
                )


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)
