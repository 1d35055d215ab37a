"""A finished run, where its directory is: the report and the summary table."""

from __future__ import annotations

import json
from pathlib import Path

from shoal.config import JobConfig
from shoal.layout import REPORT_FILE, SUMMARY_FILE
from shoal.strategies import resolve


def finish(job: JobConfig, report: bool = True, table: bool = True) -> None:
    """A finished job, where its run directory is: the report (unless ``report`` is
    false: rank 0 of a guest job wrote it) and the summary table (unless ``table`` is)."""
    out = Path(job.output.out)
    summary_path = out / SUMMARY_FILE
    if not summary_path.exists():
        return
    summary = json.loads(summary_path.read_text())
    if job.output.report and report:
        from shoal.report import write_report

        write_report([out], out)
    if table:
        extra = resolve(job).summary_rows(summary)
        print_summary(summary, out, report=job.output.report, extra=extra)


def print_summary(
    summary: dict, out: Path, report: bool, extra: list[tuple[str, str]] | None = None
) -> None:
    """A readable table of the finished run."""
    from rich.console import Console
    from rich.table import Table

    who = "parties" if "vertical" in summary else "workers"
    table = Table(
        title=f"shoal: {summary['strategy']} on {summary['world_size']} {who}", show_header=False
    )
    table.add_column(style="bold")
    table.add_column(justify="right")
    rows = [
        ("model / data", f"{summary['model']} / {summary['data']}"),
        ("steps", f"{summary['steps']:,}"),
        ("final train loss", f"{summary['final_loss']:.5g}"),
    ]
    keys = ("test_loss", "test_accuracy", "test_perplexity", "unigram_perplexity")
    evaluated = False
    for key in (*keys, "lstsq_rel_error", "auc", "true_model_auc"):
        if key in summary:
            rows.append((key.replace("_", " "), f"{summary[key]:.5g}"))
            evaluated = True
    if not evaluated:
        rows.append(("evaluation", "none: the dataset has no held-out split"))
    memory = summary.get("memory")
    if memory:
        state = _human_bytes(memory["params"] + memory["grads"] + memory["optimizer"])
        peak = _human_bytes(memory["activations_peak"])
        rows.append(("memory per rank (most)", f"state {state}, activations {peak}"))
        if memory.get("private"):
            rows.append(("process memory (most)", _human_bytes(memory["private"])))
    epochs = summary.get("epochs") or []
    if epochs:
        wrong = [str(e["epoch"]) for e in epochs if not e["exact"]]
        rows.append(("sample digests", f"DIFFER in epoch {', '.join(wrong)}" if wrong else
                     f"exact in {len(epochs)} epoch{'s' if len(epochs) > 1 else ''}"))  # fmt: skip
    plan = summary.get("balance")
    if plan:
        shares = " ".join(f"{s:.2f}" for s in plan["shares"])
        changes = f", {plan['replans']} re-plan{'s' if plan['replans'] != 1 else ''}"
        probes = plan.get("probes", {})
        if probes.get("tried"):
            changes += f", {probes['kept']} of {probes['tried']} probes kept"
        rows.append((f"balance ({plan['mode']})", f"shares {shares}{changes}"))
    dp = summary.get("privacy")
    if dp:
        eps = "inf (no noise)" if dp["epsilon"] is None else f"{dp['epsilon']:.3g}"
        rows.append((f"privacy ({dp['level']}-level DP)",
                     f"epsilon {eps} at delta {dp['delta']:g}: noise {dp['noise_multiplier']:.3g}"
                     f" x clip {dp['clip']:g}, rate {dp['sample_rate']:.3g}, "
                     f"{dp['steps']} steps"
                     + ("; NOT private: noise and samples from --seed (--dp-insecure-seed)"
                        if "--seed" in dp.get("randomness", "") else "")))  # fmt: skip
    rows += extra or []  # the strategy's own (its plugin's summary_rows)
    resumed = summary.get("resumed_from_step")
    since = f", since step {resumed}" if resumed else ""  # (this process's counters)
    rows += [
        ("wall time", f"{summary['wall_time_s']:.1f} s"),
        ("throughput", f"{summary['samples_per_s']:,.0f} samples/s"),
        (f"bytes sent (all workers{since})", _human_bytes(summary["bytes_sent_total"])),
        ("run directory", str(out)),
    ]
    if report:
        rows.append(("report", str(out / REPORT_FILE)))
    for k, v in rows:
        table.add_row(k, v)
    Console().print(table)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
