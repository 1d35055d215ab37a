"""One self-contained HTML page comparing runs: a summary table and the plots."""

from __future__ import annotations

import html
import os
from pathlib import Path

from shoal.errors import UserError
from shoal.jobfile import load_toml
from shoal.layout import CONFIG_FILE, REPORT_FILE, write_atomic
from shoal.report.plots import write_plots
from shoal.report.runs import Run, load_run

ROWS = (
    ("strategy", "strategy", "{}"),
    ("workers", "world_size", "{}"),
    ("model", "model", "{}"),
    ("steps", "steps", "{:,}"),
    ("final train loss", "final_loss", "{:.5g}"),
    ("test loss", "test_loss", "{:.5g}"),
    ("test accuracy", "test_accuracy", "{:.4f}"),
    ("least-squares rel. error", "lstsq_rel_error", "{:.3g}"),
    ("AUC", "auc", "{:.4f}"),
    ("true model's AUC", "true_model_auc", "{:.4f}"),
    ("log-loss", "logloss", "{:.4f}"),
    ("federated rounds", "federated.rounds", "{:,}"),
    ("clients", "federated.clients", "{:,}"),
    ("clients per round", "federated.clients_per_round", "{:,}"),
    ("partition", "federated.partition", "{}"),
    ("server optimizer", "federated.server_opt", "{}"),
    ("late clients left out", "federated.dropped_late", "{:,}"),
    ("secure aggregation", "federated.secure_agg", "{}"),
    ("fragments", "synchronization.fragments", "{}"),
    ("overlap (steps)", "synchronization.overlap", "{}"),
    ("outer codec", "synchronization.codec", "{}"),
    ("fragment exchanges", "synchronization.syncs", "{:,}"),
    ("full meetings", "synchronization.meetings", "{:,}"),
    ("bytes per exchange, by fragment", "synchronization.bytes_per_sync", "{}"),
    ("seconds hidden by overlap, by worker", "synchronization.hidden_seconds", "{}"),
    ("compute utilisation, by worker", "synchronization.compute_utilisation", "{}"),
    ("differential privacy", "privacy.level", "{}-level"),
    ("epsilon", "privacy.epsilon", "{:.3g}"),
    ("delta", "privacy.delta", "{:g}"),
    ("noise multiplier", "privacy.noise_multiplier", "{:.3g}"),
    ("wall time (s)", "wall_time_s", "{:.1f}"),
    ("samples/s", "samples_per_s", "{:,.0f}"),
    ("bytes sent, all workers", "bytes_sent_total", "{:,}"),
)

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin-bottom: 2em; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
img { max-width: 48%; margin: 0 1% 1em 0; }
img.wide { max-width: 97%; }
"""

WIDE = ("privacy.png",)
"""Plots of two panels side by side: a whole row each, so that they read at the size of
the others."""


def _get(summary: dict, key: str) -> object:
    """``summary[a][b]`` for the key ``a.b``; ``None`` where there is no such entry."""
    value: object = summary
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _table(runs: list[Run]) -> str:
    head = "".join(f"<th>{html.escape(r.path.name)}</th>" for r in runs)
    body = []
    for title, key, fmt in ROWS:
        values = [_get(r.summary, key) for r in runs]
        if all(v is None for v in values):
            continue
        cells = "".join(
            f"<td>{html.escape(fmt.format(v))}</td>" if v is not None else "<td>-</td>"
            for v in values
        )
        body.append(f"<tr><td>{html.escape(title)}</td>{cells}</tr>")
    if not any(_get(r.summary, k) is not None for r in runs for k in EVALUATED):
        cells = "<td>none: no held-out split</td>" * len(runs)
        body.insert(5, f"<tr><td>evaluation</td>{cells}</tr>")
    body += _differences(runs)
    return f"<table><tr><th></th>{head}</tr>{''.join(body)}</table>"


EVALUATED = ("test_loss", "test_accuracy", "test_perplexity", "auc", "lstsq_rel_error")


def _differences(runs: list[Run]) -> list[str]:
    """Rows for the settings in which the runs differ (their config.toml), by flag name."""
    if len(runs) < 2:
        return []
    jobs = []
    for r in runs:
        try:
            jobs.append(_flat(load_toml(r.path / CONFIG_FILE).to_dict()))
        except (UserError, OSError):
            return []
    keys = sorted({k for job in jobs for k in job})
    rows = []
    for key in keys:
        if key.startswith("output.") or key.endswith(".rdzv_endpoint"):
            continue  # (where each run went, not what it did)
        values = [job.get(key) for job in jobs]
        if len({repr(v) for v in values}) > 1:
            cells = "".join(f"<td>{html.escape('-' if v is None else str(v))}</td>" for v in values)
            rows.append(f"<tr><td>{html.escape(key)}</td>{cells}</tr>")
    return rows


def _flat(tables: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in tables.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _img(name: str) -> str:
    wide = ' class="wide"' if name in WIDE else ""
    return f'<img src="{html.escape(name)}" alt="{html.escape(name)}"{wide}>'


def write_report(paths: list[Path], out: Path) -> Path:
    """Plot ``paths`` into ``out`` and write ``out/report.html``; return its path."""
    runs = [load_run(p) for p in paths]
    out.mkdir(parents=True, exist_ok=True)
    images = write_plots(runs, out)
    links = "".join(
        f'<li><a href="{html.escape(os.path.relpath(r.path, out))}">{html.escape(r.label)}</a></li>'
        for r in runs
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>shoal report</title><style>{STYLE}</style></head>
<body><h1>shoal report</h1><ul>{links}</ul>
{_table(runs)}
{"".join(_img(name) for name in images)}
</body></html>
"""
    target = out / REPORT_FILE
    write_atomic(target, page)
    return target
