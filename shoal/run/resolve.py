"""A job from what the user asked for: defaults, the run being continued, a job file
(or a job given whole), then the values the user set by name; checked, in one line
per mistake, before anything is written.

:class:`Request` is what every way in hands over: ``shoal train`` builds it from its
flags, :func:`shoal.train` from its arguments, the Ray and Spark modules from a
:class:`~shoal.config.JobConfig`. The values set by name are kept apart from the
rest, because some rules depend on whether the user gave a value (``--epochs``
alone means ``--steps 0``; a flag the job does not read is refused).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal import checkpoint, faults, rundir
from shoal.config import JobConfig
from shoal.data import Dataset, build_dataset
from shoal.dist import resolve_device
from shoal.environment import cluster_from_env
from shoal.errors import UserError
from shoal.jobfile import from_dict, load_toml, read_toml
from shoal.layout import CONFIG_FILE
from shoal.models import build_model, check_model_name, default_data
from shoal.registry import is_user_ref
from shoal.run.reads import check_reads, owner_reads
from shoal.strategies import BUILTIN, Plugin, check_job, resolve
from shoal.writer import check_tensorboard


@dataclass
class Request:
    """What the user asked for.

    ``config``: a job file (a path), or the job's TOML sections as a dict, laid over the
    defaults (or over the run ``--resume`` continues). ``given``: the values set by name
    over that, as ``"section.field"`` (``"train.steps"``) or, for the chosen strategy's
    options, ``"option.field"`` (``"option.sync_every"``); ``"cluster.nnodes"`` is a
    ``(min, max)`` pair. ``guest``: the launcher that started this process, where another
    one did (it places the processes itself)."""

    config: str | os.PathLike | Mapping[str, Any] | None = None
    given: dict[str, Any] = field(default_factory=dict)
    dry_run: bool = False
    guest: str | None = None

    def gave(self, section: str, name: str) -> bool:
        """Whether the user set ``section.name`` by name."""
        return f"{section}.{name}" in self.given

    def value(self, section: str, name: str, default: Any = "") -> Any:
        return self.given.get(f"{section}.{name}", default)


def as_config(job: JobConfig | Mapping[str, Any] | str | os.PathLike) -> Any:
    """A job as :attr:`Request.config` takes it: a file's path or a dict of its tables as
    they are; a :class:`~shoal.config.JobConfig` as the tables of the values that differ
    from the defaults (a value left at its default counts as not set, as in a file)."""
    if not isinstance(job, JobConfig):
        return job
    tables = job.to_dict()
    defaults = JobConfig().to_dict()
    changed: dict[str, dict[str, Any]] = {}
    for section, values in tables.items():
        keep = {k: v for k, v in values.items() if defaults[section].get(k, None) != v}
        if section == "strategy" and isinstance(values.get(job.strategy.section), dict):
            plugin = resolve(copy.deepcopy(job))
            base = dataclasses.asdict(plugin.Config())
            own = {k: v for k, v in values[job.strategy.section].items() if base.get(k) != v}
            keep.pop(job.strategy.section, None)
            if own:
                keep[job.strategy.section] = own
        if keep:
            changed[section] = keep
    return changed


def apply_given(given: Mapping[str, Any], job: JobConfig) -> JobConfig:
    """Overwrite ``job`` with every value set by name (a strategy's options go to
    ``job.strategy.given``, applied when the strategy is resolved)."""
    for dest, value in given.items():
        section, _, name = dest.partition(".")
        if dest == "cluster.nnodes":
            job.cluster.min_nodes, job.cluster.nnodes = value
        elif section == "option":
            job.strategy.given[name] = value
            job.strategy.options = None
        elif name and hasattr(job, section):
            setattr(getattr(job, section), name, value)
            if dest == "strategy.name":
                job.strategy.options = None
    return job


def layered(request: Request, resume: str = "") -> tuple[JobConfig, set[str]]:
    """Defaults <- the run continued (``resume``) <- the job file <- the values given,
    unchecked; and the ``section.field`` names the job file set."""
    job = JobConfig()
    if resume:
        if not (Path(resume) / CONFIG_FILE).is_file():
            raise UserError(f"--resume {resume}: not a shoal run directory (no config.toml)")
        job = load_toml(Path(resume) / CONFIG_FILE)
    keys: set[str] = set()
    config = request.config
    if config is not None:
        data = dict(config) if isinstance(config, Mapping) else read_toml(config)
        source = "" if isinstance(config, Mapping) else str(config)
        job = from_dict(data, job, source=source)
        for section, table in data.items():
            for k, v in table.items():
                if section == "strategy" and isinstance(v, dict):
                    keys |= {f"strategy.{k}.{name}" for name in v}
                else:
                    keys.add(f"{section}.{k}")
    return apply_given(request.given, job), keys


def resolve_job(request: Request) -> JobConfig:
    """The job ``request`` describes, complete and checked (:class:`UserError` with one
    line for a mistake); its run directory named but not yet taken."""
    resume = request.value("output", "resume") or _auto_resume(request)
    job, from_file = layered(request, resume)
    _only_by_name(request, job, from_file)
    stored = load_toml(Path(resume) / CONFIG_FILE) if resume else None
    _cluster_from_scheduler(request, job)
    if request.gave("train", "epochs") and not request.gave("train", "steps"):
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
    chose = request.gave("optim", "name") or "optim.name" in from_file or resume
    if plugin.default_optimizer and not chose:
        job.optim.name = plugin.default_optimizer
        if not (request.gave("optim", "lr") or "optim.lr" in from_file):
            job.optim.lr = plugin.default_lr
    check_job(plugin, job)
    _check_noise(request, job, from_file)
    source = "" if isinstance(request.config, Mapping) else str(request.config or "")
    check_reads(job, plugin, request.given, from_file, source)
    check_model_name(job.model.name)
    check_tensorboard(job)
    if resolve_device(job.train.device) == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda, but no CUDA device is visible")
    if plugin.own_data:  # (each of its processes reads its own)
        plugin.check_data(job, None)
    else:
        data = build_dataset(job.data, check=True)
        if job.train.batch_size > data.num_train:
            raise UserError(
                f"--batch-size {job.train.batch_size} is larger than the training set "
                f"({data.num_train} samples of {data.name})"
            )
        plugin.check_data(job, data)
        _check_model_fits(job, data, plugin)
    if stored is not None:
        if not stored.data.name:  # (a hand-written config.toml)
            stored.data.name = default_data(stored.model.name)
        rundir.check_resume(stored, job, lambda s, n: owner_reads(stored, s, n))
    if not job.output.out:
        job.output.out = f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{job.strategy.name}"
    rundir.check_out(Path(job.output.out))
    return job


def _only_by_name(request: Request, job: JobConfig, from_file: set[str]) -> None:
    """Whether to continue a run is said by name (``--resume``, ``--auto-resume``, or
    ``output={"resume": ...}`` to :func:`shoal.train`), never by a job file: a run's own
    ``config.toml``, reused as a job file, holds the run it continued. Set there, it is
    named in a warning and left out."""
    for name in ("resume", "auto_resume"):
        key = f"output.{name}"
        if key in from_file and not request.gave("output", name):
            default = getattr(JobConfig().output, name)
            if getattr(job.output, name) != default:
                flag = "--" + name.replace("_", "-")
                print(f"shoal: warning: {flag}: a job file does not say whether to continue "
                      f"a run (give {flag} itself); ignored", file=sys.stderr)  # fmt: skip
            setattr(job.output, name, default)


def _check_noise(request: Request, job: JobConfig, from_file: set[str]) -> None:
    """``--dp-clip`` alone clips and adds no noise: epsilon infinite, no privacy at all.
    That is refused unless the user says so (``--dp-noise 0``)."""
    t = job.train
    said = request.gave("train", "dp_noise") or "train.dp_noise" in from_file
    if t.dp_clip and not t.dp_noise and not t.dp_epsilon and not said:
        raise UserError(
            f"--dp-clip {t.dp_clip:g} without noise gives no privacy (epsilon infinite): add "
            "--dp-noise SIGMA or --dp-epsilon EPS, or --dp-noise 0 to clip without noise "
            "on purpose"
        )


def _auto_resume(request: Request) -> str:
    """``--auto-resume --out RUN``: the run to continue, if ``RUN`` holds one with a
    checkpoint (said in one line); empty to start it."""
    if not request.value("output", "auto_resume", False):
        return ""
    out = request.value("output", "out")
    if not out:
        raise UserError("--auto-resume needs --out (the run to start, or to continue)")
    if not (Path(out) / CONFIG_FILE).is_file():
        return ""
    stored = load_toml(Path(out) / CONFIG_FILE)
    latest = checkpoint.load_latest(resolve(stored).checkpoint_root(Path(out)))
    if latest is None:
        return ""  # stopped before its first checkpoint: it starts again, in place
    if not request.dry_run:
        print(f"shoal: --auto-resume: continuing {out} from step {latest[1]['step']}",
              file=sys.stderr)  # fmt: skip
    return out


def _cluster_from_scheduler(request: Request, job: JobConfig) -> None:
    """Machines, rank and meeting point from Slurm's or Kubeflow's variables, unless a
    value given places the machine (see :mod:`shoal.environment`); workers unless
    ``--workers``."""
    if request.guest:
        return  # the launcher placed the processes already
    scheduler, found = cluster_from_env(os.environ)
    placement = ("nnodes", "min_nodes", "node_rank", "rdzv_endpoint")
    if any(request.gave("cluster", k) for k in placement):  # the user placed it: all of it
        found = {k: v for k, v in found.items() if k not in placement}
    taken = {k: v for k, v in found.items() if not request.gave("cluster", k)}
    for name, value in taken.items():
        setattr(job.cluster, name, value)
    if taken and not request.dry_run:
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
