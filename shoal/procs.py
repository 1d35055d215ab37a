"""Which processes belong to a job, and what each is: read from ``/proc``.

A process a launcher starts says what it is by its name (``/proc/PID/comm``):
``shoal-worker3``, ``shoal-server0``, set by the process itself as it learns
its role (:func:`name_self`). That is what ``ps``, ``top`` and tools see, and
what :func:`role_processes` finds, among a launcher's descendants. A process's
environment in ``/proc/PID/environ`` is no guide: it is the block the process
was *exec'd* with, and a worker forked from the launcher has its launcher's
original one, whatever the launcher set since.
"""

from __future__ import annotations

import contextlib
import ctypes
from pathlib import Path

PREFIX = "shoal-"
_PR_SET_NAME = 15


def name_self(role: str, rank: int | str) -> None:
    """Name this process ``shoal-ROLE RANK`` (at most 15 characters, Linux; a no-op
    elsewhere). Call it from the main thread: threads started later inherit it."""
    name = f"{PREFIX}{role}{rank}".encode()[:15]
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0)


def _stat(pid: int) -> tuple[str, str, int] | None:
    """``(name, state, parent pid)`` of ``pid``, or ``None`` once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name = text[text.index("(") + 1 : text.rindex(")")]
    state, ppid = text.rsplit(")", 1)[1].split()[:2]
    return name, state, int(ppid)


def started(pid: int) -> str:
    """When process ``pid`` started (clock ticks since boot; with the pid, it names one
    process for good), or empty once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and has not ended (a zombie has)."""
    return state(pid) != "dead"


def state(pid: int, since: str = "") -> str:
    """``running``, ``stopped`` (SIGSTOP, a debugger) or ``dead`` (gone, a zombie, or
    the pid reused by a process started at another time than ``since``)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return "dead"
    if since and fields[19] != since:
        return "dead"
    return {"T": "stopped", "t": "stopped", "Z": "dead", "X": "dead"}.get(fields[0], "running")


def _all() -> dict[int, tuple[str, str, int]]:
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            found[int(entry.name)] = stat
    return found


def children(parent: int) -> list[int]:
    """The processes whose parent is ``parent``."""
    return sorted(pid for pid, (_, _, ppid) in _all().items() if ppid == parent)


def role_processes(ancestor: int, role: str, running: bool = True) -> list[int]:
    """Processes below ``ancestor`` that named themselves for ``role`` (``worker``,
    ``server``) with :func:`name_self`; not their own children (a helper a worker forks
    inherits its name). ``running``: live ones only, not stopped or zombies."""
    procs = _all()
    marker = f"{PREFIX}{role}"

    def below(pid: int) -> bool:
        seen = 0
        while pid in procs and seen < 64:
            pid, seen = procs[pid][2], seen + 1
            if pid == ancestor:
                return True
        return False

    found = []
    for pid, (name, state, ppid) in procs.items():
        if not name.startswith(marker) or not below(pid):
            continue
        if ppid in procs and procs[ppid][0].startswith(marker):
            continue  # a child of a worker: not a worker itself
        if running and state in "ZTtX":
            continue
        found.append(pid)
    return sorted(found)
