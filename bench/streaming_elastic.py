"""Streaming DiLoCo losing a worker and taking a new one in, in place: do the others stop?

    python bench/streaming_elastic.py [--workers 3 --steps 240 --kill-after 70 --job small]
                                      [--failed-only] [--no-saves]

Job (``--job small``): the built-in transformer LM (hidden 128, 2 blocks, context 64),
diloco with ``--sync-every 16 --fragments 4 --overlap 2 --compress int8``, full
meetings at ``--checkpoint-every 32``; ``--job lm``: the model and streaming settings
of the slow-links benchmark (hidden 256, 4 blocks; H 64, 4 fragments, overlap 4,
int4), full meetings every 64 steps. One metrics record per step. Worker 1 is SIGKILLed
after step ``--kill-after``; the others go back to the last full meeting and go
on without it, and the launcher's replacement joins at a later full meeting.
``--no-saves``: the replicas meet at the same steps (``--meet-every``) but write no
checkpoint there (only the last step's).

Reported: the generations (members, the step each starts at, the process ids of
the workers that were never lost), each step's time on rank 0 (which is never
lost): median, the largest and the steps over twice the median; each regroup's
stall (forming the group, passing the state); every epoch's digest; and, unless
``--failed-only``, the same job unfailed, for the wall time the loss cost.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

JOBS = {
    "small": ["--model", "transformer", "--hidden", "128", "--layers", "2", "--heads", "4",
              "--context", "64", "--batch-size", "24", "--strategy", "diloco",
              "--sync-every", "16", "--fragments", "4", "--overlap", "2", "--compress", "int8",
              "--checkpoint-every", "32"],
    # the job and the streaming settings of the slow-links table (docs/BENCHMARKS.md)
    "lm": ["--model", "transformer", "--hidden", "256", "--layers", "4", "--heads", "4",
           "--context", "64", "--batch-size", "24", "--optimizer", "adamw", "--lr", "0.001",
           "--strategy", "diloco", "--sync-every", "64", "--fragments", "4", "--overlap", "4",
           "--compress", "int4", "--outer-lr", "1.0", "--outer-momentum", "0",
           "--checkpoint-every", "64"],
}  # fmt: skip
COMMON = ["--log-every", "1", "--no-progress", "--no-report"]


def run(out: Path, job: str, workers: int, steps: int, fault: str, saves: bool = True) -> dict:
    args = JOBS[job]
    if not saves:  # the same meetings, no checkpoint written at them
        at = args.index("--checkpoint-every")
        args = [*args[:at], "--meet-every", args[at + 1], *args[at + 2 :]]
    cmd = [sys.executable, "-m", "shoal", "train", *args, *COMMON,
           "--workers", str(workers), "--steps", str(steps), "--out", str(out)]  # fmt: skip
    env = {"SHOAL_FAULT": fault} if fault else {}
    proc = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"the run failed:\n{proc.stderr[-2000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    gens_file = out / "generations.jsonl"
    gens = [json.loads(x) for x in gens_file.read_text().splitlines()] if gens_file.exists() else []
    return {"records": records, "summary": summary, "generations": gens}


def _steps(records: list[dict]) -> tuple[float, list[float], list[tuple[int, float]]]:
    """Rank 0's step times (the first two apart): their median, all of them, and the
    steps (with their seconds) slower than twice the median."""
    timed = [r for r in records if "step_time_s" in r and r["step"] > 2]
    times = [r["step_time_s"] for r in timed]
    median = statistics.median(times)
    slow = [(r["step"], round(r["step_time_s"], 3)) for r in timed if r["step_time_s"] > 2 * median]
    return median, times, slow


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--kill-after", type=int, default=70)
    ap.add_argument(
        "--job", choices=sorted(JOBS), default="small", help="small, or lm: the slow-links model"
    )
    ap.add_argument("--failed-only", action="store_true", help="skip the run without the loss")
    ap.add_argument(
        "--no-saves", action="store_true", help="meet at the same steps, write no checkpoints"
    )
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        crash = f"crash:rank=1:step={a.kill_after}"
        saves = not a.no_saves
        failed = run(Path(tmp) / "failed", a.job, a.workers, a.steps, crash, saves)
        unfailed = None if a.failed_only else run(Path(tmp) / "unfailed", a.job, a.workers,
                                                  a.steps, "", saves)  # fmt: skip
    gens = failed["generations"]
    kept = [u for u in gens[0]["members"] if all(u in g["members"] for g in gens)]
    pids_kept = all(g["pids"][u] == gens[0]["pids"][u] for g in gens for u in kept)
    median, times, slow = _steps(failed["records"])
    s = failed["summary"]
    print(f"generations: {[(g['step'], g['members']) for g in gens]}")
    print(f"workers never lost: {kept}; their process ids unchanged: {pids_kept}")
    print(f"rank 0 step time: median {median * 1000:.0f} ms, largest {max(times) * 1000:.0f} ms "
          f"({max(times) / median:.2f}x); steps over 2x the median: {slow}")  # fmt: skip
    for r in s.get("regroups", []):
        print(
            f"regroup to generation {r['generation']} ({r['why']}): stall "
            f"{r['stall_s'] * 1000:.0f} ms on rank 0, of which forming the group "
            f"{r.get('group_s', 0) * 1000:.0f} ms, passing the state "
            f"{r.get('state_s', 0) * 1000:.0f} ms ({r['state_bytes'] / 1e6:.1f} MB sent)"
        )
    print(f"every epoch's digest exact: {all(e['exact'] for e in s['epochs'])}")
    if unfailed is not None:
        u = unfailed["summary"]
        u_median, u_times, u_slow = _steps(unfailed["records"])
        print(f"the same job unfailed, rank 0: median {u_median * 1000:.0f} ms, largest "
              f"{max(u_times) * 1000:.0f} ms ({max(u_times) / u_median:.2f}x); steps over 2x "
              f"its median: {u_slow}")  # fmt: skip
        print(f"wall time: {s['wall_time_s']:.1f} s with the loss, {u['wall_time_s']:.1f} s "
              f"without; held-out perplexity {s['test_perplexity']:.3f} vs "
              f"{u['test_perplexity']:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
