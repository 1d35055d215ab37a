"""``shoal bench``: strategies side by side on emulated networks, and under failures.

``shoal bench faults`` lives in :mod:`shoal.cli.bench_faults`.

``shoal bench comm`` builds hosts from Linux network namespaces on one bridge
(:mod:`shoal.netns`), gives each its own share of the cores (``taskset``),
caps each host's link with ``tc ... tbf`` at every rate asked for, and runs
the same job once per strategy x codec on each: a real multi-node run through
the launcher, one node per host. ``--delay`` puts the hosts that far apart
(every packet late by it, one way: TUN devices and a relay, see
:mod:`shoal.netns`). It reports, per rate, time and bytes to the target (a
training loss, or with ``--target-perplexity`` the held-out perplexity of the
job's evaluations; the time is training's: start-up and evaluations are not
counted) and the speed-up and the fewer bytes against uncompressed ``allreduce``,
and writes
the table, a JSON file and a report with plots (loss vs wall time, loss vs bytes
sent).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import signal
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
one node per host. Writes, per rate, time (start-up and evaluations not
counted) and bytes to the target (the training loss, or --target-perplexity)
and the speed-up over uncompressed allreduce (results.md, results.json) and a report
with plots (loss vs wall time, loss vs bytes sent). --delay puts the hosts far
apart (each packet late by it, one way, through a relay in user space). A run
may carry strategy flags after its codec: diloco:int8+fragments=4+overlap=1 runs
--strategy diloco --compress int8 --fragments 4 --overlap 1. Needs root;
removes every namespace it made, also when it fails or is interrupted."""
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
  sudo shoal bench comm --rates 100mbit --delay 50ms --target-perplexity 9 \\
      --runs allreduce:none,diloco:int8+fragments=4+overlap=1 -- \\
      --model transformer --eval-every 40 --steps 800
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
        "--delay",
        default="0",
        help="one-way delay of every packet between hosts, as 50ms (default 0: none)",
    )
    comm.add_argument(
        "--runs",
        default=DEFAULT_RUNS,
        help="STRATEGY:CODEC[+FLAG=VALUE...] runs, comma-separated",
    )
    comm.add_argument(
        "--target-perplexity",
        type=float,
        default=0.0,
        help="target the held-out perplexity instead of the training loss (the job "
        "must evaluate, --eval-every)",
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
        "--stop-at-target",
        action="store_true",
        help="stop each run once it reaches the target (the table's last columns are then "
        "at the target)",
    )
    comm.add_argument(
        "job",
        nargs=argparse.REMAINDER,
        help=f"after --: 'shoal train' flags of the job (default: {DEFAULT_JOB})",
    )
    comm.set_defaults(run=run_comm)
    bench_faults.add_parser(kinds)
    bench_chaos.add_parser(kinds)


def _runs(spec: str) -> list[tuple[str, str, list[str]]]:
    """``(strategy, codec, extra flags)`` of each run."""
    from shoal.compress import parse_codec
    from shoal.strategies import find_plugin

    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        head, *pairs = item.split("+")
        strategy, _, codec = head.partition(":")
        codec = codec or "none"
        flags = []
        for pair in pairs:
            key, eq, value = pair.partition("=")
            if not eq or not key or not value:
                raise UserError(f"--runs {item!r}: {pair!r} must look like fragments=4")
            flags += [f"--{key}", value]
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
        out.append((strategy, codec, flags))
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
    try:
        delay = netns.parse_delay(args.delay)
    except ValueError as e:
        raise UserError(str(e)) from None
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
            with netns.hosts(args.hosts, rate, delay=delay) as hosts:
                for strategy, codec, flags in runs:
                    name = "-".join([rate, strategy, codec.replace(":", ""), *flags[1::2]])
                    print(f"bench comm: {name} ...", file=sys.stderr, flush=True)
                    result = _run_one(
                        hosts, out / rate / name, strategy, codec, [*job, *flags], args
                    )
                    results.append({
                        "rate": rate, "delay": args.delay, "strategy": strategy,
                        "codec": codec, "flags": " ".join(flags), **result,
                    })  # fmt: skip
                    print(f"bench comm: {name}: {_describe(result)}", file=sys.stderr, flush=True)
        except netns.NetnsError as e:
            raise UserError(f"cannot build the emulated hosts: {e}") from None
        if (out / rate).is_dir():
            _report(
                out / rate,
                [out / rate / r for r in sorted(os.listdir(out / rate))],
                args.target_perplexity,
            )
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
        procs.append((
            subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True),
            log,
        ))  # fmt: skip
    deadline = time.monotonic() + args.run_timeout
    stopped = at_target = False
    checked = time.monotonic()
    try:
        while any(p.poll() is None for p, _ in procs):
            if any(p.poll() not in (None, 0) for p, _ in procs):
                break  # one node failed: the others would wait for it until they time out
            if time.monotonic() > deadline:
                stopped = True
                break
            if args.stop_at_target and time.monotonic() > checked + 1:
                checked = time.monotonic()
                if (run_dir / METRICS_FILE).exists() and _measure(run_dir, args)["step_at_target"]:
                    at_target = True
                    break
            time.sleep(0.2)
    finally:
        for proc, log in procs:
            if proc.poll() is None:  # (the node's launcher and its workers: its session)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()
    codes = [p.poll() for p, _ in procs]
    if at_target:
        return {**_measure(run_dir, args), "stopped_at_target": True}
    if stopped and (run_dir / METRICS_FILE).exists():
        # what it reached before the time ran out (the target, or not)
        return {**_measure(run_dir, args), "stopped_after_s": args.run_timeout}
    if any(codes) or not (run_dir / SUMMARY_FILE).exists():
        return {"error": f"exit codes {codes}; logs beside {run_dir}"}
    return _measure(run_dir, args)


def host_cores(rank: int, num_hosts: int) -> str:
    """The cores host ``rank`` may use: machines do not share cores, so neither do hosts
    (where there are fewer cores than hosts, hosts share them round-robin)."""
    cores = sorted(os.sched_getaffinity(0))
    per = max(1, len(cores) // num_hosts)
    start = (rank * per) % len(cores)
    return ",".join(str(c) for c in cores[start : start + per])


def _with_training_time(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``records``, each given its ``training_time``: the wall time less the evaluations
    before it. Each evaluation lasted from its step's record to its own start (the
    record's wall time is when it began), and then its ``eval_s``."""
    at_step = {r["step"]: r["wall_time"] for r in records if "loss" in r}
    evaluating = 0.0
    for r in records:
        if "eval" in r and r["step"] in at_step:
            evaluating += max(0.0, r["wall_time"] - at_step[r["step"]])
            r["training_time"] = r["wall_time"] - evaluating
            evaluating += r.get("eval_s", 0.0)
        else:
            r["training_time"] = r["wall_time"] - evaluating
    return records


def _measure(run_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Time and bytes to the target, from the metrics (and the summary, where the run
    finished)."""
    records = _with_training_time(read_metrics(run_dir / METRICS_FILE))
    steps = [r for r in records if "loss" in r]
    if args.target_perplexity:
        # an evaluation record has no bytes: those of the step record just before it
        reached = None
        for i, r in enumerate(records):
            ppl = r.get("eval", {}).get("test_perplexity")
            if ppl is not None and ppl <= args.target_perplexity:
                before = [x for x in records[:i] if "bytes_sent" in x]
                reached = {**r, "bytes_sent": before[-1]["bytes_sent"] if before else 0}
                break
    else:
        reached = next(
            (
                r
                for i, r in enumerate(steps)
                if i + 1 >= SMOOTH
                and sum(x["loss"] for x in steps[i + 1 - SMOOTH : i + 1]) / SMOOTH <= args.target
            ),
            None,
        )
    per_step = [r["step_time_s"] for r in steps[1:]] or [float("nan")]
    evals = [r["eval"] for r in records if "eval" in r]
    last = steps[-1] if steps else {"loss": float("nan"), "bytes_sent": 0, "wall_time": 0}
    finished = (run_dir / SUMMARY_FILE).exists()
    summary = json.loads((run_dir / SUMMARY_FILE).read_text()) if finished else {}
    sync = summary.get("synchronization", {})
    return {
        "time_to_target_s": reached["training_time"] if reached else None,
        "bytes_to_target": reached["bytes_sent"] if reached else None,
        "step_at_target": reached["step"] if reached else None,
        "step_time_s": sorted(per_step)[len(per_step) // 2],
        "steps_done": steps[-1]["step"] if steps else 0,
        "final_loss": summary.get("final_loss", last["loss"]),
        "test_perplexity": evals[-1].get("test_perplexity") if evals else None,
        "test_accuracy": summary.get("test_accuracy"),
        "bytes_sent_total": summary.get("bytes_sent_total", last["bytes_sent"]),
        "wall_time_s": summary.get("wall_time_s", last["wall_time"]),
        "compute_utilisation": sync.get("compute_utilisation") or _utilisation(records),
        "hidden_seconds": sync.get("hidden_seconds"),
        "bytes_per_sync": sync.get("bytes_per_sync"),
        "run_dir": str(run_dir),
    }


def _utilisation(records: list[dict[str, Any]]) -> list[float] | None:
    """Rank 0's forward and backward over its step time, from the metrics records of a run
    that has no summary (stopped at its target; a window's step time leaves its
    evaluation out). Periodic strategies only: in ``allreduce`` the backward pass waits
    for the all-reduce, so its forward and backward time is not compute."""
    busy = wall = 0.0
    previous = 0
    for r in records:
        if "t_forward_backward" in r:
            steps = r["step"] - previous
            previous = r["step"]
            if r.get("syncs") is not None:
                busy += r["t_forward_backward"] * steps
                wall += r["step_time_s"] * steps
    return [round(busy / wall, 4)] if wall else None


def _describe(result: dict[str, Any]) -> str:
    if "error" in result:
        return f"failed: {result['error']}"
    t = result["time_to_target_s"]
    reached = f"target at {t:.1f} s" if t is not None else "target not reached"
    step_ms = result["step_time_s"] * 1000
    return f"{reached}, step {step_ms:.0f} ms, final loss {result['final_loss']:.4g}"


def _speedups(results: list[dict[str, Any]]) -> None:
    """Time (and bytes) to target of uncompressed allreduce at the same rate / this run's."""
    base = {
        r["rate"]: r
        for r in results
        if r["strategy"] == "allreduce" and r["codec"] == "none" and not r.get("flags")
    }
    for r in results:
        b = base.get(r["rate"], {})
        t, bt = b.get("time_to_target_s"), r.get("time_to_target_s")
        r["speedup"] = t / bt if t and bt else None
        x, bx = b.get("bytes_to_target"), r.get("bytes_to_target")
        r["fewer_bytes"] = x / bx if x and bx else None


def _table(results: list[dict[str, Any]], args: argparse.Namespace, job: list[str]) -> str:
    target = (
        f"held-out perplexity {args.target_perplexity}"
        if args.target_perplexity
        else f"loss {args.target}"
    )
    lines = [
        f"hosts {args.hosts} x {args.workers} worker(s); delay {args.delay}; target {target}; "
        f"job: {' '.join(job)}",
        "",
        "| link | strategy | codec | flags | step (ms) | time to target (s) | speed-up vs "
        "allreduce | MB sent to target | fewer bytes | compute utilisation | final loss "
        "| held-out perplexity |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        head = f"| {r['rate']} | {r['strategy']} | {r['codec']} | {r['flags'] or '-'} |"
        if "error" in r:
            lines.append(f"{head} failed: {r['error']} |")
            continue
        t, s, b, x = r["time_to_target_s"], r["speedup"], r["bytes_to_target"], r["fewer_bytes"]
        if t is None and "stopped_after_s" in r:
            t_text = f"not in {r['stopped_after_s']:.0f} s ({r['steps_done']} steps)"
        else:
            t_text = "not reached" if t is None else f"{t:.1f}"
        util = r.get("compute_utilisation")
        ppl = r.get("test_perplexity")
        lines.append(
            f"{head} {r['step_time_s'] * 1000:.0f} | {t_text} "
            f"| {'-' if s is None else f'{s:.2f}x'} "
            f"| {'-' if b is None else f'{b / 1e6:.1f}'} | {'-' if x is None else f'{x:.0f}x'} "
            f"| {'-' if not util or None in util else f'{min(util):.2f}'} "
            f"| {r['final_loss']:.4g} "
            f"| {'-' if ppl is None else f'{ppl:.3f}'} |"
        )
    return "\n".join(lines) + "\n"


def _report(out: Path, run_dirs: list[Path], target: float | None = None) -> None:
    """The report of a rate's runs (those stopped early too), and plots of the held-out
    metric against training time and bytes sent, where the job evaluates."""
    from shoal.report.html import write_report

    done = [d for d in run_dirs if (d / METRICS_FILE).exists()]
    if done:
        write_report(done, out)
        _eval_plots(out, done, target)


def _eval_plots(out: Path, run_dirs: list[Path], target: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = []
    for d in run_dirs:
        records = _with_training_time(read_metrics(d / METRICS_FILE))
        points, sent = [], 0
        for r in records:
            sent = r.get("bytes_sent", sent)
            ppl = r.get("eval", {}).get("test_perplexity")
            if ppl is not None:
                points.append((r["training_time"], sent, ppl))
        if points:
            curves.append((d.name, points))
    if not curves:
        return
    for name, axis, label in (("eval_vs_time.png", 0, "training time (s), evaluations left out"),
                              ("eval_vs_bytes.png", 1, "bytes sent")):  # fmt: skip
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
        for run, points in curves:
            ax.plot([p[axis] for p in points], [p[2] for p in points], label=run, linewidth=1.5)
        if target:
            ax.axhline(target, color="0.3", linestyle="--", linewidth=1, label="target")
        ax.set_xlabel(label)
        ax.set_ylabel("held-out perplexity")
        ax.set_yscale("log")
        if axis == 1:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)
