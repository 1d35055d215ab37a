"""``shoal report``: plots and an HTML page comparing run directories."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from shoal.errors import UserError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="plot runs and write one HTML page comparing them",
        description="Write loss/throughput plots (PNG) and report.html comparing RUN_DIRs.",
        epilog="example: shoal report runs/a runs/b --out runs/compare",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="directories written by shoal train")
    p.add_argument(
        "--out",
        metavar="DIR",
        help="where to write (default: the run itself for one run, else runs/report-<time>)",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from shoal.report import write_report

    paths = [Path(p) for p in args.runs]
    for p in paths:
        if not p.is_dir():
            raise UserError(f"{p} is not a directory")
    if args.out:
        out = Path(args.out)
    elif len(paths) == 1:
        out = paths[0]
    else:
        out = Path("runs") / f"report-{time.strftime('%Y%m%d-%H%M%S')}"
    target = write_report(paths, out)
    print(f"report: {target}")
    return 0
