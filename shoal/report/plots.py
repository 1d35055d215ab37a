"""PNG plots of one or more runs (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from shoal.report.runs import Run

PLOTS = (
    ("loss_vs_step.png", "step", "loss", "training loss vs step", True),
    ("loss_vs_time.png", "wall_time", "loss", "training loss vs wall time (s)", True),
    ("loss_vs_bytes.png", "bytes_sent", "loss", "training loss vs bytes sent", True),
    ("throughput.png", "step", "samples_per_s", "throughput (samples/s) vs step", False),
)


def write_plots(runs: list[Run], out: Path) -> list[str]:
    """Write the standard plots into ``out``; return their file names."""
    written = []
    for name, x, y, title, log_y in PLOTS:
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
        for run in runs:
            xs = [r[x] for r in run.steps]
            ys = [r[y] for r in run.steps]
            ax.plot(xs, ys, label=run.label, linewidth=1.5)
        ax.set_title(title)
        ax.set_xlabel(x.replace("_", " "))
        ax.set_ylabel(y.replace("_", " "))
        if log_y and all(r[y] > 0 for run in runs for r in run.steps):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        tmp = out / f".{name}.tmp.png"
        fig.savefig(tmp)
        plt.close(fig)
        tmp.replace(out / name)
        written.append(name)
    return written
