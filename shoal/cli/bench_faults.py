"""``shoal bench faults``: goodput of a job that keeps losing workers.

Runs the same job twice on this machine for each recovery compared (shoal's
``restart`` and ``inplace``, torchft's fault-tolerant DDP): once undisturbed,
once while a killer SIGKILLs a random worker process at exponentially
distributed intervals (a fixed mean time between failures). It reports goodput
(useful steps per second of wall time) of the failed run over the unfailed one,
and for every kill the time until a worker named the dead one (detection) and
until a step was completed again (recovery: the workers print their first step
after a start or a regroup, ``SHOAL_MARK_STEPS``). Last, it times a checkpoint
of the job's state written in the background (the stall training sees) against
the same checkpoint written synchronously.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from shoal.cli.bench_run import BenchRun
from shoal.config import JobConfig
from shoal.errors import UserError
from shoal.layout import write_atomic

HELP = """Run a job undisturbed, then again while a random worker is SIGKILLed every
MTBF seconds on average (exponential intervals, --seed), and report goodput
(steps per second of wall time) against the undisturbed run, with the time to
detect every kill and to recover from it (to the next completed step), for each
recovery side by side: shoal's restart (every worker restarts from the newest
checkpoint), shoal's inplace (the others go on, a replacement catches up from a
live peer) and torchft's fault-tolerant DDP on the same job and kill schedule,
with the samples each trained twice or never. Then time a checkpoint of the
job's state written in the background against the same one written synchronously."""
DEFAULT_JOB = (
    "--model mlp --steps 3000 --batch-size 64 --optimizer adam --lr 0.003 --checkpoint-every 50"
)
EXAMPLES = """examples:
  shoal bench faults                                  # 4 workers, a kill every 15 s on average
  shoal bench faults --mtbf 30 --workers 2
  shoal bench faults -- --model mlp --hidden 2304 --layers 3 --steps 300 --checkpoint-every 25
  shoal bench faults --recovery inplace -- --strategy local-sgd --steps 3000 --checkpoint-every 48
"""


def add_parser(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser(
        "faults",
        help="goodput under periodic SIGKILLs, detection and recovery times, checkpoint stall",
        description=HELP,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="", help="output directory (default runs/bench-faults-TIME)")
    p.add_argument("--workers", type=int, default=4, help="worker processes")
    p.add_argument(
        "--mtbf", type=float, default=15.0, help="mean seconds between kills (exponential)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the kill schedule")
    p.add_argument(
        "--recovery",
        default="",
        help="the recoveries to compare, comma-separated: restart, inplace (shoal's) and "
        "torchft (its fault-tolerant DDP on the same job; pip install -e '.[bench]'); "
        "default: all three (torchft where installed)",
    )
    p.add_argument("--run-timeout", type=float, default=900, help="seconds before a run is stopped")
    p.add_argument(
        "job",
        nargs=argparse.REMAINDER,
        help=f"after --: 'shoal train' flags of the job (default: {DEFAULT_JOB})",
    )
    p.set_defaults(run=run_faults)


def run_faults(args: argparse.Namespace) -> int:
    if args.workers < 2:
        raise UserError("--workers must be at least 2: a kill needs a survivor to notice it")
    if not args.mtbf > 0:
        raise UserError("--mtbf must be a positive number of seconds")
    job_args = args.job[1:] if args.job[:1] == ["--"] else args.job
    job_args = job_args or DEFAULT_JOB.split()
    if "--recovery" in job_args:
        raise UserError(
            "give the recoveries to compare to bench faults (--recovery A,B), not the job"
        )
    modes = _modes(args.recovery)
    job = resolve_job_args(job_args, args.workers)
    from shoal.strategies import resolve

    if not resolve(job).needs_process_group:
        raise UserError(
            f"bench faults restarts collective strategies; --strategy {job.strategy.name} "
            "is not one"
        )
    if not job.train.checkpoint_every:
        raise UserError("the job needs --checkpoint-every N: a restart resumes from a checkpoint")
    for mode in modes:
        if mode != "torchft":
            resolve_job_args([*job_args, "--recovery", mode], args.workers)  # (refused: one line)
    out = Path(args.out or f"runs/bench-faults-{time.strftime('%Y%m%d-%H%M%S')}")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    base = [*job_args, "--workers", str(args.workers), "--no-progress", "--no-report"]
    if not args.recovery and "torchft" not in modes:
        _say("torchft is not installed (pip install -e '.[bench]'): its side is left out")
    result: dict[str, Any] = {
        "job": " ".join(job_args),
        "workers": args.workers,
        "mtbf_s": args.mtbf,
        "modes": {},
    }
    for mode in modes:
        _say(f"{mode}: unfailed run, then one with kills ...")
        try:
            if mode == "torchft":
                result["modes"][mode] = _torchft(job, args, out / "torchft")
            else:
                result["modes"][mode] = _shoal(mode, base, args, out)
        except (UserError, RuntimeError, TimeoutError) as e:  # (a result too: the others go on)
            _say(f"{mode}: {e}")
            result["modes"][mode] = {"failed": str(e).splitlines()[0][:300]}
    _say("checkpoint stall ...")
    result["checkpoint"] = checkpoint_stall(job)
    write_atomic(out / "results.json", json.dumps(result, indent=2) + "\n")
    table = _table(result)
    write_atomic(out / "results.md", table)
    print(table)
    return 0


MODES = ("restart", "inplace", "torchft")


def _modes(spec: str) -> list[str]:
    """The recoveries to compare: as given, or restart, inplace and (where installed)
    torchft."""
    from shoal.cli import bench_torchft

    if not spec:
        return ["restart", "inplace", *(["torchft"] if bench_torchft.available() else [])]
    modes = [m.strip() for m in spec.split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            raise UserError(f"--recovery {spec}: {m!r} is not one of {', '.join(MODES)}")
    if "torchft" in modes and not bench_torchft.available():
        raise UserError("--recovery torchft: torchft is not installed (pip install -e '.[bench]')")
    return modes


def _shoal(mode: str, base: list[str], args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """The job without kills, then with them, under ``--recovery mode``."""
    marks = {"SHOAL_MARK_STEPS": "1"}
    job = [*base, "--recovery", mode]
    unfailed = BenchRun(out / f"{mode}-unfailed", job, args.run_timeout, env=marks)
    unfailed.wait()
    failed = BenchRun(
        out / f"{mode}-failed", [*job, "--max-restarts", "1000"], args.run_timeout, env=marks
    )
    kills = _Killer(failed, args.mtbf, args.seed)
    failed.wait()
    kills.stop()
    for run in (unfailed, failed):
        run.check()
    summary = failed.summary()
    steps = summary["steps"]
    epochs = summary.get("epochs", [])
    regroups = [r for r in summary.get("regroups", []) if r.get("state_bytes")]
    return {
        "steps": steps,
        "unfailed_wall_s": unfailed.wall,
        "failed_wall_s": failed.wall,
        "goodput_ratio": unfailed.wall / failed.wall,
        "kills": _events(kills.kills, failed.lines),
        "digests_exact": bool(epochs) and all(e["exact"] for e in epochs),
        "state_sent": [{"bytes": r["state_bytes"], "stall_s": r["stall_s"]} for r in regroups],
    }


def _torchft(job: JobConfig, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """torchft's fault-tolerant DDP on the same job, without kills, then with them."""
    from shoal.cli import bench_torchft

    unfailed = bench_torchft.run(job, args.workers, out / "unfailed", timeout_s=args.run_timeout)
    failed = bench_torchft.run(
        job, args.workers, out / "failed", args.mtbf, args.seed, args.run_timeout
    )
    return {
        "steps": failed["steps"],
        "unfailed_wall_s": unfailed["wall_s"],
        "failed_wall_s": failed["wall_s"],
        "goodput_ratio": unfailed["wall_s"] / failed["wall_s"],
        "kills": [{"detect_s": None, **k} for k in failed["kills"]],
        "samples_twice": failed["samples_twice"],
        "samples_never": failed["samples_never"],
    }


def _say(text: str) -> None:
    print(f"bench faults: {text}", file=sys.stderr, flush=True)


def resolve_job_args(job_args: list[str], workers: int) -> JobConfig:
    """The job as ``shoal train`` would resolve it (bad flags: one line)."""
    from shoal.cli import Parser
    from shoal.cli.flags import add_job_flags, request_of
    from shoal.run.resolve import resolve_job

    parser = Parser(prog="shoal bench faults --")
    parser.add_argument("--config")
    add_job_flags(parser, job_args)
    ns = parser.parse_args([*job_args, "--workers", str(workers)])
    return resolve_job(request_of(ns))


class _Killer:
    """SIGKILLs a random worker of ``run`` at exponential intervals of mean ``mtbf``."""

    def __init__(self, run: BenchRun, mtbf: float, seed: int) -> None:
        self.run, self.mtbf = run, mtbf
        self.random = random.Random(seed)
        self.kills: list[float] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        """The clock runs while the workers train: after a kill it waits for the restart."""
        while not self._stop.wait(self.random.expovariate(1 / self.mtbf)):
            pids = self.run.pids("worker")
            if len(pids) < 2:
                continue
            try:
                os.kill(self.random.choice(pids), signal.SIGKILL)
            except ProcessLookupError:
                continue
            self.kills.append(time.monotonic())
            while not self._stop.wait(0.1) and not self._went_on(self.kills[-1]):
                pass

    def _went_on(self, since: float) -> bool:
        """Whether a worker completed a step after ``since``."""
        return any(t > since and _went_on(line) for t, line in reversed(self.run.lines))

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=5)


def _named(line: str) -> bool:
    """A line naming a killed worker: torchrun's agent's (restart) or shoal's launcher's
    (in place)."""
    return "shoal: error: worker rank" in line or (
        line.startswith("shoal: worker ") and "was killed" in line
    )


def _went_on(line: str) -> bool:
    """A worker completed a step (its first since it started, or since its group
    changed: ``SHOAL_MARK_STEPS``)."""
    return line.startswith("shoal: went on at step ")


def _events(kills: list[float], lines: list[tuple[float, str]]) -> list[dict[str, Any]]:
    """Per kill: seconds until a worker named it, and until the next completed step."""
    named = [t for t, line in lines if _named(line)]
    resumed = [t for t, line in lines if _went_on(line)]
    out = []
    for i, k in enumerate(kills):
        until = kills[i + 1] if i + 1 < len(kills) else float("inf")
        d = next((t - k for t in named if k <= t < until), None)
        r = next((t - k for t in resumed if k <= t < until), None)
        out.append({"detect_s": d, "recover_s": r})
    return out


def checkpoint_stall(job: JobConfig, repeats: int = 5) -> dict[str, Any]:
    """Median seconds training is blocked by one checkpoint of the job's model and
    optimizer: written in the background, and written synchronously; of the checkpoints
    after a run's first (the background saver copies into the last one's memory)."""
    import torch

    from shoal import checkpoint
    from shoal.data import build_dataset
    from shoal.models import build_model
    from shoal.optim import build_optimizer

    data = build_dataset(job.data)
    model = build_model(job.model, data)
    optimizer = build_optimizer(model.parameters(), job.optim)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # the optimizer's state exists from the first step
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    times: dict[bool, list[float]] = {True: [], False: []}
    with tempfile.TemporaryDirectory(prefix="shoal-stall-") as tmp:
        savers = {
            background: checkpoint.AsyncSaver(Path(tmp) / str(background), 1, background)
            for background in (False, True)
        }
        for i in range(repeats + 1):  # (the first save of each is a run's first checkpoint)
            for background, saver in savers.items():
                before = saver.stall_s
                saver.save(i, state)
                if i:
                    times[background].append(saver.stall_s - before)
                saver.wait()
        size = sum(p.stat().st_size for p in Path(tmp).rglob("state.pt")) // 2
    sync, background = statistics.median(times[False]), statistics.median(times[True])
    return {
        "bytes": size,
        "sync_stall_s": sync,
        "background_stall_s": background,
        "stall_ratio": background / sync,
    }


def _table(r: dict[str, Any]) -> str:
    def fmt(values: list[float | None]) -> str:
        got = [v for v in values if v is not None]
        if not got:
            return "-"
        return f"{statistics.median(got):.2f} ({max(got):.2f})"

    c = r["checkpoint"]
    lines = [
        f"{r['workers']} workers, a SIGKILL every {r['mtbf_s']:g} s on average; job: {r['job']}",
        "",
        "| recovery | steps | unfailed (s) | with kills (s) | kills | goodput ratio | "
        "detection median (max) | recovery median (max) | samples twice / never | "
        "state sent to a newcomer, survivors' stall |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, m in r["modes"].items():
        if "failed" in m:
            lines.append(f"| {mode} | did not finish: {m['failed']} |" + " |" * 8)
            continue
        kills = m["kills"]
        if "samples_twice" in m:
            samples = f"{m['samples_twice']} / {m['samples_never']}"
        else:
            samples = "0 / 0 (digests exact)" if m["digests_exact"] else "digests differ"
        sent = m.get("state_sent") or []
        state = (
            f"{statistics.median(s['bytes'] for s in sent) / 1e6:.1f} MB, "
            f"{fmt([s['stall_s'] for s in sent])} s"
            if sent
            else "-"
        )
        lines.append(
            f"| {mode} | {m['steps']} | {m['unfailed_wall_s']:.1f} | {m['failed_wall_s']:.1f} "
            f"| {len(kills)} | **{m['goodput_ratio']:.3f}** | "
            f"{fmt([k['detect_s'] for k in kills])} | {fmt([k['recover_s'] for k in kills])} "
            f"| {samples} | {state} |"
        )
    lines += [
        "",
        f"Recovery: from the kill to the next completed step. Checkpoint of "
        f"{c['bytes'] / 1e6:.1f} MB: synchronous {c['sync_stall_s'] * 1000:.1f} ms, "
        f"in the background {c['background_stall_s'] * 1000:.1f} ms of stall "
        f"(ratio {c['stall_ratio']:.3f}).",
    ]
    return "\n".join(lines) + "\n"
