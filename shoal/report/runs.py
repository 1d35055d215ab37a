"""Reading a run directory back: config, metrics and summary."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal.errors import UserError
from shoal.layout import METRICS_FILE, SUMMARY_FILE
from shoal.metrics import read_metrics


@dataclass
class Run:
    """A finished (or partial) run as written by ``shoal train``."""

    path: Path
    label: str
    summary: dict[str, Any]
    steps: list[dict[str, Any]]
    evals: list[dict[str, Any]]


def load_run(path: Path) -> Run:
    """Load ``path``; a directory without ``metrics.jsonl`` is a :class:`UserError`."""
    metrics = path / METRICS_FILE
    if not metrics.is_file():
        raise UserError(f"{path} is not a shoal run directory (no metrics.jsonl)")
    try:
        records = read_metrics(metrics)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {metrics}: {e}") from None
    summary_path = path / SUMMARY_FILE
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval" in r]
    label = path.name
    if summary:
        label = f"{path.name} ({summary['strategy']} x{summary['world_size']})"
    return Run(path, label, summary, steps, evals)
