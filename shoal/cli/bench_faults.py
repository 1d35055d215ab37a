"""``shoal bench faults``: goodput of a job that keeps losing workers.

Runs the same job twice on this machine: once undisturbed, once while a killer
SIGKILLs a random worker process at exponentially distributed intervals (a
fixed mean time between failures). It reports goodput (useful steps per second
of wall time) of the failed run over the unfailed one, and for every kill the
time until a worker named the dead one (detection) and until the workers went
on (recovery: restarted ones resumed from a checkpoint, or in place, the others
trained their next step). Last, it times a checkpoint
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
from shoal.layout import SUMMARY_FILE, write_atomic

HELP = """Run a job undisturbed, then again while a random worker is SIGKILLed every
MTBF seconds on average (exponential intervals, --seed), and report goodput
(steps per second of wall time) against the undisturbed run, with the time to
detect and to recover from every kill. Then time a checkpoint of the job's
state written in the background against the same one written synchronously.
Collective strategies (allreduce, local-sgd, diloco): the workers restart
through torchrun's agent and resume from the newest checkpoint, or, with
--recovery inplace in the job, the others go on and a replacement joins them."""
DEFAULT_JOB = (
    "--model mlp --steps 3000 --batch-size 64 --optimizer adam --lr 0.003 --checkpoint-every 50"
)
EXAMPLES = """examples:
  shoal bench faults                                  # 4 workers, a kill every 15 s on average
  shoal bench faults --mtbf 30 --workers 2
  shoal bench faults -- --model mlp --hidden 2304 --layers 3 --steps 300 --checkpoint-every 25
  shoal bench faults -- --strategy local-sgd --steps 3000 --checkpoint-every 48 --recovery inplace
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
    job = _resolve(job_args, args.workers)
    from shoal.strategies import resolve

    if not resolve(job).needs_process_group:
        raise UserError(
            f"bench faults restarts collective strategies; --strategy {job.strategy.name} "
            "is not one"
        )
    if not job.train.checkpoint_every:
        raise UserError("the job needs --checkpoint-every N: a restart resumes from a checkpoint")
    out = Path(args.out or f"runs/bench-faults-{time.strftime('%Y%m%d-%H%M%S')}")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    base = [*job_args, "--workers", str(args.workers), "--no-progress", "--no-report"]

    _say("unfailed run ...")
    unfailed = BenchRun(out / "unfailed", base, args.run_timeout)
    unfailed.wait()
    _say("run with kills ...")
    failed = BenchRun(out / "failed", [*base, "--max-restarts", "1000"], args.run_timeout)
    kills = _Killer(failed, args.mtbf, args.seed)
    failed.wait()
    kills.stop()
    for run in (unfailed, failed):
        run.check()
    steps = json.loads((failed.out / SUMMARY_FILE).read_text())["steps"]
    result: dict[str, Any] = {
        "job": " ".join(job_args),
        "workers": args.workers,
        "mtbf_s": args.mtbf,
        "steps": steps,
        "unfailed_wall_s": unfailed.wall,
        "failed_wall_s": failed.wall,
        "goodput_unfailed": steps / unfailed.wall,
        "goodput_failed": steps / failed.wall,
        "kills": _events(kills.kills, failed.lines),
    }
    result["goodput_ratio"] = result["goodput_failed"] / result["goodput_unfailed"]
    _say("checkpoint stall ...")
    result["checkpoint"] = checkpoint_stall(job)
    write_atomic(out / "results.json", json.dumps(result, indent=2) + "\n")
    table = _table(result)
    write_atomic(out / "results.md", table)
    print(table)
    return 0


def _say(text: str) -> None:
    print(f"bench faults: {text}", file=sys.stderr, flush=True)


def _resolve(job_args: list[str], workers: int) -> JobConfig:
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
            restarts = len(self.kills)
            while not self._stop.wait(0.1) and self._restarts() < restarts:
                pass

    def _restarts(self) -> int:
        return sum(_recovered(line) for _, line in self.run.lines)

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=5)


def _named(line: str) -> bool:
    """A line naming a killed worker: torchrun's agent's (restart) or shoal's launcher's
    (in place)."""
    return "shoal: error: worker rank" in line or (
        line.startswith("shoal: worker ") and "was killed" in line
    )


def _recovered(line: str) -> bool:
    """The workers go on: restarted from a checkpoint, or in place without the lost one."""
    return line.startswith("shoal: restart ") or (
        line.startswith("shoal: generation ") and " without " in line
    )


def _events(kills: list[float], lines: list[tuple[float, str]]) -> list[dict[str, Any]]:
    """Per kill: seconds until a worker named it, and until the workers had resumed."""
    named = [t for t, line in lines if _named(line)]
    resumed = [t for t, line in lines if _recovered(line)]
    out = []
    for i, k in enumerate(kills):
        until = kills[i + 1] if i + 1 < len(kills) else float("inf")
        d = next((t - k for t in named if k <= t < until), None)
        r = next((t - k for t in resumed if k <= t < until), None)
        out.append({"detect_s": d, "recover_s": r})
    return out


def checkpoint_stall(job: JobConfig, repeats: int = 5) -> dict[str, Any]:
    """Median seconds training is blocked by one checkpoint of the job's model and
    optimizer: written in the background, and written synchronously."""
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
        for i in range(repeats):
            for background in (False, True):
                where = Path(tmp) / str(background)
                saver = checkpoint.AsyncSaver(where, keep=1, background=background)
                saver.save(i, state)
                times[background].append(saver.stall_s)
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
        return f"{statistics.median(got):.2f} (max {max(got):.2f})"

    kills = r["kills"]
    c = r["checkpoint"]
    lines = [
        f"{r['workers']} workers, a SIGKILL every {r['mtbf_s']:g} s on average; job: {r['job']}",
        "",
        "| measure | value |",
        "|---|---|",
        f"| steps | {r['steps']} |",
        f"| wall time unfailed / with kills (s) | {r['unfailed_wall_s']:.1f} / "
        f"{r['failed_wall_s']:.1f} |",
        f"| goodput unfailed / with kills (steps/s) | {r['goodput_unfailed']:.2f} / "
        f"{r['goodput_failed']:.2f} |",
        f"| goodput ratio | {r['goodput_ratio']:.3f} |",
        f"| kills | {len(kills)} |",
        f"| detection, median (max) (s) | {fmt([k['detect_s'] for k in kills])} |",
        f"| recovery to resumed workers, median (max) (s) | "
        f"{fmt([k['recover_s'] for k in kills])} |",
        f"| checkpoint size (MB) | {c['bytes'] / 1e6:.1f} |",
        f"| checkpoint stall, synchronous / background (ms) | {c['sync_stall_s'] * 1000:.1f} / "
        f"{c['background_stall_s'] * 1000:.1f} |",
        f"| stall ratio background / synchronous | {c['stall_ratio']:.3f} |",
    ]
    return "\n".join(lines) + "\n"
