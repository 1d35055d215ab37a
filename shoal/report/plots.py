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
        written.append(_save(fig, out, name))
    for extra in (_time_per_worker(runs, out), _eval_vs_step(runs, out), _shares(runs, out),
                  _privacy(runs, out)):  # fmt: skip
        if extra:
            written.append(extra)
    return written


def _save(fig: plt.Figure, out: Path, name: str) -> str:
    tmp = out / f".{name}.tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out / name)
    return name


TIME_PHASES = ("wait", "data", "forward_backward", "comm", "optimizer")


def _time_per_worker(runs: list[Run], out: Path) -> str | None:
    """Where the time goes: each worker's seconds per phase, stacked."""
    bars = [
        (f"{run.path.name} w{w.get('rank', i)}", w["time"])
        for run in runs
        for i, w in enumerate(run.summary.get("per_worker", []))
        if w.get("time")
    ]
    if not bars:
        return None
    fig, ax = plt.subplots(figsize=(6.4, max(2.4, 1.2 + 0.35 * len(bars))), dpi=110)
    left = [0.0] * len(bars)
    for phase in TIME_PHASES:
        widths = [t.get(phase, 0.0) for _, t in bars]
        ax.barh(range(len(bars)), widths, left=left, label=phase.replace("_", "/"))
        left = [a + b for a, b in zip(left, widths)]
    ax.set_yticks(range(len(bars)), [name for name, _ in bars], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("seconds (comm overlaps forward/backward where collectives run in backward)")
    ax.set_title("where the time goes, per worker")
    ax.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.25 - 0.5 / len(bars)))
    fig.tight_layout()
    return _save(fig, out, "time_per_worker.png")


EVAL_KEYS = ("test_accuracy", "auc", "test_perplexity", "test_loss")


def _eval_vs_step(runs: list[Run], out: Path) -> str | None:
    """The evaluation metric over steps (runs with more than one evaluation)."""
    key = next(
        (k for k in EVAL_KEYS for run in runs if any(k in e["eval"] for e in run.evals)), None
    )
    if key is None or not any(len(run.evals) > 1 for run in runs):
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for run in runs:
        points = [(e["step"], e["eval"][key]) for e in run.evals if key in e["eval"]]
        if points:
            ax.plot(*zip(*points), marker="o", markersize=3, label=run.label, linewidth=1.5)
    ax.set_title(f"{key.replace('_', ' ')} vs step")
    ax.set_xlabel("step")
    ax.set_ylabel(key.replace("_", " "))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out, "eval_vs_step.png")


def _privacy(runs: list[Run], out: Path) -> str | None:
    """Differentially private runs: epsilon spent over steps, and the evaluation metric
    against the epsilon spent when it was measured."""
    private = [run for run in runs if any("epsilon" in r for r in run.steps)]
    if not private:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.0), dpi=110)
    key = next((k for k in EVAL_KEYS for run in private for e in run.evals if k in e["eval"]),
               None)  # fmt: skip
    for run in private:
        spent = [(r["step"], r["epsilon"]) for r in run.steps if "epsilon" in r]
        left.plot(*zip(*spent), label=run.label, linewidth=1.5)
        if key is None:
            continue
        points = []
        for e in run.evals:
            before = [eps for step, eps in spent if step <= e["step"]]
            if key in e["eval"]:
                points.append((before[-1] if before else 0.0, e["eval"][key]))
        if points:
            right.plot(*zip(*points), marker="o", markersize=3, label=run.label)
    left.set_title("privacy spent")
    left.set_xlabel("step")
    left.set_ylabel("epsilon")
    right.set_title(f"{(key or 'evaluation').replace('_', ' ')} vs epsilon")
    right.set_xlabel("epsilon")
    right.set_ylabel((key or "").replace("_", " "))
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out, "privacy.png")


def _shares(runs: list[Run], out: Path) -> str | None:
    """The load balancer's plan over steps: each rank's share of a global batch, stacked
    (one panel per balanced run)."""
    balanced = [run for run in runs if any("shares" in r for r in run.steps)]
    if not balanced:
        return None
    fig, axes = plt.subplots(
        len(balanced), 1, figsize=(6.4, 0.6 + 2.6 * len(balanced)), dpi=110, squeeze=False
    )
    for ax, run in zip(axes[:, 0], balanced):
        points = [(r["step"], r["shares"]) for r in run.steps if "shares" in r]
        steps = [s for s, _ in points]
        ranks = list(zip(*(v for _, v in points)))
        ax.stackplot(steps, ranks, labels=[f"rank {i}" for i in range(len(ranks))],
                     step="pre", alpha=0.85)  # fmt: skip
        ax.set_ylim(0, 1)
        if len(steps) > 1:
            ax.set_xlim(min(steps), max(steps))
        mode = run.summary.get("balance", {}).get("mode", "")
        ax.set_title(f"share of each global batch per rank: {run.path.name} {mode}".strip())
        ax.set_xlabel("step")
        ax.set_ylabel("share")
        ax.legend(fontsize=7, ncol=min(8, len(ranks)), loc="lower left")
    fig.tight_layout()
    return _save(fig, out, "balance_shares.png")
