"""Several ``shoal bench chaos`` runs in one table (the BENCHMARKS.md chaos section).

    for s in 0 1 2 3 4; do
        .venv/bin/shoal bench chaos --mtbf 3 --seed $s --out runs/chaos-s$s
    done
    .venv/bin/python bench/chaos_runs.py runs/chaos-s*

Per job and fault kind: faults injected and survived over all runs, detection
and recovery medians and maxima; per job: runs finished, samples lost or counted
twice, the largest parameter difference to the reference, the longest interval
without progress and the line that named it.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def _stat(values: list[float], how) -> str:
    return f"{how(values):.2f}" if values else "-"


def main(dirs: list[str]) -> int:
    runs = [json.loads((Path(d) / "results.json").read_text()) for d in dirs]
    by: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        for f in r["faults"]:
            if f.get("injected", True):
                f["finished"] = r["jobs"].get(f["job"], {}).get("finished", False)
                by.setdefault((f["job"], f["kind"]), []).append(f)
    seeds = ", ".join(str(r["seed"]) for r in runs)
    print(f"{len(runs)} runs (seeds {seeds}), mean gap {runs[0]['mtbf_s']:g} s\n")
    print("| job | fault | injected | survived | detection median / max (s) "
          "| recovery median / max (s) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for (job, kind), fs in sorted(by.items()):
        survived = sum(1 for f in fs if f["finished"] and f["recover_s"] is not None)
        detect = [f["detect_s"] for f in fs if f["detect_s"] is not None]
        recover = [f["recover_s"] for f in fs if f["recover_s"] is not None]
        print(
            f"| {job} | {kind} | {len(fs)} | {survived} | "
            f"{_stat(detect, statistics.median)} / {_stat(detect, max)} | "
            f"{_stat(recover, statistics.median)} / {_stat(recover, max)} |"
        )
    print("\n| job | finished | samples lost | counted twice | max param diff "
          "| longest stall (s) | named by |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for job in runs[0]["jobs"]:
        js = [r["jobs"][job] for r in runs if job in r["jobs"]]
        done = [j for j in js if j.get("finished")]
        stalls = [j["longest_stall"] for j in js if j.get("longest_stall")]
        worst = max(stalls, key=lambda s: s["seconds"], default={"seconds": 0.0, "line": ""})
        line = worst["line"].removeprefix("shoal: ")[:90].replace("|", "/") or "-"
        diff = max((j["max_param_diff"] for j in done), default=float("nan"))
        print(
            f"| {job} | {len(done)} of {len(js)} | {sum(j['samples_lost'] for j in done)} | "
            f"{sum(j['samples_twice'] for j in done)} | {diff:.2e} | "
            f"{worst['seconds']:.1f} | {line} |"
        )
    failures = [f for r in runs for f in r.get("failures", [])]
    for f in failures:
        print(f"FAILED: {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
