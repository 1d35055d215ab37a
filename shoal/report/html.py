"""One self-contained HTML page comparing runs: a summary table and the plots."""

from __future__ import annotations

import html
import os
from pathlib import Path

from shoal.layout import REPORT_FILE, write_atomic
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
"""


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
    return f"<table><tr><th></th>{head}</tr>{''.join(body)}</table>"


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
{"".join(f'<img src="{name}" alt="{name}">' for name in images)}
</body></html>
"""
    target = out / REPORT_FILE
    write_atomic(target, page)
    return target
