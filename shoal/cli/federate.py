"""``shoal federate``: client processes of a federation on another machine."""

from __future__ import annotations

import argparse
import multiprocessing
import sys

from shoal.errors import UserError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "federate",
        help="train a federation's clients here, for a server elsewhere",
        description="Join the federation whose server runs `shoal train --strategy fedavg "
        "--listen HOST:PORT`: prove the job's secret (SHOAL_SECRET, the same as the "
        "server's), receive the job, build the data and the clients' rows here (or, with "
        "--data, read this client's own rows), then train the clients the server hands "
        "out, round after round, until it is done. Only model updates leave this machine.",
        epilog="examples: SHOAL_SECRET=$SECRET shoal federate --connect 10.0.0.1:7000 "
        "--processes 2;  with rows of its own (server: --partition files): "
        "shoal federate --connect 10.0.0.1:7000 --data /data/mine.parquet --client 3",
    )
    p.add_argument("--connect", required=True, metavar="HOST:PORT", help="the server")
    p.add_argument("--processes", type=int, default=1,
                   help="client processes to run here (default 1)")  # fmt: skip
    p.add_argument(
        "--data",
        default="",
        metavar="PATH",
        help="this client's own rows (Parquet), for a server started with --partition "
        "files: they never leave this machine, and the server never has them",
    )
    p.add_argument(
        "--client",
        type=int,
        default=None,
        metavar="K",
        help="with --data: which of the federation's clients this is (0..N-1)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        metavar="S",
        help="seconds to wait for the server, and for each answer (default 300)",
    )
    p.set_defaults(run=run)


def _one(address: str, timeout_s: float, data: str = "", client: int | None = None) -> int:
    from shoal.strategies.federated.client import client_name, run_client

    return run_client(address, client_name(), timeout_s, data, client)


def _child(address: str, timeout_s: float) -> None:
    sys.exit(0 if _one(address, timeout_s) >= 0 else 1)


def run(args: argparse.Namespace) -> int:
    host, _, port = args.connect.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--connect {args.connect}: give HOST:PORT, e.g. 10.0.0.1:7000")
    if args.processes < 1:
        raise UserError(f"--processes must be at least 1, got {args.processes}")
    if (args.client is not None) != bool(args.data):
        raise UserError("--data and --client go together: this client's rows, and which "
                        "client it is")  # fmt: skip
    if args.data and args.processes != 1:
        raise UserError("--data is one client's rows: run it with --processes 1")
    if args.processes == 1:
        pushed = _one(args.connect, args.timeout, args.data, args.client)
        print(f"shoal federate: {pushed} client updates pushed", file=sys.stderr)
        return 0
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_child, args=(args.connect, args.timeout))
             for _ in range(args.processes)]  # fmt: skip
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    failed = [p.exitcode for p in procs if p.exitcode]
    if failed:
        print(f"shoal: error: {len(failed)} of {len(procs)} client processes failed",
              file=sys.stderr)  # fmt: skip
        return 1
    print(f"shoal federate: {len(procs)} client processes done", file=sys.stderr)
    return 0
