"""``shoal train``: resolve the job, check it, launch the workers, summarise."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from shoal.cli.flags import add_job_flags, request_of
from shoal.launch import describe
from shoal.layout import CONFIG_FILE
from shoal.preempt import EXIT_INTERRUPTED, EXIT_PREEMPTED
from shoal.run.guest import guest_of, run_as_guest
from shoal.run.local import run_here
from shoal.run.resolve import resolve_job
from shoal.run.summary import finish
from shoal.strategies import BUILTIN

EXAMPLES = """\
examples:
  shoal train --model mlp --workers 4 --steps 300 --optimizer adam --lr 0.003
  shoal train --model linear --workers 2 --batch-size 128 --lr 0.1 --steps 200
  shoal train --config job.toml --workers 4 --out runs/exp1
  shoal train --resume runs/exp1 --steps 600          # continue, to step 600

parties holding different columns of the same samples (see docs/VERTICAL.md):
  shoal data make clicks --rows 50000 --overlap 0.8 --out data/clicks
  shoal train --strategy vertical --parties user=data/clicks/user,item=data/clicks/item
  shoal train --strategy vertical --parties user,item=DIR --party item \
      --label-address 10.0.0.2:29600                  # one per machine, SHOAL_SECRET set

under a scheduler or engine (see docs/ENGINES.md):
  torchrun --nproc-per-node 2 -m shoal train --model mlp   # each process one worker
  srun shoal train --model mlp --out runs/x --auto-resume  # Slurm: machines from SLURM_*
  shoal train --engine ray --workers 4 --model mlp         # Ray Train (shoal[ray])
  shoal train --engine spark --workers 2 --data parquet:DIR --features 'f*' --label y

several machines (same command on each, node 0's address as the endpoint):
  shoal train --workers 2 --nnodes 2 --node-rank 0 --rdzv-endpoint 10.0.0.1:29500
  shoal train --workers 2 --nnodes 2 --node-rank 1 --rdzv-endpoint 10.0.0.1:29500

strategies (each one's options are grouped under it above; your own:
--strategy package.module:Plugin, see docs/STRATEGIES.md):
{strategies}

--batch-size is the GLOBAL batch: the same samples make up step t whatever the
number of workers, so synchronous strategies match a single-process run.
"""


def add_parser(sub: argparse._SubParsersAction, argv: list[str] | None = None) -> None:
    p = sub.add_parser(
        "train",
        help="train a model with a distributed strategy",
        description="Train a model across worker processes (and machines) with one strategy. "
        "Flags override the --config file; the resolved job is written to RUN_DIR/config.toml.",
        epilog=EXAMPLES.format(
            strategies="\n".join(f"  {k:10} {v.description}" for k, v in BUILTIN.items())
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="TOML", help="job file with [model], [train], ... tables")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check the job and print the resolved config and torchrun command; run nothing",
    )
    add_job_flags(p, argv)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    request = request_of(args)
    launcher = guest_of()
    if launcher is not None:
        code = run_as_guest(request, launcher)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # (as shoal.worker: gloo's threads may abort a normal exit)
    job = resolve_job(request)
    if args.dry_run:
        from shoal.jobfile import dumps_toml

        print(dumps_toml(job))
        if job.cluster.engine == "shoal":
            print(describe(job.cluster, str(Path(job.output.out) / CONFIG_FILE)))
        return 0
    if job.cluster.engine != "shoal":
        from shoal.run import engines

        engines.check_for_engine(job, request, job.cluster.engine)
        if job.cluster.engine == "ray":
            return engines.run_on_ray(job)
        return engines.run_on_spark(job)
    ended = run_here(job)
    if ended.line:
        said = "" if ended.code in (EXIT_PREEMPTED, EXIT_INTERRUPTED) else "error: "
        print(f"shoal: {said}{ended.line}", file=sys.stderr)
    if ended.code == 0 and job.cluster.node_rank == 0:
        finish(job)
    return ended.code
