"""``shoal bench chaos``: every fault shoal claims to survive, at random, and the bill.

Runs an undisturbed allreduce job (the reference), then the same job under the
parameter server (bsp) and under allreduce while a chaos thread injects, one at
a time and at exponentially distributed moments (seeded), every fault kind that
applies: worker SIGKILL and SIGSTOP, shard SIGKILL and SIGSTOP, hostile wire
traffic from a peer without the secret (shoal.strategies.ps.hostile), a
full disk under the run directory (a small tmpfs, filled for a few seconds), and
where root allows, a link taken down on an emulated host (network namespaces; a
two-machine parameter-server job loses one machine's link). For every fault it
times detection (the first line that names it) and recovery (the next metrics
record), and at the end it compares each job with the reference: samples lost
or counted twice per epoch (both must be 0), and the model (synchronous jobs
end at the reference's parameters). It also watches each job for intervals
without progress: one longer than the heartbeat timeout plus a restore must
have a line that names its cause.

The bench fails (exit 1) when a job did not finish, a fault kind could not be
injected into every job, a sample was lost or counted twice, a synchronous job
ended away from the reference, or a stall went unnamed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from shoal.cli.bench_run import BenchRun, Stalls
from shoal.errors import UserError
from shoal.jobfile import load_toml
from shoal.layout import CONFIG_FILE, METRICS_FILE, MODEL_FILE, SUMMARY_FILE, write_atomic

JOB = ["--model", "linear", "--batch-size", "64", "--lr", "0.05"]
JOB += ["--seed", "2", "--checkpoint-every", "20", "--heartbeat-timeout", "2"]
JOB += ["--no-progress", "--no-report", "--max-restarts", "100"]
PS = ["--strategy", "ps", "--servers", "2", "--ps-mode", "bsp"]
SLOW = "slow:rank=*:ms=30"
"""Every worker sleeps 30 ms a step: a run long enough for several faults."""
KINDS = {
    "ps": ("worker-kill", "worker-stop", "shard-kill", "shard-stop", "hostile", "disk-full"),
    "allreduce": ("worker-kill", "worker-stop", "disk-full"),
}
NAMED: dict[tuple[str, str], tuple[str, ...]] = {
    ("allreduce", "worker-kill"): ("shoal: error: worker rank",),
    ("allreduce", "worker-stop"): ("shoal: error: worker rank", "is hung (stopped)"),
    ("ps", "worker-kill"): ("failed (exit code -9)",),
    ("ps", "worker-stop"): ("sent no heartbeat", "has been stopped"),
    ("ps", "shard-kill"): ("was killed by SIGKILL; every shard goes back",),
    ("ps", "shard-stop"): ("sent no heartbeat", "has been stopped"),
    ("ps", "link-down"): ("sent no heartbeat",),
}
"""A line that names each fault; a full disk is named by whichever write it refuses."""
FULL_DISK = ("No space left", "cannot write")
RESTORE_S = 15.0
"""What a restore may take on a small machine (new processes import torch, shards load
their checkpoint, workers reconnect): a stall longer than the heartbeat timeout plus this
must be named by a line."""
HEARTBEAT_S = 2.0
"""The jobs' ``--heartbeat-timeout``."""
SYNC_TOLERANCE = 1e-5
"""How far a synchronous job's parameters may end from the reference (float sums in
another order)."""
INJECT_TRIES_S = 10.0
"""How long a fault waits for a process to inject it into (a worker restarting)."""
JOBS = ("ps", "allreduce", "link")
HELP = __doc__.split("\n\n", 1)[1].replace("``", "")


def add_parser(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser(
        "chaos",
        help="every fault kind at random moments: survived, detection, recovery, samples lost",
        description=HELP,
        epilog="example:\n  shoal bench chaos --mtbf 5 --seed 1\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="", help="output directory (default runs/bench-chaos-TIME)")
    p.add_argument("--mtbf", type=float, default=5.0, help="mean seconds between faults")
    p.add_argument("--seed", type=int, default=0, help="seed of the fault schedule")
    p.add_argument("--workers", type=int, default=3, help="worker processes per job")
    p.add_argument("--steps", type=int, default=2000, help="steps of each job (30 ms each)")
    p.add_argument("--run-timeout", type=float, default=600, help="seconds before a run is stopped")
    p.add_argument(
        "--jobs",
        default=",".join(JOBS),
        help="which chaos jobs, comma-separated: ps, allreduce, link (default all)",
    )
    p.set_defaults(run=run_chaos)


@dataclass
class Fault:
    """One injected fault and what became of it."""

    job: str
    kind: str
    at: float
    detect_s: float | None = None
    recover_s: float | None = None
    note: str = ""
    injected: bool = True


def run_chaos(args: argparse.Namespace) -> int:
    if args.workers < 2:
        raise UserError("--workers must be at least 2: a fault needs a survivor")
    if not 0 < args.mtbf < 3600:
        raise UserError("--mtbf must be a number of seconds between 0 and 3600")
    if not 100 <= args.steps <= 10**6:
        raise UserError("--steps must be between 100 and 1000000")
    jobs = [j.strip() for j in args.jobs.split(",") if j.strip()]
    if not jobs or any(j not in JOBS for j in jobs):
        raise UserError(f"--jobs must name some of {', '.join(JOBS)}, comma-separated")
    out = Path(args.out or f"runs/bench-chaos-{time.strftime('%Y%m%d-%H%M%S')}")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    workers = ["--workers", str(args.workers), "--steps", str(args.steps)]
    _say("reference run (allreduce, undisturbed) ...")
    reference = BenchRun(out / "reference", [*JOB, *workers], args.run_timeout)
    reference.wait()
    reference.check()
    faults: list[Fault] = []
    results: dict[str, Any] = {"seed": args.seed, "mtbf_s": args.mtbf, "jobs": {}}
    with _small_disk(out / "disk") as disk:
        # (the collective job recovers by restart: its lines and needles are those of
        # torchrun's agent; in-place recovery is measured by bench faults)
        for job, extra in (("ps", PS), ("allreduce", ["--recovery", "restart"])):
            if job not in jobs:
                continue
            _say(f"{job} under chaos ...")
            where = (disk or out) / job
            env = {"SHOAL_FAULT": SLOW}
            run = BenchRun(where, [*JOB, *workers, *extra], args.run_timeout, env, logs=out)
            stalls = Stalls(run, args.steps)
            kinds = [k for k in KINDS[job] if k != "disk-full" or disk is not None]
            chaos = _Chaos(run, job, kinds, args.mtbf, args.seed, disk)
            run.wait()
            chaos.stop()
            stalls.stop()
            faults += chaos.faults
            results["jobs"][job] = _account(run, reference, chaos.faults, kinds, stalls)
    link = _link_down(out, reference, args.run_timeout, args.steps) if "link" in jobs else None
    if link is not None:
        faults.append(link[0])
        results["jobs"]["ps, 2 machines"] = link[1]
    results["faults"] = [asdict(f) for f in faults]
    results["skipped"] = _skipped()
    results["failures"] = failures = _failures(results)
    write_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
    table = _table(results, faults)
    write_atomic(out / "results.md", table)
    print(table)
    for failure in failures:
        print(f"bench chaos: FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


def _failures(results: dict[str, Any]) -> list[str]:
    """Every way the job list fell short of surviving its faults exactly."""
    failed = []
    for job, r in results["jobs"].items():
        if not r.get("finished"):
            failed.append(f"{job} did not finish (exit {r.get('exit')}; see {r.get('log')})")
            continue
        if r.get("missing"):
            failed.append(f"{job}: not injected: {', '.join(r['missing'])}")
        if r["samples_lost"] or r["samples_twice"]:
            lost, twice = r["samples_lost"], r["samples_twice"]
            failed.append(f"{job}: {lost} samples lost and {twice} counted twice")
        if r["max_param_diff"] > SYNC_TOLERANCE:
            failed.append(f"{job}: ended {r['max_param_diff']:.2e} from the reference")
        for at, seconds in r.get("unnamed_stalls", []):
            failed.append(f"{job}: {seconds:.1f} s without progress from +{at:.1f} s, unnamed")
    return failed


def _say(text: str) -> None:
    print(f"bench chaos: {text}", file=sys.stderr, flush=True)


def _skipped() -> list[str]:
    from shoal.netns import unavailable

    why = []
    if os.geteuid() != 0:
        why.append("disk-full (mounting a small tmpfs needs root)")
    reason = unavailable()
    if reason:
        why.append(f"link-down ({reason})")
    return why


class _Chaos:
    """Injects one fault at a time into ``run``, then waits for it to be named and for
    training to go on, before the next one (exponential gaps of mean ``mtbf``)."""

    def __init__(
        self, run: BenchRun, job: str, kinds: list[str], mtbf: float, seed: int, disk: Path | None
    ) -> None:
        self.run, self.job, self.kinds, self.mtbf, self.disk = run, job, kinds, mtbf, disk
        self.random = random.Random(f"{seed}-{job}")
        self.faults: list[Fault] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=120)

    def _loop(self) -> None:
        # every kind once, in a random order (each job meets every fault), then at random
        queue = self.random.sample(self.kinds, len(self.kinds))
        while not self._stop.wait(self.random.expovariate(1 / self.mtbf)):
            if not _training(self.run):
                continue
            kind = queue.pop() if queue else self.random.choice(self.kinds)
            fault = self._inject(kind)
            self.faults.append(fault)
            if not fault.injected:
                _say(f"cannot inject {kind} into {self.job}: {fault.note}")
                continue
            named = NAMED.get((self.job, fault.kind), ())
            _follow(self.run, fault, FULL_DISK if fault.kind == "disk-full" else named, self._stop)

    def _inject(self, kind: str) -> Fault:
        """Inject ``kind`` now; a signal waits up to :data:`INJECT_TRIES_S` for a process
        to take it (one restarting), then the fault is recorded as not injected."""
        role = "server" if kind.startswith("shard") else "worker"
        now = time.monotonic()
        if kind.endswith(("-kill", "-stop")):
            sig = signal.SIGKILL if kind.endswith("kill") else signal.SIGSTOP
            need = 2 if role == "worker" else 1  # (a fault needs a survivor)
            while time.monotonic() - now < INJECT_TRIES_S and self.run.proc.poll() is None:
                pids = self.run.pids(role)
                if len(pids) >= need:
                    pid = self.random.choice(pids)
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        continue
                    return Fault(self.job, kind, time.monotonic(), note=f"pid {pid}")
                time.sleep(0.1)
            why = f"fewer than {need} running {role} processes for {INJECT_TRIES_S:g} s"
            return Fault(self.job, kind, now, note=why, injected=False)
        if kind == "hostile":
            note = _hostile(self.run.out)
            return Fault(self.job, kind, now, note=note, injected=note != NO_ENDPOINTS)
        if kind == "disk-full" and self.disk is not None:
            _fill(self.disk, seconds=3.0)
            return Fault(self.job, kind, now)
        return Fault(self.job, kind, now, note="not a fault this bench knows", injected=False)


def _training(run: BenchRun) -> bool:
    """Between the run's first metrics record and the last fifth of the job."""
    records, config = run.out / METRICS_FILE, run.out / CONFIG_FILE
    if run.proc.poll() is not None or not records.exists():
        return False
    try:
        last = json.loads(records.read_text().splitlines()[-1]).get("step", 0)
        steps = load_toml(config).train.steps
    except (ValueError, IndexError, UserError):
        return False
    return 0 < last < 0.8 * steps


def _follow(run: BenchRun, fault: Fault, needles: tuple[str, ...], stop: threading.Event) -> None:
    """Detection: the first line naming the fault; recovery: the next metrics record
    after it (after the fault, where nothing names it)."""
    deadline, seen = fault.at + 90.0, None
    while time.monotonic() < deadline and not stop.is_set() and run.proc.poll() is None:
        if needles and fault.detect_s is None:
            when = run.line_after(fault.at, needles)
            if when is not None:
                fault.detect_s = when - fault.at
        if seen is None:
            if fault.detect_s is not None or fault.kind in ("hostile", "disk-full"):
                seen = run.progress()
        elif run.progress() != seen:
            fault.recover_s = time.monotonic() - fault.at
            return
        time.sleep(0.05)


@contextlib.contextmanager
def _small_disk(where: Path):
    """A 256 MB tmpfs the chaos runs write into (root), so that it can be filled."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        yield None
        return
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(disk: Path, seconds: float) -> None:
    """Fill ``disk`` to the last byte, hold it full for ``seconds``, free it."""
    filler = disk / ".filler"
    with filler.open("wb") as fh:
        chunk = b"\0" * (1 << 20)
        with contextlib.suppress(OSError):
            while True:
                fh.write(chunk)
                fh.flush()
    with contextlib.suppress(OSError), filler.open("ab") as fh:  # the last bytes too
        while True:
            fh.write(b"\0" * 4096)
            fh.flush()
    time.sleep(seconds)
    filler.unlink(missing_ok=True)


NO_ENDPOINTS = "no endpoints file to attack yet"


def _hostile(run_dir: Path) -> str:
    """The wire attacks of the hostile-peer test at a shard and at the coordinator."""
    from shoal.strategies.ps import hostile

    try:
        where = json.loads((run_dir / "ps_endpoints.json").read_text())
    except (OSError, ValueError):
        return NO_ENDPOINTS
    for address in (where["servers"][0], where["coordinator"]):
        hostile.big_first_frame(address)
        hostile.endless_multipart(address, seconds=1)
        hostile.open_connections(address, 300, hold_s=0.5)
        hostile.garbage_hellos(address, 1000)
    return "4 MiB frame, endless multipart, 300 connections, 1000 garbage hellos at each"


def _account(
    run: BenchRun,
    reference: BenchRun,
    faults: list[Fault],
    kinds: list[str] | tuple[str, ...] = (),
    stalls: Stalls | None = None,
) -> dict[str, Any]:
    """Samples lost and counted twice per epoch, against the undisturbed reference; how
    far the model is from the reference's; the fault kinds never injected; the longest
    interval without progress and the stalls nobody named."""
    bound = HEARTBEAT_S + RESTORE_S
    watched: dict[str, Any] = {}
    if stalls is not None:
        unnamed = [(round(a, 1), round(b, 1)) for a, b in stalls.unexplained(bound)]
        watched = {"longest_stall": stalls.longest(bound), "unnamed_stalls": unnamed}
    missing = sorted(set(kinds) - {f.kind for f in faults if f.injected})
    if run.code != 0 or not (run.out / SUMMARY_FILE).exists():
        return {"finished": False, "exit": run.code, "log": str(run.log), **watched}
    got, ref = run.summary()["samples_per_epoch"], reference.summary()["samples_per_epoch"]
    lost = sum(max(0, ref[e] - got.get(e, 0)) for e in ref)
    twice = sum(max(0, got.get(e, 0) - ref[e]) for e in ref) + sum(
        v for e, v in got.items() if e not in ref
    )
    return {
        "finished": True,
        "faults": sum(f.injected for f in faults),
        "missing": missing,
        "samples_lost": lost,
        "samples_twice": twice,
        "max_param_diff": _param_diff(run.out, reference.out),
        "restores": run.summary().get("ps", {}).get("server_restores", []),
        **watched,
    }


def _link_down(
    out: Path, reference: BenchRun, timeout: float, steps: int
) -> tuple[Fault, dict] | None:
    """A two-machine parameter-server job on namespace hosts; machine 1's link goes down
    once training runs. Machine 0 names its silent worker and finishes alone."""
    from shoal import netns

    if netns.unavailable():
        return None
    _say("ps on 2 machines, one link taken down ...")
    steps = ["--steps", str(steps)]
    secret = {"SHOAL_SECRET": os.urandom(32).hex(), "SHOAL_FAULT": SLOW}
    with netns.hosts(2, subnet="10.231.77") as (a, b):
        endpoint = f"{a.addr}:{_free_port()}"
        nodes = []
        for rank, (host, workers, servers) in enumerate(((a, 1, 2), (b, 1, 0))):
            args = [*JOB, *steps, *PS[:2], "--ps-mode", "bsp", "--workers", str(workers)]
            args += ["--servers", str(servers), "--nnodes", "2", "--node-rank", str(rank)]
            args += ["--rdzv-endpoint", endpoint]
            prefix = [*host.prefix(), "env", f"GLOO_SOCKET_IFNAME={host.ifname}"]
            node = BenchRun(out / f"link-node{rank}", args, timeout, secret, prefix=prefix)
            nodes.append(node)
        stalls = Stalls(nodes[0], int(steps[1]))
        deadline = time.monotonic() + 120
        while not _training(nodes[0]) and time.monotonic() < deadline:
            time.sleep(0.2)
        subprocess.run(["ip", "-n", b.ns, "link", "set", b.ifname, "down"], check=False)
        fault = Fault("ps, 2 machines", "link-down", time.monotonic())
        _follow(nodes[0], fault, NAMED[("ps", "link-down")], threading.Event())
        for node in nodes:
            node.wait()
        stalls.stop()
    return fault, _account(nodes[0], reference, [fault], ["link-down"], stalls)


def _param_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = load_file(str(a / MODEL_FILE)), load_file(str(b / MODEL_FILE))
    return max(float((x[k].double() - y[k].double()).abs().max()) for k in x)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _table(results: dict[str, Any], faults: list[Fault]) -> str:
    def stat(values: list[float | None], how: Any) -> str:
        got = [v for v in values if v is not None]
        return f"{how(got):.2f}" if got else "-"

    lines = [
        f"faults at random moments, mean gap {results['mtbf_s']:g} s, seed {results['seed']}",
        "",
        "| job | fault | injected | survived | detection median / max (s) "
        "| recovery median / max (s) |",
        "|---|---|---|---|---|---|",
    ]
    by: dict[tuple[str, str], list[Fault]] = {}
    for f in faults:
        if f.injected:
            by.setdefault((f.job, f.kind), []).append(f)
    for (job, kind), fs in sorted(by.items()):
        finished = results["jobs"].get(job, {}).get("finished", False)
        survived = sum(1 for f in fs if finished and f.recover_s is not None)
        detect, recover = [f.detect_s for f in fs], [f.recover_s for f in fs]
        lines.append(
            f"| {job} | {kind} | {len(fs)} | {survived} | "
            f"{stat(detect, statistics.median)} / {stat(detect, max)} | "
            f"{stat(recover, statistics.median)} / {stat(recover, max)} |"
        )
    lines += [
        "",
        "| job | finished | samples lost | samples counted twice | max param diff "
        "| longest stall (s) | named by |",
        "|---|---|---|---|---|---|---|",
    ]
    for job, r in results["jobs"].items():
        stall = r.get("longest_stall") or {"seconds": 0.0, "line": ""}
        named = stall["line"].replace("|", "/")[:100] or "-"
        if r.get("finished"):
            lines.append(
                f"| {job} | yes | {r['samples_lost']} | {r['samples_twice']} | "
                f"{r['max_param_diff']:.2e} | {stall['seconds']:.1f} | {named} |"
            )
        else:
            lines.append(
                f"| {job} | no (exit {r.get('exit')}, see {r.get('log')}) | - | - | - "
                f"| {stall['seconds']:.1f} | {named} |"
            )
    if results["skipped"]:
        lines += ["", "skipped: " + "; ".join(results["skipped"])]
    if results.get("failures"):
        lines += ["", "FAILED:", *(f"- {f}" for f in results["failures"])]
    return "\n".join(lines) + "\n"
