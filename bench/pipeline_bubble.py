"""The pipeline bubble, measured, against GPipe's (P-1)/(M+P-1).

    python bench/pipeline_bubble.py --microbatches 1 2 4 8

Job: the transformer (width 256, 4 blocks, context 64) on the shipped text,
global batch 64, Adam, ``--strategy pipeline`` on P = 2 workers (two stages
of equal parameter count), 30 steps per run. Each stage times its own forward
and backward chunks; its idle fraction is 1 - busy / step time, averaged over
the steps after the first and over the stages (``summary.json``'s
``pipeline.bubble``). Idle time includes waiting for activations and
gradients on the wire, so the measured bubble sits at or above the theory;
with one core per stage it is compute, not scheduling, that fills a step.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
JOB = ["--model", "transformer", "--hidden", "256", "--layers", "4", "--context", "64"]
JOB += ["--batch-size", "64", "--steps", "30", "--optimizer", "adam", "--lr", "0.001"]
JOB += ["--strategy", "pipeline", "--workers", "2", "--no-progress", "--no-report"]


def run(out: Path, schedule: str, microbatches: int) -> dict:
    cmd = [sys.executable, "-m", "shoal", "train", "--out", str(out), *JOB]
    cmd += ["--schedule", schedule, "--microbatches", str(microbatches)]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, timeout=600)
    summary = json.loads((out / "summary.json").read_text())
    return {**summary["pipeline"], "step_time_s": summary["wall_time_s"] / summary["steps"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--microbatches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--schedules", nargs="+", default=["gpipe", "1f1b"])
    args = parser.parse_args()
    print("| schedule | M | measured bubble | (P-1)/(M+P-1) | idle per stage |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for schedule in args.schedules:
            for m in args.microbatches:
                if schedule != "gpipe" and m < 2:  # 1f1b needs a microbatch per stage
                    continue
                r = run(Path(tmp) / f"{schedule}-{m}", schedule, m)
                idle = " / ".join(f"{v:.3f}" for v in r["idle_per_rank"])
                theory = r["gpipe_bubble_theory"]
                print(f"| {schedule} | {m} | {r['bubble']:.3f} | {theory:.3f} | {idle} |")


if __name__ == "__main__":
    main()
