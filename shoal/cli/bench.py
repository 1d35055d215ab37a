"""``shoal bench``: strategies side by side on emulated networks, and under failures.

``shoal bench faults`` lives in :mod:`shoal.cli.bench_faults`.

``shoal bench comm`` builds hosts from Linux network namespaces on one bridge
(:mod:`shoal.netns`), gives each its own share of the cores (``taskset``),
caps each host's link with ``tc ... tbf`` at every rate asked for, and runs
the same job once per strategy x codec on each: a real multi-node run through
the launcher, one node per host. It reports, per rate, time and bytes to the
target loss and the speed-up over uncompressed ``allreduce``, and writes the
table, a JSON file and a report with plots (loss vs wall time, loss vs bytes sent).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from shoal import netns
from shoal.cli import bench_chaos, bench_faults
from shoal.errors import UserError
from shoal.layout import METRICS_FILE, SUMMARY_FILE, write_atomic
from shoal.metrics import read_metrics

COMM_HELP = """Build 2 to 4 hosts from Linux network namespaces on one bridge, each with its
own share of the cores, cap each host's link with tc tbf at every rate given,
and run the same job once per STRATEGY:CODEC on each: a real multi-node run,
one node per host. Writes, per rate, time and bytes to the target loss and the
speed-up over uncompressed allreduce (results.md, results.json) and a report
with plots (loss vs wall time, loss vs bytes sent). Needs root; removes every
namespace it made, also when it fails or is interrupted."""
_PORTS = itertools.count()
DEFAULT_RUNS = (
    "allreduce:none,allreduce:fp16,allreduce:topk:0.01,allreduce:sign,allreduce:powersgd:4,"
    "local-sgd:none,diloco:none"
)
DEFAULT_JOB = (
    "--model mlp --hidden 2304 --layers 3 --batch-size 16 --optimizer adam --lr 0.0003 "
    "--steps 300 --log-every 4"
)
SMOOTH = 5
"""The target counts as reached when the mean loss of the last 5 records is at most it."""
EXAMPLES = """examples:
  sudo shoal bench comm                                   # 2 hosts, 1gbit and uncapped
  sudo shoal bench comm --rates 100mbit,1gbit --hosts 4
  sudo shoal bench comm --runs allreduce:none,local-sgd:fp16 -- --model cnn --steps 300
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser(
        "bench",
        help="strategies side by side on emulated networks, and under failures",
        description=__doc__.splitlines()[0],
    )
    kinds = bench.add_subparsers(dest="bench", metavar="BENCH", parser_class=type(bench))
    kinds.required = True
    comm = kinds.add_parser(
        "comm",
        help="strategy x codec to a target loss over capped links (needs root)",
        description=COMM_HELP,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    comm.add_argument("--out", default="", help="output directory (default runs/bench-comm-TIME)")
    comm.add_argument("--hosts", type=int, default=2, help="emulated machines, 2 to 4")
    comm.add_argument("--workers", type=int, default=1, help="workers on each host")
    comm.add_argument(
        "--rates", default="1gbit,none", help="link rates to test, comma-separated (none: uncapped)"
    )
    comm.add_argument(
        "--runs", default=DEFAULT_RUNS, help="STRATEGY:CODEC pairs to run, comma-separated"
    )
    comm.add_argument(
        "--target",
        type=float,
        default=0.1,
        help=f"training loss to reach (mean of the last {SMOOTH} metrics records)",
    )
    comm.add_argument(
        "--run-timeout", type=float, default=900, help="seconds before a run is stopped"
    )
    comm.add_argument(
        "job",
        nargs=argparse.REMAINDER,
        help=f"after --: 'shoal train' flags of the job (default: {DEFAULT_JOB})",
    )
    comm.set_defaults(run=run_comm)
    bench_faults.add_parser(kinds)
    bench_chaos.add_parser(kinds)


def _runs(spec: str) -> list[tuple[str, str]]:
    from shoal.compress import parse_codec
    from shoal.strategies import find_plugin

    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        strategy, _, codec = item.partition(":")
        codec = codec or "none"
        plugin = find_plugin(strategy)
        if not plugin.needs_process_group or not hasattr(plugin.Config(), "compress"):
            raise UserError(
                "bench comm runs collective data-parallel strategies (allreduce, local-sgd, "
                f"diloco, easgd), not {strategy}"
            )
        try:
            parse_codec(codec)
        except ValueError as e:
            raise UserError(f"--runs {item!r}: {e}") from None
        out.append((strategy, codec))
    if not out:
        raise UserError("--runs names no run")
    return out


def run_comm(args: argparse.Namespace) -> int:
    if not 2 <= args.hosts <= 4:
        raise UserError("--hosts must be 2, 3 or 4")
    if args.workers < 1:
        raise UserError("--workers must be at least 1")
    rates = [r.strip() for r in args.rates.split(",") if r.strip()]
    for rate in rates:
        try:
            netns.parse_rate(rate)
        except ValueError as e:
            raise UserError(str(e)) from None
    runs = _runs(args.runs)
    reason = netns.unavailable()
    if reason:
        raise UserError(f"shoal bench comm: {reason} (run it with sudo)")
    job = args.job[1:] if args.job[:1] == ["--"] else args.job
    job = job or DEFAULT_JOB.split()
    out = Path(args.out or f"runs/bench-comm-{time.strftime('%Y%m%d-%H%M%S')}")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    for rate in rates:
        try:
            with netns.hosts(args.hosts, rate) as hosts:
                for strategy, codec in runs:
                    name = f"{rate}-{strategy}-{codec.replace(':', '')}"
                    print(f"bench comm: {name} ...", file=sys.stderr, flush=True)
                    result = _run_one(hosts, out / rate / name, strategy, codec, job, args)
                    results.append({"rate": rate, "strategy": strategy, "codec": codec, **result})
                    print(f"bench comm: {name}: {_describe(result)}", file=sys.stderr, flush=True)
        except netns.NetnsError as e:
            raise UserError(f"cannot build the emulated hosts: {e}") from None
        if (out / rate).is_dir():
            _report(out / rate, [out / rate / r for r in sorted(os.listdir(out / rate))])
    _speedups(results)
    write_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
    table = _table(results, args, job)
    write_atomic(out / "results.md", table)
    print(table)
    return 0


def _run_one(
    hosts: list[netns.Host],
    run_dir: Path,
    strategy: str,
    codec: str,
    job: list[str],
    args: argparse.Namespace,
) -> dict[str, Any]:
    # a fresh port per run: the last run's store port may still be in TIME_WAIT
    endpoint = f"{hosts[0].addr}:{29611 + next(_PORTS)}"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    procs = []
    for rank, host in enumerate(hosts):
        out = run_dir if rank == 0 else run_dir.parent / f".{run_dir.name}-node{rank}"
        cmd = [
            *host.prefix(),
            "taskset",
            "-c",
            host_cores(rank, len(hosts)),
            "env",
            f"GLOO_SOCKET_IFNAME={host.ifname}",
            sys.executable,
            "-m",
            "shoal",
            "train",
            *job,
            "--strategy",
            strategy,
            "--compress",
            codec,
            "--workers",
            str(args.workers),
            "--nnodes",
            str(len(hosts)),
            "--node-rank",
            str(rank),
            "--rdzv-endpoint",
            endpoint,
            "--out",
            str(out),
            "--no-progress",
            "--no-report",
        ]
        log = (run_dir.parent / f".{run_dir.name}-node{rank}.log").open("w")
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
    deadline = time.monotonic() + args.run_timeout
    try:
        while any(p.poll() is None for p, _ in procs):
            if any(p.poll() not in (None, 0) for p, _ in procs):
                break  # one node failed: the others would wait for it until they time out
            if time.monotonic() > deadline:
                return {"error": f"stopped after {args.run_timeout:.0f} s"}
            time.sleep(0.2)
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    codes = [p.poll() for p, _ in procs]
    if any(codes) or not (run_dir / SUMMARY_FILE).exists():
        return {"error": f"exit codes {codes}; logs beside {run_dir}"}
    return _measure(run_dir, args.target)


def host_cores(rank: int, num_hosts: int) -> str:
    """The cores host ``rank`` may use: machines do not share cores, so neither do hosts
    (where there are fewer cores than hosts, hosts share them round-robin)."""
    cores = sorted(os.sched_getaffinity(0))
    per = max(1, len(cores) // num_hosts)
    start = (rank * per) % len(cores)
    return ",".join(str(c) for c in cores[start : start + per])


def _measure(run_dir: Path, target: float) -> dict[str, Any]:
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    steps = [r for r in read_metrics(run_dir / METRICS_FILE) if "loss" in r]
    reached = next(
        (
            r
            for i, r in enumerate(steps)
            if i + 1 >= SMOOTH
            and sum(x["loss"] for x in steps[i + 1 - SMOOTH : i + 1]) / SMOOTH <= target
        ),
        None,
    )
    per_step = [r["step_time_s"] for r in steps[1:]] or [float("nan")]
    return {
        "time_to_target_s": reached["wall_time"] if reached else None,
        "bytes_to_target": reached["bytes_sent"] if reached else None,
        "step_at_target": reached["step"] if reached else None,
        "step_time_s": sorted(per_step)[len(per_step) // 2],
        "final_loss": summary["final_loss"],
        "test_accuracy": summary.get("test_accuracy"),
        "bytes_sent_total": summary["bytes_sent_total"],
        "wall_time_s": summary["wall_time_s"],
        "run_dir": str(run_dir),
    }


def _describe(result: dict[str, Any]) -> str:
    if "error" in result:
        return f"failed: {result['error']}"
    t = result["time_to_target_s"]
    reached = f"target at {t:.1f} s" if t is not None else "target not reached"
    step_ms = result["step_time_s"] * 1000
    return f"{reached}, step {step_ms:.0f} ms, final loss {result['final_loss']:.4g}"


def _speedups(results: list[dict[str, Any]]) -> None:
    """Time to target of uncompressed allreduce at the same rate / this run's."""
    base = {
        r["rate"]: r.get("time_to_target_s")
        for r in results
        if r["strategy"] == "allreduce" and r["codec"] == "none"
    }
    for r in results:
        b, t = base.get(r["rate"]), r.get("time_to_target_s")
        r["speedup"] = b / t if b and t else None


def _table(results: list[dict[str, Any]], args: argparse.Namespace, job: list[str]) -> str:
    lines = [
        f"hosts {args.hosts} x {args.workers} worker(s); target loss {args.target}; "
        f"job: {' '.join(job)}",
        "",
        "| link | strategy | codec | step (ms) | time to target (s) | speed-up vs allreduce "
        "| MB sent to target | final loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['rate']} | {r['strategy']} | {r['codec']} | failed: {r['error']} |")
            continue
        t, s, b = r["time_to_target_s"], r["speedup"], r["bytes_to_target"]
        lines.append(
            f"| {r['rate']} | {r['strategy']} | {r['codec']} | {r['step_time_s'] * 1000:.0f} "
            f"| {'-' if t is None else f'{t:.1f}'} | {'-' if s is None else f'{s:.2f}x'} "
            f"| {'-' if b is None else f'{b / 1e6:.1f}'} | {r['final_loss']:.4g} |"
        )
    return "\n".join(lines) + "\n"


def _report(out: Path, run_dirs: list[Path]) -> None:
    from shoal.report.html import write_report

    done = [d for d in run_dirs if (d / SUMMARY_FILE).exists()]
    if done:
        write_report(done, out)
