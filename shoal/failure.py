"""A worker that raised: its exception recorded where its launcher reads it, shown once
with the user's own frames, and whether restarting can help.

Each worker that stops on an exception (a bug in the user's model or data code, or in
shoal) writes one record, ``FAILURES_DIR/worker-N.json``, and exits with
:data:`EXIT_RAISED`. Its launcher (torchrun's agent in ``shoal train``, or the
parameter server's) reads the record at once: the first one of a job is printed, with
the frames of the user's code; a failure that a restart would only repeat is not
retried (:func:`verdict`). Under another launcher (torchrun, Ray, Spark), where nobody
of shoal's reads the records, the worker prints its exception itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import sysconfig
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

EXIT_RAISED = 3
"""The exit status of a worker that stopped on an exception (recorded, and said once
by its launcher)."""

FAILURES_ENV = "SHOAL_FAILURES_DIR"
"""Where a worker writes its record; set by shoal's launchers only."""

STOP_FILE = "stop"
"""Left in the failures directory once the launcher decided not to retry: a worker the
agent restarted meanwhile exits at once."""

_NOT_USER = tuple(
    str(Path(p).resolve()) + os.sep
    for p in {
        str(Path(__file__).parent),  # shoal
        sysconfig.get_paths()["stdlib"],
        sysconfig.get_paths()["platstdlib"],
    }
)


@dataclass
class Failure:
    """One worker's exception, as its launcher reads it."""

    role: str
    """``worker``, or another role of the strategy's (``server``)."""
    rank: int
    attempt: int
    steps: int
    """The last step the job had finished when it raised (0: none)."""
    steps_done: int
    """Steps this attempt had finished (0: it failed before its first step)."""
    kind: str
    """The exception's type (``ValueError``)."""
    message: str
    user_trace: str
    """The traceback cut to the user's frames (the whole one where none is the user's)."""
    trace: str
    time: float

    @property
    def signature(self) -> tuple[str, str, int]:
        """What makes two failures the same one: the exception and where it happened."""
        return self.kind, self.message, self.steps

    def headline(self) -> str:
        """``worker 0 raised ValueError in step 3: oops``."""
        where = f"in step {self.steps + 1}" if self.steps_done else "before its first step"
        return f"{self.role} {self.rank} raised {self.kind} {where}: {self.message}".rstrip(": ")

    def show(self) -> str:
        """The headline, then the user's frames, as printed by ``shoal train``."""
        return f"shoal: error: {self.headline()}\n{self.user_trace.rstrip()}"


def _torch_dir() -> str:
    torch = sys.modules.get("torch")
    return str(Path(torch.__file__).parent.resolve()) + os.sep if torch else "\0"


def user_frames(exc: BaseException) -> str:
    """``exc``'s traceback with only the frames of the user's code (not shoal's, torch's or
    the standard library's), then the exception; the whole traceback where no frame is
    the user's (a bug in shoal or torch shows where it is)."""
    frames = traceback.extract_tb(exc.__traceback__)
    skip = (*_NOT_USER, _torch_dir())
    own = [f for f in frames if not str(Path(f.filename).resolve()).startswith(skip)]
    kept = traceback.StackSummary.from_list(own or frames)
    lines = ["Traceback (the frames of your code):\n" if own else "Traceback:\n"]
    lines += kept.format()
    lines += traceback.format_exception_only(type(exc), exc)
    return "".join(lines)


def record(
    exc: BaseException, role: str, rank: int, attempt: int, steps: int, steps_done: int
) -> Failure:
    """The failure of this process, from ``exc``."""
    message = str(exc).strip().splitlines()[0][:500] if str(exc).strip() else ""
    return Failure(
        role=role,
        rank=rank,
        attempt=attempt,
        steps=steps,
        steps_done=steps_done,
        kind=type(exc).__name__,
        message=message,
        user_trace=user_frames(exc),
        trace="".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        time=time.time(),
    )


def report(failure: Failure) -> None:
    """Leave ``failure`` where this worker's launcher reads it; print it here where no
    launcher of shoal's will (or the record cannot be written)."""
    where = os.environ.get(FAILURES_ENV)
    if where:
        from shoal.layout import write_atomic

        with contextlib.suppress(OSError):
            path = Path(where) / f"{failure.role}-{failure.rank}.json"
            write_atomic(path, json.dumps(asdict(failure)))
            return
    print(failure.show(), file=sys.stderr, flush=True)


def read(where: Path, role: str, rank: int) -> Failure | None:
    """The record that ``role`` ``rank`` left in ``where``, if it left one."""
    try:
        return Failure(**json.loads((where / f"{role}-{rank}.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None


def verdict(failure: Failure, before: list[Failure]) -> str:
    """Why restarting would not help (empty: it may). ``before``: the same process's
    failures before it was restarted."""
    if not failure.steps_done and not failure.attempt:  # (a restart may meet other trouble)
        return "it failed before finishing a step, which a restart would repeat"
    if any(b.signature == failure.signature for b in before):
        return "the same exception in the same step after a restart"
    return ""


def stopped(where: str | None) -> bool:
    """Whether the launcher decided that this job is not to be retried."""
    return bool(where) and (Path(where) / STOP_FILE).exists()  # type: ignore[arg-type]


class Raised:
    """The exceptions this node's processes stopped on, read from their records in
    ``where`` (see :mod:`shoal.failure`) as their launcher learns of each exit."""

    def __init__(self, where: Path) -> None:
        self.where = where
        self.seen: list[Failure] = []

    def take(self, role: str = "worker") -> tuple[Failure | None, str]:
        """The first new record of ``role``, printed unless the same exception was printed
        before (at any step), and why restarting cannot help (empty: it may)."""
        known = {(f.role, f.rank, f.time) for f in self.seen}
        new = []
        for path in sorted(self.where.glob(f"{role}-*.json")):
            found = read(self.where, role, int(path.stem.rpartition("-")[2]))
            if found is not None and (found.role, found.rank, found.time) not in known:
                new.append(found)
        if not new:
            return None, ""
        new.sort(key=lambda f: f.time)
        first = new[0]
        if not any((f.kind, f.message) == (first.kind, first.message) for f in self.seen):
            print(first.show(), file=sys.stderr, flush=True)  # (once, wherever it recurs)
        before = [f for f in self.seen if (f.role, f.rank) == (first.role, first.rank)]
        self.seen += new
        return first, verdict(first, before)


def failures_dir(job_dir: Path) -> Path:
    """Where this node's processes record their exceptions (beside the job they read,
    in ``job_dir``), emptied for a new launch."""
    import shutil

    from shoal.layout import FAILURES_DIR

    where = job_dir / FAILURES_DIR
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True, exist_ok=True)
    return where
