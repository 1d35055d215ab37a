"""Fault injection for tests and demos, driven by the ``SHOAL_FAULT`` variable.

``SHOAL_FAULT="crash:rank=1:step=150"`` makes rank 1 kill itself with SIGKILL
right after finishing global step 150 (or the first one after it, where
work comes from a queue), as a machine failure would: no cleanup,
no flushing, no goodbye to its peers. ``hang:rank=1:step=150`` makes it stop
itself with SIGSTOP instead: alive, silent, holding its sockets.
``slow:rank=1:ms=20`` makes rank 1 sleep
20 ms in the forward pass of every step (from ``step``, default 0): a straggler
whose compute is slow, so its gradients are as stale as a slow device makes them.
``slow:rank=*:ms=40:prob=0.25`` makes every rank sleep 40 ms in a random
quarter of its steps (seeded per rank): stragglers that come and go.
``slow:rank=3:factor=3`` makes rank 3 three times slower in proportion to its
work: in each forward it sleeps twice what its samples took to compute in the
previous step (so a smaller slice makes it sleep less, as on a slow machine).
``cpu:rank=3:cpus=0.3`` puts rank 3 under a real CPU quota of 0.3 CPUs for the
whole run (cgroups, root: see :mod:`shoal.cgroup`); a rank's own entry wins
over ``rank=*``.
``crash:role=server:rank=0:step=120`` kills parameter-server shard 0 once it
has applied step 120 (``hang:role=server:...`` stops it). ``hang:rank=2:step=0``
stops worker 2 as it starts, before it registers with anyone.
``term:rank=1:step=150`` sends rank 1 SIGTERM, then its launcher (which passes it
on to every worker), as a scheduler that takes the machine back signals the job's
processes. ``step=end`` (crash, hang, term) fires as training ends: after the last
step, before the final checkpoint and summary. Several faults are separated by ``;``.

``SHOAL_MARK_STEPS=1`` (for benchmarks of recovery) makes each process print
``shoal: went on at step N`` after the first step it completes since it started or
its group changed, so that the time from a kill to the next completed step can be
read off the output.

A crash or hang fires once per job, not once per process: before firing, the
injector leaves a marker in ``RUN_DIR/faults/``, so the workers a restart
brings up (which redo the steps since the last checkpoint) do not fire it again.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ENV = "SHOAL_FAULT"
KINDS = ("crash", "hang", "term", "slow", "cpu")
SIGNALS = {"crash": signal.SIGKILL, "hang": signal.SIGSTOP, "term": signal.SIGTERM}
"""What a fault that fires once sends its own process."""
MARK_ENV = "SHOAL_MARK_STEPS"
END = 1 << 62
"""The step of ``step=end``: after every step (see :meth:`Injector.at_end`)."""


ROLES = ("worker", "server")


@dataclass(frozen=True)
class Fault:
    kind: str
    rank: int  # -1: every rank
    step: int
    ms: int = 0
    prob: float = 1.0
    role: str = "worker"
    factor: float = 0.0  # slow: times slower than its measured compute (instead of ms)
    cpus: float = 0.0  # cpu: the quota, in CPUs


def parse(spec: str) -> list[Fault]:
    """Parse ``kind:rank=R:step=S[;...]``; raise ``ValueError`` on anything else."""
    faults = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        kind, *fields = part.split(":")
        if kind not in KINDS:
            raise ValueError(f"{ENV}: unknown fault {kind!r} (known: {', '.join(KINDS)})")
        values = dict(f.split("=", 1) for f in fields if "=" in f)
        role = values.get("role", "worker")
        if role not in ROLES or (role == "server" and kind not in ("crash", "hang")):
            raise ValueError(f"{ENV}: {part!r}: role must be worker, or server for a crash or hang")
        try:
            rank = -1 if values["rank"] == "*" else int(values["rank"])
            if kind in SIGNALS:
                step = END if values["step"] == "end" else int(values["step"])
                faults.append(Fault(kind, rank, step, role=role))
            elif kind == "cpu":
                cpus = float(values["cpus"])
                if not 0.1 <= cpus <= 1024:
                    raise ValueError
                faults.append(Fault(kind, rank, 0, cpus=cpus))
            else:
                step, prob = int(values.get("step", 0)), float(values.get("prob", 1))
                ms, factor = int(values.get("ms", 0)), float(values.get("factor", 0))
                if not 0 < prob <= 1 or ("ms" in values) == ("factor" in values):
                    raise ValueError
                if ms < 0 or not (factor == 0 or 1 <= factor <= 1000):
                    raise ValueError
                faults.append(Fault(kind, rank, step, ms, prob, factor=factor))
        except (KeyError, ValueError):
            form = {
                "slow": "slow:rank=R|*:ms=M|factor=F[:step=S][:prob=P]",
                "cpu": "cpu:rank=R|*:cpus=C (0.1 to 1024)",
            }.get(kind, f"{kind}:rank=R:step=S|end")
            raise ValueError(f"{ENV}: {part!r} must look like {form}") from None
    return faults


def _signal_launcher() -> None:
    """SIGTERM to shoal's launcher of this worker, if shoal's launcher started it."""
    from shoal.dist import LAUNCHER_ENV

    launcher = os.environ.get(LAUNCHER_ENV, "")
    if launcher.isdigit() and int(launcher) != os.getpid():
        os.kill(int(launcher), signal.SIGTERM)


class Injector:
    """Checks after every step whether this rank is due to fail."""

    def __init__(
        self,
        rank: int,
        spec: str | None = None,
        run_dir: str | os.PathLike | None = None,
        role: str = "worker",
    ) -> None:
        spec = os.environ.get(ENV, "") if spec is None else spec
        self.faults = [f for f in parse(spec) if f.rank in (rank, -1) and f.role == role]
        self.rank, self.role = rank, role
        self.random = random.Random(rank)
        self.markers = Path(run_dir) / "faults" if run_dir is not None else None
        self.fired: set[Fault] = {f for f in self.faults if self._marker(f).exists()}
        self.per_sample = 0.0  # seconds this rank's compute takes per sample (factor)
        self.slept = 0.0  # seconds slept in the current step
        self.group: Path | None = None  # the cgroup of a cpu fault, once in it
        self.marking = os.environ.get(MARK_ENV) == "1"
        self.went_on = False  # (a step completed since the start or the last regroup)

    def _marker(self, fault: Fault) -> Path:
        if self.markers is None:
            return Path("/nonexistent/shoal-fault")
        who = f"rank{self.rank}" if self.role == "worker" else f"{self.role}{self.rank}"
        step = "end" if fault.step == END else fault.step
        return self.markers / f"{fault.kind}-{who}-step{step}"

    def at_start(self) -> None:
        """Called as the process starts: faults of step 0 fire here, a CPU quota
        begins."""
        quotas = sorted((f for f in self.faults if f.kind == "cpu"), key=lambda f: f.rank)
        if quotas:  # this rank's own entry (rank >= 0) sorts last and wins over rank=*
            from shoal.cgroup import limit_cpu

            self.group = limit_cpu(quotas[-1].cpus)
        self.after_step(0)

    def close(self) -> None:
        """Leave the CPU quota's group, if this process is in one."""
        if self.group is not None:
            from shoal.cgroup import release

            release(self.group)
            self.group = None

    def resumed_at(self, step: int) -> None:
        """A run resumed after ``step``: crashes and hangs due by then have happened."""
        self.fired |= {f for f in self.faults if f.kind != "slow" and f.step <= step}

    def in_step(self, step: int, samples: int = 0) -> None:
        """Called in the forward pass of global step ``step`` (counted from 1) on
        ``samples`` samples."""
        for fault in self.faults:
            if fault.kind == "slow" and step >= fault.step and self.random.random() < fault.prob:
                pause = fault.ms / 1000
                if fault.factor:
                    pause = (fault.factor - 1) * self.per_sample * samples
                time.sleep(pause)
                self.slept += pause

    def computed(self, samples: int, seconds: float) -> None:
        """The step just done computed ``samples`` in ``seconds`` (sleeps included)."""
        if samples > 0:
            self.per_sample = max(0.0, seconds - self.slept) / samples
        self.slept = 0.0

    def regrouped(self) -> None:
        """This process's group changed (an in-place job's new generation)."""
        self.went_on = False

    def after_step(self, step: int) -> None:
        """Called after each task, with its global step + 1 (a queue may skip steps)."""
        if self.marking and not self.went_on and 0 < step < END:
            self.went_on = True
            sys.stderr.write(f"shoal: went on at step {step}\n")  # (one write: whole lines)
            sys.stderr.flush()
        for fault in self.faults:
            if fault.kind in SIGNALS and step >= fault.step and fault not in self.fired:
                self.fired.add(fault)
                if self.markers is not None:
                    self.markers.mkdir(parents=True, exist_ok=True)
                    self._marker(fault).touch()
                os.kill(os.getpid(), SIGNALS[fault.kind])
                if fault.kind == "term":
                    _signal_launcher()

    def at_end(self) -> None:
        """Called as training ends, after the last step and before the final checkpoint
        and summary: faults of ``step=end`` fire here."""
        self.after_step(END)
