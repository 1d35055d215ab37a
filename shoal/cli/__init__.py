"""The ``shoal`` command: one module per subcommand."""

from __future__ import annotations

import argparse
import os
import sys

from shoal.errors import PeerRejected, UserError


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr, not a usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``shoal`` parser; ``argv`` shows ``train`` a strategy of the user's own, whose
    options become flags too."""
    from shoal.cli import bench, data, federate, report, train

    parser = Parser(
        prog="shoal",
        description="Distributed training with every classic strategy, one job model.",
        epilog="Run 'shoal COMMAND --help' for the flags of each command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    train.add_parser(sub, argv or [])
    report.add_parser(sub)
    bench.add_parser(sub)
    data.add_parser(sub)
    federate.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``shoal`` console command."""
    args_in = sys.argv[1:] if argv is None else argv
    # Before torch loads, as the workers are forks of this process (shoal.launch): a dead
    # peer makes c10d print a C++ stack per failed store call (shoal names the culprit
    # itself); and no OpenMP thread team may exist at the fork (libgomp's would hang the
    # child), so a command that launches workers computes on one thread. Workers set
    # their own count.
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    if args_in[:1] not in (["data"], ["report"]):
        os.environ["OMP_NUM_THREADS"] = "1"
    try:
        parser = build_parser(args_in)
    except UserError as e:
        print(f"shoal: error: {e}", file=sys.stderr)
        return 2
    args = parser.parse_args(args_in)
    try:
        return args.run(args)
    except UserError as e:
        print(f"shoal: error: {e}", file=sys.stderr)
        return 2
    except PeerRejected as e:
        print(f"shoal: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("shoal: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # (output piped to head, say): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
