"""A checked job, run by shoal's own launcher on this machine: its run directory taken,
its processes started and watched, and how it ended, in one line."""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from shoal import checkpoint
from shoal.config import JobConfig
from shoal.launch import JobPreempted, LaunchFailed
from shoal.layout import USER_ERROR_FILE
from shoal.preempt import EXIT_INTERRUPTED, EXIT_PREEMPTED
from shoal.run.directory import prepare_run_dir
from shoal.strategies import resolve


@dataclass
class Ended:
    """How a job ended: its exit status (0 finished, 1 failed, 2 a worker refused the job
    and said why, :data:`~shoal.preempt.EXIT_PREEMPTED` or, after Ctrl-C,
    :data:`~shoal.preempt.EXIT_INTERRUPTED`: stopped at a checkpoint) and one line for
    anything but a finish (empty where a worker already said it)."""

    code: int
    line: str = ""


def run_here(job: JobConfig) -> Ended:
    """Take the run directory (node 0 holds it until the job ends), start this machine's
    processes and wait for them."""
    config_path, lock = prepare_run_dir(job)
    try:
        return _launch(job, config_path)
    finally:
        if lock is not None:
            lock.release()
        if job.cluster.node_rank != 0:
            shutil.rmtree(config_path.parent, ignore_errors=True)


def _launch(job: JobConfig, config_path: Path) -> Ended:
    try:
        resolve(job).launch(job, str(config_path))
    except JobPreempted as e:
        r = e.record
        ctrl_c = e.ctrl_c
        return Ended(
            EXIT_INTERRUPTED if ctrl_c else EXIT_PREEMPTED,
            f"{'interrupted (Ctrl-C)' if ctrl_c else 'preempted (' + r['signal'] + ')'}: "
            f"every worker stopped after step {r['step']} and checkpointed it "
            f"{r['checkpoint_s']:.1f} s after the signal; continue with: "
            f"shoal train --resume {job.output.out}",
        )
    except LaunchFailed as e:
        if (Path(job.output.out) / USER_ERROR_FILE).exists():
            return Ended(2)  # a worker found a mistake in the job, and said so
        return Ended(1, f"training failed: {e}{how_to_continue(job)}")
    return Ended(0)


def how_to_continue(job: JobConfig) -> str:
    """What ``--resume`` and ``--auto-resume`` can do with a run that stopped."""
    if job.cluster.node_rank != 0:
        return ""
    out = job.output.out
    latest = checkpoint.load_latest(resolve(job).checkpoint_root(Path(out)))
    if latest is None:
        return (f" ({out} holds no checkpoint: after a fix, the same command with "
                f"--auto-resume starts it over there)")  # fmt: skip
    return f" (continue from step {latest[1]['step']} with: shoal train --resume {out})"


def main(argv: list[str]) -> int:
    """``python -m shoal.run.local CONFIG``: launch the job whose run directory is taken
    already (by :func:`shoal.train`, which waits for this process); its end in one line."""
    from shoal.jobfile import load_toml

    job = load_toml(argv[0])
    try:
        ended = _launch(job, Path(argv[0]))
    except KeyboardInterrupt:
        print("shoal: interrupted", file=sys.stderr)
        return 130
    if ended.line:
        said = "" if ended.code in (EXIT_PREEMPTED, EXIT_INTERRUPTED) else "error: "
        print(f"shoal: {said}{ended.line}", file=sys.stderr)
    return ended.code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
