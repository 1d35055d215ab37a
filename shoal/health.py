"""Heartbeats between the workers of a collective job.

A collective only notices a dead peer when a socket breaks, and a hung peer
(SIGSTOP, a wedged device) or a peer behind a cut link not at all until gloo's
timeout, minutes later. So every worker runs a :class:`Heartbeat` thread that
bumps its own counter in the job's store (the ``TCPStore`` that rank 0 hosts
for the round) every ``timeout / 6`` seconds and reads everyone else's. A counter that
has not moved for ``timeout`` seconds names its rank as failed; a store that
does not answer for ``timeout`` seconds means this worker is the one cut off.

Either way the worker says so in one line (role, rank, host and pid of the
culprit), SIGKILLs a stopped culprit that shares its host (it ignores the
agent's SIGTERM, and the agent would wait 30 s before its SIGKILL),
and exits with :data:`EXIT_PEER_LOST`, so torchrun's agent restarts the group
from the newest checkpoint at once instead of waiting on a collective that
cannot finish. A worker that simply died is named by the agent, which sees it
exit (see :func:`shoal.launch.launch`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
from datetime import timedelta

import torch.distributed as dist

from shoal import procs

EXIT_PEER_LOST = 75
"""Exit status of a worker that stopped because a peer failed (EX_TEMPFAIL)."""


class Heartbeat:
    """Beat for this rank and watch every other; act on a silent one.

    ``on_failure`` (for tests) replaces the exit; it gets the line that was printed.
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        timeout_s: float,
        store: dist.Store | None = None,
        on_failure=None,
    ) -> None:
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.interval_s = timeout_s / 6
        self.store = store if store is not None else _job_store(timeout_s)
        self.host, self.pid, self.machine = _host_name(), os.getpid(), _machine()
        self.on_failure = on_failure or _exit
        self._stop = threading.Event()
        self.whos: dict[int, dict] = {}
        who = {"host": self.host, "pid": self.pid, "machine": self.machine,
               "started": procs.started(self.pid)}  # fmt: skip
        self.store.set(f"who/{rank}", json.dumps(who))
        self.store.set(f"beat/{rank}", "0")
        self.contact = time.monotonic()  # the last time the store answered
        self._acted = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="shoal-heartbeat", daemon=True)
        self._thread.start()
        # a store that stops answering may block the beat thread inside a call: watch it
        self._watcher = threading.Thread(target=self._watch, name="shoal-watch", daemon=True)
        self._watcher.start()

    def stop(self) -> None:
        """This rank is leaving on purpose: say so, so that its silence is not a failure."""
        self._stop.set()
        self._thread.join(timeout=2 * self.timeout_s)
        self._watcher.join()
        with contextlib.suppress(Exception):
            self.store.set(f"done/{self.rank}", "1")

    def await_verdict(self) -> None:
        """A collective just broke. Wait, without exiting, for who knows more to act: the
        agent, which sees a dead worker of this host exit and stops the rest of us, or
        the heartbeat, which names a silent peer elsewhere (and exits) within the timeout."""
        time.sleep(self.timeout_s + 2 * self.interval_s)

    def _here(self, who: dict) -> bool:
        """Whether that worker runs on this machine (pids mean something here)."""
        return who.get("machine") == self.machine

    def _describe(self, rank: int) -> str:
        who = self._who(rank)
        return f"worker rank {rank} on {who['host']} (pid {who['pid']})"

    def _report(self, culprits: list[int], line: str) -> bool:
        """One line per failure, from the lowest healthy rank; whether this rank said it."""
        alive = [r for r in range(self.world_size) if r not in culprits]
        if self.rank != min(alive):
            return False
        print(f"shoal: error: {line}", file=sys.stderr, flush=True)
        return True

    # --- the thread ---------------------------------------------------------------

    def _run(self) -> None:
        others = [r for r in range(self.world_size) if r != self.rank]
        seen: dict[int, bytes] = {}
        moved = dict.fromkeys(others, time.monotonic())
        beat = 0
        present: list[int] = []
        while not self._stop.wait(self.interval_s):
            beat += 1
            try:
                self.store.set(f"beat/{self.rank}", str(beat))
                if len(present) < len(others):
                    # multi_get would wait for a key not there yet: read those that are
                    present = [r for r in others if self.store.check([f"beat/{r}"])]
                    if len(present) == len(others):  # everyone is up: remember who is where
                        whos = self.store.multi_get([f"who/{r}" for r in range(self.world_size)])
                        self.whos = {r: json.loads(w) for r, w in enumerate(whos)}
                values = self.store.multi_get([f"beat/{r}" for r in present])
            except Exception:  # the store does not answer: the watcher decides
                continue
            now = self.contact = time.monotonic()
            for r, value in zip(present, values, strict=True):
                if seen.get(r) != value:
                    seen[r], moved[r] = value, now
            silent = [r for r in others if now - moved[r] > self.timeout_s]
            silent = [r for r in silent if not self._done(r)]
            if silent and not self._stop.is_set():
                self._silent(silent, {r: now - moved[r] for r in silent})
                return

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            quiet = time.monotonic() - self.contact
            if quiet > self.timeout_s and not self._answers():
                self._lost_store(time.monotonic() - self.contact)
                return

    def _answers(self) -> bool:
        """Ask the store once more before a verdict: on a loaded machine this process (its
        beat thread starved of the CPU or the GIL) may be what was quiet, not the store.
        Asked from a thread of its own: a call to a stopped store can block for ever."""
        answered = threading.Event()

        def ask() -> None:
            with contextlib.suppress(Exception):
                self.store.check([f"beat/{self.rank}"])
                answered.set()

        threading.Thread(target=ask, name="shoal-ask-store", daemon=True).start()
        if not answered.wait(self.timeout_s / 3):
            return False
        self.contact = time.monotonic()
        return True

    def _done(self, rank: int) -> bool:
        try:
            return self.store.check([f"done/{rank}"])
        except Exception:
            return False

    def _who(self, rank: int) -> dict:
        if rank in self.whos:
            return self.whos[rank]
        try:
            return json.loads(self.store.get(f"who/{rank}"))
        except Exception:
            return {"host": "?", "pid": 0}

    def _silent(self, ranks: list[int], quiet_s: dict[int, float]) -> None:
        if not self._once():
            return
        parts, fence = [], []
        for r in ranks:
            who = self._who(r)
            state = _local_state(who) if self._here(who) else None
            what = {"dead": "died", "stopped": "is hung (stopped)"}.get(
                state or "", "is hung or unreachable"
            )
            if state == "stopped":  # a live but late process gets the agent's SIGTERM
                fence.append(int(who["pid"]))
            parts.append(
                f"{self._describe(r)} {what}: no heartbeat for {quiet_s[r]:.1f} s"
                + ("; killing it" if fence and fence[-1] == who["pid"] else "")
            )
        line = "; ".join(parts)
        if not self._report(ranks, line):
            # the reporter notices within about one beat: let it speak before the agent,
            # seeing the fenced process exit, stops everyone
            time.sleep(2 * self.interval_s)
        for pid in fence:  # a stopped process ignores the agent's SIGTERM: it would wait 30 s
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        self.on_failure(line)

    def _once(self) -> bool:
        """Whether this is the first verdict (the beat thread and the watcher may both act)."""
        return self._acted.acquire(blocking=False) and not self._stop.is_set()

    def _lost_store(self, quiet_s: float) -> None:
        """The store lives in rank 0's process: a hung rank 0 silences it, too."""
        host0 = self.whos.get(0)
        if (
            self.rank != 0
            and host0 is not None
            and self._here(host0)
            and _local_state(host0) in ("stopped", "dead")
        ):
            self._silent([0], {0: quiet_s})
            return
        if not self._once():
            return
        line = (
            f"worker rank {self.rank} on {self.host} (pid {self.pid}) lost contact with the "
            f"job's store (in worker rank 0) for {quiet_s:.1f} s: rank 0 is hung or this "
            "host is cut off"
        )
        print(f"shoal: error: {line}", file=sys.stderr, flush=True)
        self.on_failure(line)


def _job_store(timeout_s: float) -> dist.Store:
    """A connection of our own to the store the process group met in."""
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=timedelta(seconds=max(1.0, timeout_s / 3)),
    )
    # every round of the job meets in a fresh store (see shoal.launch), so no round
    # prefix: the restart count would not do, it differs between machines
    return dist.PrefixStore("shoal/health/", store)


def _host_name() -> str:
    """The host name, with the address that reaches the job's store unless that is loopback."""
    name = socket.gethostname()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((os.environ.get("MASTER_ADDR", "127.0.0.1"), 9))
            addr = s.getsockname()[0]
    except OSError:
        return name
    return name if addr.startswith("127.") else f"{name}/{addr}"


def _machine() -> str:
    """What tells two machines apart, also two network namespaces of one kernel."""
    try:
        netns = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        netns = 0
    return f"{socket.gethostname()}:{netns}"


def _local_state(who: dict) -> str | None:
    """``dead``, ``stopped`` or ``running`` for a shoal worker pid on this host."""
    return procs.state(int(who.get("pid", 0)), who.get("started", ""))


def _exit(line: str) -> None:
    sys.stderr.flush()
    os._exit(EXIT_PEER_LOST)
