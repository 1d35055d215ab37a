"""Plots and one HTML page comparing run directories."""

from __future__ import annotations

from shoal.report.html import write_report
from shoal.report.runs import Run, load_run

__all__ = ["Run", "load_run", "write_report"]
