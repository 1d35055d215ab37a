"""Draw streaming DiLoCo's schedule (docs/figures/streaming-schedule.png).

    .venv/bin/python bench/streaming_schedule.py [--sync-every 8 --fragments 4 --overlap 2]

One row per fragment: a dot where its exchange starts (after that step), a bar
while it runs in the background with the inner steps, a bar's end where it is
merged; the whole model meets in full after the last step. The schedule is
shoal's own (:func:`shoal.strategies.periodic.strategy.offsets`), not redrawn by hand.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from shoal.strategies.periodic.strategy import offsets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sync-every", type=int, default=8)
    ap.add_argument("--fragments", type=int, default=4)
    ap.add_argument("--overlap", type=int, default=2)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--out", default="docs/figures/streaming-schedule.png")
    a = ap.parse_args()
    h, f, tau = a.sync_every, a.fragments, a.overlap
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 4.2), sharex=True, height_ratios=[f, 1])
    for i, off in enumerate(offsets(h, f)):
        starts = [s for s in range(1, a.steps) if s % h == off]
        for s in starts:
            top.barh(i, max(tau, 0.15), left=s, height=0.5, color="tab:blue", alpha=0.35)
            top.plot([s], [i], "o", color="tab:blue")
            top.plot([s + tau], [i], "|", color="tab:red", markersize=14)
    top.axvline(a.steps, color="black", lw=1)
    top.set_yticks(range(f), [f"fragment {i}" for i in range(f)])
    top.invert_yaxis()
    top.set_title(
        f"streaming: --sync-every {h} --fragments {f} --overlap {tau} "
        "(dot: exchange starts; bar: in the background; red: merged)",
        fontsize=9,
    )
    for s in range(h, a.steps + 1, h):
        bottom.barh(0, 0.6, left=s - 0.3, height=0.5, color="tab:gray")
    bottom.set_yticks([0], ["whole model,\nblocking"])
    bottom.set_xlabel("inner step")
    bottom.set_xlim(0, a.steps + 1)
    fig.tight_layout()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=110)
    print(a.out)


if __name__ == "__main__":
    main()
