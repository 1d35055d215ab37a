"""A CPU quota for this process: a slower machine, emulated honestly.

``limit_cpu(0.5)`` moves the calling process (all its threads, and any it starts
later) into a new control group allowed half of one CPU: its compute takes
longer, as on a slower machine, rather than sleeping. cgroup v2's ``cpu.max``
where the unified hierarchy has the cpu controller, else cgroup v1's
``cpu.cfs_quota_us``. Needs root (or a delegated hierarchy).

The groups live under ``shoal/`` in the hierarchy, one per process
(``w<pid>``); :func:`release` moves the process back and removes its group, and
each new group first removes those of processes that are gone (a SIGKILLed
worker cannot clean up after itself).
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

from shoal.errors import UserError

MIN_QUOTA_US = 1_000
"""The kernel's least quota per period."""
PARENT = "shoal"
_ORIGIN: dict[Path, Path] = {}  # each group made here -> where its process came from


def _mounts() -> list[tuple[str, str, list[str]]]:
    """(mount point, type, options) of every cgroup hierarchy."""
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            _, point, kind, opts, *_ = line.split()
            if kind in ("cgroup", "cgroup2"):
                out.append((point, kind, opts.split(",")))
    return out


def _own_group(kind: str, controller: str = "cpu") -> str:
    """This process's group in the v2 hierarchy, or in the v1 one of ``controller``."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if (kind == "cgroup2" and controllers == "") or controller in controllers.split(","):
            return path
    return "/"


def _hierarchy() -> tuple[Path, str]:
    """The root of a hierarchy with the cpu controller and its version ("cgroup2" or
    "cgroup"); a :class:`UserError` where there is none."""
    mounts = _mounts()
    for point, kind, _ in mounts:
        controllers = Path(point) / "cgroup.controllers"
        if kind == "cgroup2" and controllers.exists() and "cpu" in controllers.read_text().split():
            return Path(point), kind
    for point, kind, opts in mounts:
        if kind == "cgroup" and "cpu" in opts:
            return Path(point), kind
    raise UserError("a CPU quota needs a cgroup hierarchy with the cpu controller, found none")


def _sweep(parent: Path) -> None:
    """Remove the groups of processes that are gone."""
    for group in parent.glob("w*"):
        pid = group.name[1:]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            with contextlib.suppress(OSError):
                group.rmdir()


def limit_cpu(cpus: float) -> Path:
    """Move this process into a new group allowed ``cpus`` CPUs (e.g. 0.5); its path."""
    root, kind = _hierarchy()
    origin = root / _own_group(kind).lstrip("/")
    parent = root / PARENT
    # the shortest period that allows the least quota: throttling comes often and
    # briefly, as on a slower CPU, not as pauses of many milliseconds that one step's
    # compute may or may not hit
    period = max(MIN_QUOTA_US, math.ceil(MIN_QUOTA_US / cpus))
    quota = round(cpus * period)
    try:
        parent.mkdir(exist_ok=True)
        if kind == "cgroup2":  # the controller must be enabled on the way down
            (root / "cgroup.subtree_control").write_text("+cpu")
            (parent / "cgroup.subtree_control").write_text("+cpu")
        _sweep(parent)
        group = parent / f"w{os.getpid()}"
        group.mkdir(exist_ok=True)
        if kind == "cgroup2":
            (group / "cpu.max").write_text(f"{quota} {period}")
        else:
            (group / "cpu.cfs_period_us").write_text(str(period))
            (group / "cpu.cfs_quota_us").write_text(str(quota))
        (group / "cgroup.procs").write_text(str(os.getpid()))
        _ORIGIN[group] = origin
    except OSError as e:
        raise UserError(f"cannot put this process under a CPU quota in {parent}: {e}") from None
    return group


def release(group: Path) -> None:
    """Move this process back where it came from and remove ``group``."""
    origin = _ORIGIN.pop(group, group.parent.parent)
    with contextlib.suppress(OSError):
        (origin / "cgroup.procs").write_text(str(os.getpid()))
        group.rmdir()
        group.parent.rmdir()  # the last one out (fails while others are in)
