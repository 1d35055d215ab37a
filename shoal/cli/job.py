"""The job a ``shoal train`` command describes: resolved from defaults, the run
directory, ``--config`` and flags, checked, given its run directory; and the summary
table of a finished run."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import copy
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from shoal import checkpoint, faults, rundir
from shoal.cli.flags import apply_flags, given
from shoal.config import JobConfig, load_toml
from shoal.data import Dataset, build_dataset
from shoal.data.files import check_unchanged, fingerprints
from shoal.dist import resolve_device
from shoal.environment import cluster_from_env
from shoal.errors import UserError
from shoal.launch import check_port
from shoal.layout import (
    CONFIG_FILE,
    DATASET_FILE,
    LOCK_FILE,
    REPORT_FILE,
    SUMMARY_FILE,
    USER_ERROR_FILE,
    write_atomic,
    write_config,
)
from shoal.models import build_model, check_model_name, default_data
from shoal.registry import is_user_ref
from shoal.strategies import BUILTIN, Plugin, resolve
from shoal.strategies.plugin import check_all


def resolve_job(args: argparse.Namespace) -> JobConfig:
    """Defaults <- run dir (on --resume) <- --config <- flags, then checked."""
    resume = getattr(args, "output.resume", "") or _auto_resume(args)
    job = stored = JobConfig()
    if resume:
        if not (Path(resume) / CONFIG_FILE).is_file():
            raise UserError(f"--resume {resume}: not a shoal run directory (no config.toml)")
        job = load_toml(Path(resume) / CONFIG_FILE)
        stored = copy.deepcopy(job)
    if args.config:
        job = load_toml(args.config, job)
    apply_flags(args, job)
    _cluster_from_scheduler(args, job)
    if given(args, "train", "epochs") and not given(args, "train", "steps"):
        job.train.steps = 0
    if resume:
        job.output.out = job.output.resume = resume
    if not job.data.name:
        check_model_name(job.model.name)
        job.data.name = default_data(job.model.name)
    job.validate()
    try:
        faults.parse(os.environ.get(faults.ENV, ""))
    except ValueError as e:
        raise UserError(str(e)) from None
    plugin = resolve(job)
    if plugin.default_optimizer and not (given(args, "optim", "name") or args.config or resume):
        job.optim.name = plugin.default_optimizer
    check_all(plugin, job)
    check_model_name(job.model.name)
    if resolve_device(job.train.device) == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda, but no CUDA device is visible")
    data = build_dataset(job.data, check=True)
    if job.train.batch_size > data.num_train:
        raise UserError(
            f"--batch-size {job.train.batch_size} is larger than the training set "
            f"({data.num_train} samples of {data.name})"
        )
    plugin.check_data(job, data)
    _check_model_fits(job, data, plugin)
    if resume:
        if not stored.data.name:  # (a hand-written config.toml)
            stored.data.name = default_data(stored.model.name)
        rundir.check_resume(stored, job)
    if not job.output.out:
        job.output.out = f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{job.strategy.name}"
    rundir.check_out(Path(job.output.out))
    return job


def _auto_resume(args: argparse.Namespace) -> str:
    """``--auto-resume --out RUN``: the run to continue, if ``RUN`` holds one with a
    checkpoint (said in one line); empty to start it."""
    if not getattr(args, "output.auto_resume", False):
        return ""
    out = getattr(args, "output.out", "")
    if not out:
        raise UserError("--auto-resume needs --out (the run to start, or to continue)")
    if not (Path(out) / CONFIG_FILE).is_file():
        return ""
    stored = load_toml(Path(out) / CONFIG_FILE)
    latest = checkpoint.load_latest(resolve(stored).checkpoint_root(Path(out)))
    if latest is None:
        return ""  # stopped before its first checkpoint: it starts again, in place
    if not getattr(args, "dry_run", False):
        print(f"shoal: --auto-resume: continuing {out} from step {latest[1]['step']}",
              file=sys.stderr)  # fmt: skip
    return out


def _cluster_from_scheduler(args: argparse.Namespace, job: JobConfig) -> None:
    """Machines, rank and meeting point from Slurm's or Kubeflow's variables, unless a
    flag places the machine (see :mod:`shoal.environment`); workers unless ``--workers``."""
    if getattr(args, "guest", None):
        return  # the launcher placed the processes already
    scheduler, found = cluster_from_env(os.environ)
    placement = ("nnodes", "min_nodes", "node_rank", "rdzv_endpoint")
    if any(given(args, "cluster", k) for k in placement):  # the user placed it: all of it
        found = {k: v for k, v in found.items() if k not in placement}
    taken = {k: v for k, v in found.items() if not given(args, "cluster", k)}
    for name, value in taken.items():
        setattr(job.cluster, name, value)
    if taken and not getattr(args, "dry_run", False):
        c = job.cluster
        where = f", meeting at {c.rdzv_endpoint}" if c.rdzv_endpoint else ""
        print(f"shoal: {scheduler}: machine {c.node_rank} of {c.nnodes}, {c.workers} "
              f"worker{'s' if c.workers != 1 else ''}{where}", file=sys.stderr)  # fmt: skip


def _check_model_fits(job: JobConfig, data: Dataset, plugin: Plugin) -> None:
    """Build the model on the meta device (no memory): a model that cannot take this data,
    or that the strategy cannot split, says so here, in one line, not in every worker. A
    built-in model also runs a forward pass of two samples there (shapes and types only)."""
    import numpy as np
    import torch

    from shoal.models.sparse import remote_tables

    own = is_user_ref(job.model.name)
    x, _ = data.rows.take(np.arange(min(2, data.num_train)))
    try:
        with torch.device("meta"), remote_tables():
            model = build_model(job.model, data)
    except UserError:
        raise
    except Exception as e:  # the user's: shown, with its traceback, by the workers
        if own:
            return
        _cannot_take(job, data, x, e)
    plugin.check_model(job, model)
    if own:
        return  # (its forward may use what the meta device lacks: the workers try it)
    try:
        with torch.device("meta"):  # (tables local: a meta table costs nothing)
            build_model(job.model, data)(x.to("meta"))
    except Exception as e:
        _cannot_take(job, data, x, e)


def _cannot_take(job: JobConfig, data: Dataset, x: Any, e: Exception) -> None:
    """A built-in model that fails on this data, in one line."""
    why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    raise UserError(
        f"--model {job.model.name} cannot take the samples of {data.name} "
        f"(features {tuple(x.shape[1:])}, {str(x.dtype).removeprefix('torch.')}): {why}"
    ) from None


def check_layout(job: JobConfig, path: Path) -> None:
    """Whether ``--strategy`` can read the checkpoint at ``path``: sharded ones (DCP,
    written by fsdp, tensor or pipeline) resume under those or allreduce."""
    plugin = resolve(job)
    sharded = (path / checkpoint.SHARDS_DIR).is_dir()
    readers = ", ".join(n for n, p in BUILTIN.items() if p.reads_shards)
    if sharded and not plugin.reads_shards:
        raise UserError(
            f"--resume: {path.name} holds a sharded model; resume it with {readers}, "
            f"not {job.strategy.name}"
        )
    if not sharded and plugin.sharded_checkpoints:
        raise UserError(
            f"--resume: {path.name} was written by a data-parallel strategy; {job.strategy.name} "
            "resumes only sharded checkpoints (those of fsdp, tensor or pipeline)"
        )


def prepare_run_dir(job: JobConfig, own_port: bool = True) -> tuple[Path, rundir.RunLock | None]:
    """Take and check the run directory (node 0 holds its lock for the whole job); return
    where the workers read the resolved job. A refusal leaves the directory as it was.
    ``own_port``: shoal's launcher is to open the rendezvous port, so it must be free."""
    out = Path(job.output.out)
    if job.cluster.node_rank != 0:
        check_port(job.cluster)
        # Other machines only read the job; rank 0 (on node 0) owns the run directory.
        tmp = Path(tempfile.mkdtemp(prefix="shoal-node-"))
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # (this process outlives it)
        return write_config(job, tmp), None
    existed, had_lock = out.exists(), (out / LOCK_FILE).exists()
    made = [p for p in [out.absolute(), *out.absolute().parents] if not p.exists()]
    lock = None
    try:
        lock = rundir.lock(out)
        _check_run_dir(job, out)
        if own_port:
            check_port(job.cluster)
        _check_data_files(job, out)
        write_config(job, out)
    except BaseException:
        if lock is not None:
            lock.release()
        if not existed:  # what this call made, and nothing another job may have put there
            (out / LOCK_FILE).unlink(missing_ok=True)
            for path in made:
                with contextlib.suppress(OSError):
                    path.rmdir()  # (only if empty)
        elif not had_lock:
            (out / LOCK_FILE).unlink(missing_ok=True)
        raise
    return out / CONFIG_FILE, lock


def _check_data_files(job: JobConfig, out: Path) -> None:
    """Files on disk: a resumed run's must be those it started with (``dataset.json``
    keeps each one's fingerprint)."""
    now = fingerprints(job.data)
    if now is None:
        return
    saved = out / DATASET_FILE
    if job.output.resume and saved.is_file():
        check_unchanged(json.loads(saved.read_text())["files"], now, job.data.name)
    write_atomic(saved, json.dumps({"data": job.data.name, "files": now}, indent=1) + "\n")


def _check_run_dir(job: JobConfig, out: Path) -> None:
    if job.output.resume:
        root = resolve(job).checkpoint_root(out)
        if not checkpoint.list_checkpoints(root):
            raise UserError(
                f"--resume {out}: the run stopped before its first checkpoint, so there is "
                f"nothing to resume; --auto-resume --out {out} starts it over there"
            )
        latest = checkpoint.load_latest(root)
        if latest is None:
            raise UserError(f"--resume {out}: every checkpoint is corrupt")
        check_layout(job, latest[0])
        if 0 < job.train.steps <= latest[1]["step"]:
            raise UserError(
                f"--resume {out}: the run is already at step {latest[1]['step']}; "
                f"give --steps above it to continue"
            )
        (out / USER_ERROR_FILE).unlink(missing_ok=True)  # a mistake reported by the run before
    elif not rundir.is_empty(out):
        if job.output.auto_resume and (out / CONFIG_FILE).is_file():
            # the same job, stopped before its first checkpoint: it starts again in place
            rundir.check_resume(load_toml(out / CONFIG_FILE), job)
            return
        if (out / CONFIG_FILE).is_file() and not checkpoint.list_checkpoints(
            resolve(load_toml(out / CONFIG_FILE)).checkpoint_root(out)
        ):
            raise UserError(
                f"run directory {out} holds a run that stopped before its first checkpoint: "
                "add --auto-resume to start it over there, or choose another --out"
            )
        raise UserError(f"run directory {out} already exists; choose another --out or --resume it")


def finish(job: JobConfig, report: bool = True) -> None:
    """A finished job, where its run directory is: the report (unless ``report`` is
    false: rank 0 of a guest job wrote it) and the summary table."""
    out = Path(job.output.out)
    summary_path = out / SUMMARY_FILE
    if not summary_path.exists():
        return
    summary = json.loads(summary_path.read_text())
    if job.output.report and report:
        from shoal.report import write_report

        write_report([out], out)
    print_summary(summary, out, report=job.output.report, extra=resolve(job).summary_rows(summary))


def print_summary(
    summary: dict, out: Path, report: bool, extra: list[tuple[str, str]] | None = None
) -> None:
    """A readable table of the finished run."""
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"shoal: {summary['strategy']} on {summary['world_size']} workers", show_header=False
    )
    table.add_column(style="bold")
    table.add_column(justify="right")
    rows = [
        ("model / data", f"{summary['model']} / {summary['data']}"),
        ("steps", f"{summary['steps']:,}"),
        ("final train loss", f"{summary['final_loss']:.5g}"),
    ]
    keys = ("test_loss", "test_accuracy", "test_perplexity", "unigram_perplexity")
    for key in (*keys, "lstsq_rel_error", "auc", "true_model_auc"):
        if key in summary:
            rows.append((key.replace("_", " "), f"{summary[key]:.5g}"))
    memory = summary.get("memory")
    if memory:
        state = _human_bytes(memory["params"] + memory["grads"] + memory["optimizer"])
        peak = _human_bytes(memory["activations_peak"])
        private = memory.get("private", 0)
        more = f", process {_human_bytes(private)}" if private else ""
        rows.append(("memory per rank (most)", f"state {state}, activations {peak}{more}"))
    epochs = summary.get("epochs") or []
    if epochs:
        wrong = [str(e["epoch"]) for e in epochs if not e["exact"]]
        rows.append(("sample digests", f"DIFFER in epoch {', '.join(wrong)}" if wrong else
                     f"exact in {len(epochs)} epoch{'s' if len(epochs) > 1 else ''}"))  # fmt: skip
    plan = summary.get("balance")
    if plan:
        shares = " ".join(f"{s:.2f}" for s in plan["shares"])
        changes = f", {plan['replans']} re-plan{'s' if plan['replans'] != 1 else ''}"
        probes = plan.get("probes", {})
        if probes.get("tried"):
            changes += f", {probes['kept']} of {probes['tried']} probes kept"
        rows.append((f"balance ({plan['mode']})", f"shares {shares}{changes}"))
    dp = summary.get("privacy")
    if dp:
        eps = "inf (no noise)" if dp["epsilon"] is None else f"{dp['epsilon']:.3g}"
        rows.append((f"privacy ({dp['level']}-level DP)",
                     f"epsilon {eps} at delta {dp['delta']:g}: noise {dp['noise_multiplier']:.3g}"
                     f" x clip {dp['clip']:g}, rate {dp['sample_rate']:.3g}, "
                     f"{dp['steps']} steps"
                     + ("; NOT private: noise and samples from --seed (--dp-insecure-seed)"
                        if "--seed" in dp.get("randomness", "") else "")))  # fmt: skip
    rows += extra or []  # the strategy's own (its plugin's summary_rows)
    rows += [
        ("wall time", f"{summary['wall_time_s']:.1f} s"),
        ("throughput", f"{summary['samples_per_s']:,.0f} samples/s"),
        ("bytes sent (all workers)", _human_bytes(summary["bytes_sent_total"])),
        ("run directory", str(out)),
    ]
    if report:
        rows.append(("report", str(out / REPORT_FILE)))
    for k, v in rows:
        table.add_row(k, v)
    Console().print(table)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
