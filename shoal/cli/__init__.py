"""The ``shoal`` command: one module per subcommand."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import sys
import threading

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


def _unknown(parser: argparse.ArgumentParser, args: argparse.Namespace, unknown: list[str]) -> None:
    """A flag the command does not have: one line naming it, the closest ones it does
    have, and the command's own ``--help``; exit 2."""
    import difflib

    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    command = sub.choices[args.command]
    known = [s for a in command._actions for s in a.option_strings]
    flag = next((u for u in unknown if u.startswith("-")), unknown[0]).partition("=")[0]
    close = difflib.get_close_matches(flag, known, n=2, cutoff=0.8)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    command.exit(2, f"{command.prog}: error: unrecognized argument {flag}{hint} "
                    f"(see {command.prog} --help)\n")  # fmt: skip


def run_command() -> None:
    """The ``shoal`` console command (and ``python -m shoal``): :func:`main`, then an exit
    that skips tearing the interpreter down, which with torch loaded takes a second of
    CPU after the work is done. What a normal exit does for others still happens: the
    threads that are not daemons are joined, the ``atexit`` handlers run (logging's
    flush, Ray's shutdown, ...), and the output is flushed."""
    try:
        code = main()
    except SystemExit as e:  # (argparse's --help and usage errors)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    me = threading.current_thread()
    for thread in threading.enumerate():
        if thread is not me and not thread.daemon:
            thread.join()
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)  # (CPython's own)
    if run_exit_handlers is None:
        sys.exit(code)
    run_exit_handlers()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``shoal`` console command (returns its exit status)."""
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
    args, unknown = parser.parse_known_args(args_in)
    if unknown:
        _unknown(parser, args, unknown)
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
    run_command()
