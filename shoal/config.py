"""Typed job configuration: one dataclass per component, TOML in and out.

The command line is derived from these dataclasses (see :mod:`shoal.cli.flags`):
every field becomes a flag named after it (or after ``metadata["flag"]``), with
its docstring-like ``help`` text. A TOML file uses one table per component::

    [model]
    name = "mlp"

    [train]
    steps = 300
    batch_size = 64
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from shoal.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


BIG = 1 << 40
"""An upper bound for counts: far beyond any real job, far below overflow."""
SEED_MAX = 2**32 - 1
"""numpy's seeds are 32-bit."""


def _f(
    default: Any,
    help: str,
    flag: str | None = None,
    choices: tuple | None = None,
    low: float | None = None,
    high: float | None = None,
    above: float | None = None,
    below: float | None = None,
) -> Any:
    """A field with its help text, flag name, choices, and the range a number must be in
    (``low <= x <= high``; ``above``/``below`` exclude their bound). Numbers without a
    range must still be finite."""
    meta: dict[str, Any] = {"help": help}
    if flag:
        meta["flag"] = flag
    if choices:
        meta["choices"] = choices
    bounds = {"low": low, "high": high, "above": above, "below": below}
    meta.update({k: v for k, v in bounds.items() if v is not None})
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    """The model to train."""

    name: str = _f(
        "mlp",
        "built-in model (linear, softmax, mlp, cnn, ctr, transformer) or package.module:function "
        "for your own",
        flag="--model",
    )
    hidden: int = _f(
        128, "width of each hidden layer (mlp, cnn); model width (transformer)", low=1, high=1 << 16
    )
    layers: int = _f(2, "number of hidden layers (mlp); of blocks (transformer)", low=1, high=1024)
    heads: int = _f(4, "attention heads per block (transformer)", low=1, high=1024)


@dataclass
class DataConfig:
    """The dataset and how it is cut into batches."""

    name: str = _f(
        "",
        "built-in dataset (synthetic-linear, digits, ctr, text) or package.module:function; "
        "empty picks the model's default",
        flag="--data",
    )
    num_samples: int = _f(4096, "samples to generate (synthetic data)", low=1, high=1 << 31)
    num_features: int = _f(32, "features per sample (synthetic data)", low=1, high=1 << 20)
    noise: float = _f(
        0.1, "standard deviation of the label noise (synthetic-linear)", low=0, high=1e6
    )
    table_rows: int = _f(1_000_000, "rows of the hashed embedding table (ctr)", low=1, high=BIG)
    context: int = _f(64, "tokens per training sequence (text)", low=1, high=1 << 20)
    test_fraction: float = _f(0.2, "fraction of the data held out for evaluation", low=0, below=1)
    data_seed: int = _f(
        1234, "seed of the data generator and of the train/test split", low=0, high=SEED_MAX
    )
    drop_last: bool = _f(False, "drop the last, smaller global batch of each epoch")


@dataclass
class OptimConfig:
    """The optimizer (torch.optim) and its learning-rate schedule."""

    name: str = _f(
        "sgd",
        "optimizer",
        flag="--optimizer",
        choices=("sgd", "momentum", "adam", "adamw", "adagrad"),
    )
    lr: float = _f(0.05, "peak learning rate", above=0, high=1e4)
    momentum: float = _f(0.9, "momentum (momentum optimizer)", low=0, high=1)
    weight_decay: float = _f(0.0, "weight decay (decoupled for adamw)", low=0, high=1e4)
    warmup_steps: int = _f(0, "steps of linear warmup from 0 to --lr", low=0, high=BIG)
    schedule: str = _f(
        "constant",
        "learning-rate schedule after warmup",
        flag="--lr-schedule",
        choices=("constant", "cosine", "linear"),
    )


@dataclass
class StrategyConfig:
    """How the work is spread over processes."""

    name: str = _f("allreduce", "distribution strategy", flag="--strategy")
    bucket_mb: float = _f(
        25.0, "gradient bucket size in MB for all-reduce overlap", above=0, high=1e5
    )
    ps_mode: str = _f(
        "bsp",
        "parameter-server consistency: bsp (lock step), asp (async), ssp (bounded staleness)",
        choices=("bsp", "asp", "ssp"),
    )
    staleness: int = _f(
        3,
        "ssp: how many steps a task may run ahead of the oldest unfinished step",
        low=0,
        high=1 << 20,
    )
    ps_max_message_mb: float = _f(
        1024.0, "parameter server: largest message accepted, in MB", above=0, high=1 << 20
    )
    heartbeat_timeout: float = _f(
        3.0,
        "seconds without a heartbeat before a worker or shard is declared dead, hung or cut off",
        above=0,
        high=86400,
    )
    sync_every: int = _f(
        8, "local-sgd, diloco: local steps between synchronizations (H)", low=1, high=1 << 30
    )
    outer_lr: float = _f(0.7, "diloco: learning rate of the outer Nesterov SGD", above=0, high=1e4)
    outer_momentum: float = _f(0.9, "diloco: momentum of the outer Nesterov SGD", low=0, below=1)
    mesh: str = _f(
        "",
        "model-parallel strategies: the workers as a mesh, e.g. dp=2,pp=2 (pipeline) or "
        "dp=2,tp=2 (tensor); empty: every worker along the strategy's own dimension",
    )
    stages: int = _f(
        0,
        "pipeline: stages, one per rank along pp (0: --mesh, else all workers)",
        low=0,
        high=1 << 16,
    )
    microbatches: int = _f(
        4, "pipeline: microbatches each rank's slice of a step is cut into", low=1, high=1 << 16
    )
    schedule: str = _f(
        "1f1b",
        "pipeline schedule: gpipe (all forwards, then all backwards), 1f1b (fewer activations "
        "held), interleaved (1f1b over two stages per rank: a smaller bubble)",
        choices=("gpipe", "1f1b", "interleaved"),
    )
    balance: str = _f(
        "params",
        "pipeline: cut the model into stages of equal parameter count, or of equal measured time",
        choices=("params", "time"),
    )
    split_at: str = _f(
        "",
        "pipeline: units that begin stages 1.. (comma-separated child names of the model, "
        "e.g. block2,head), instead of --balance",
    )
    compress: str = _f(
        "none",
        "gradient compression: none, fp16, bf16, topk:RATIO, qsgd:LEVELS, sign, powersgd:RANK "
        "(topk, sign and powersgd with error feedback)",
    )


@dataclass
class TrainConfig:
    """The training loop."""

    steps: int = _f(0, "global optimizer steps to run (0: derive from --epochs)", low=0, high=BIG)
    epochs: float = _f(
        1.0, "passes over the training data, used when --steps is 0", above=0, high=1e6
    )
    batch_size: int = _f(64, "GLOBAL batch size, split over all workers", low=1, high=1 << 31)
    seed: int = _f(0, "seed for model initialisation and the data order", low=0, high=SEED_MAX)
    device: str = _f("cpu", "where to compute", choices=("cpu", "cuda", "auto"))
    log_every: int = _f(10, "steps between metric records", low=1, high=BIG)
    eval_every: int = _f(
        0, "steps between evaluations on the test split (0: at the end only)", low=0, high=BIG
    )
    checkpoint_every: int = _f(0, "steps between checkpoints (0: only at the end)", low=0, high=BIG)
    keep_checkpoints: int = _f(3, "how many recent checkpoints to keep", low=0, high=1 << 20)
    checkpoint_async: bool = _f(
        True, "write checkpoints in the background (training waits only for a copy of the state)"
    )

    def total_steps(self, steps_per_epoch: int) -> int:
        """Global steps of the job: ``--steps``, or ``--epochs`` worth of them."""
        if self.steps > 0:
            return self.steps
        return max(1, math.ceil(self.epochs * steps_per_epoch))


@dataclass
class ClusterConfig:
    """Processes and machines, as torchrun understands them."""

    workers: int = _f(
        2, "worker processes on this machine (torchrun --nproc-per-node)", low=0, high=1 << 16
    )
    servers: int = _f(
        1, "parameter-server shards on this machine (--strategy ps)", low=0, high=1 << 16
    )
    nnodes: int = _f(
        1,
        "number of machines (torchrun --nnodes); MIN:MAX is elastic: the job goes on with "
        "as few as MIN and takes in machines up to MAX (ps: starts once MIN are in; later "
        "machines bring more workers)",
        low=1,
        high=1 << 16,
    )
    min_nodes: int = _f(
        0, "elastic jobs: the fewest machines to go on with (0: --nnodes)", low=0, high=1 << 16
    )
    node_rank: int = _f(
        0, "rank of this machine, 0..nnodes-1 (torchrun --node-rank)", low=0, high=1 << 16
    )
    rdzv_endpoint: str = _f(
        "",
        "HOST:PORT of node 0 where the machines meet (torchrun --rdzv-endpoint); "
        "empty picks a free local port",
    )
    startup_timeout: float = _f(
        60.0,
        "seconds a parameter-server worker or shard may take from the job's start to its "
        "first word to the coordinator before it counts as hung",
        above=0,
        high=86400,
    )
    max_restarts: int = _f(
        3,
        "restarts after a failure: collective strategies restart every worker from the "
        "newest good checkpoint (torchrun --max-restarts); ps restarts the failed worker",
        low=0,
        high=1000,
    )

    @property
    def elastic(self) -> bool:
        """Whether the number of machines may change while the job runs."""
        return 0 < self.min_nodes < self.nnodes


@dataclass
class OutputConfig:
    """Where results go and what is shown."""

    out: str = _f("", "run directory (default runs/<time>-<strategy>)")
    resume: str = _f("", "continue the run in this directory from its newest checkpoint")
    progress: bool = _f(True, "show a live progress display")
    report: bool = _f(True, "write plots and report.html into the run directory at the end")


@dataclass
class JobConfig:
    """A whole training job."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    @property
    def world_size(self) -> int:
        """Total number of worker processes over all machines."""
        return self.cluster.workers * self.cluster.nnodes

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Check sizes and ranges; raise :class:`UserError` with one clear line."""
        c, t, o = self.cluster, self.train, self.optim
        if self.strategy.name == "ps":  # a machine may hold only servers, or only workers
            if c.workers < 0 or c.workers + c.servers == 0:
                raise UserError("--strategy ps needs --workers or --servers on every machine")
            if c.nnodes == 1 and (c.workers == 0 or c.servers == 0):
                raise UserError(
                    "--strategy ps on one machine needs --workers >= 1 and --servers >= 1"
                )
        else:
            _positive("--workers", c.workers)
        _positive("--nnodes", c.nnodes)
        if not 0 <= c.node_rank < c.nnodes:
            raise UserError(f"--node-rank {c.node_rank} must be between 0 and {c.nnodes - 1}")
        if c.nnodes > 1 and not c.rdzv_endpoint:
            raise UserError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT of node 0")
        if c.rdzv_endpoint:
            parse_endpoint(c.rdzv_endpoint)
        if not 0 <= c.min_nodes <= c.nnodes:
            raise UserError(f"--nnodes {c.min_nodes}:{c.nnodes}: MIN must be between 1 and MAX")
        _positive("--batch-size", t.batch_size)
        if t.batch_size < self.world_size:
            raise UserError(
                f"--batch-size {t.batch_size} is the global batch and must be at least the "
                f"number of workers ({self.world_size})"
            )
        if t.steps < 0:
            raise UserError(f"--steps must be >= 0, got {t.steps}")
        if t.steps == 0 and not (t.epochs > 0 and math.isfinite(t.epochs)):
            raise UserError(f"--epochs must be > 0 when --steps is 0, got {t.epochs}")
        for name in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(t, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0")
        _positive("--log-every", t.log_every)
        if not (o.lr > 0 and math.isfinite(o.lr)):
            raise UserError(f"--lr must be a positive number, got {o.lr}")
        if o.warmup_steps < 0:
            raise UserError("--warmup-steps must be >= 0")
        if not 0.0 <= self.data.test_fraction < 1.0:
            raise UserError("--test-fraction must be in [0, 1)")
        _positive("--num-samples", self.data.num_samples)
        _positive("--num-features", self.data.num_features)
        _positive("--table-rows", self.data.table_rows)
        if c.max_restarts < 0:
            raise UserError("--max-restarts must be >= 0")
        if self.cluster.servers < 0:
            raise UserError("--servers must be >= 0")
        if self.strategy.staleness < 0:
            raise UserError("--staleness must be >= 0")
        _positive("--sync-every", self.strategy.sync_every)
        if not (self.strategy.outer_lr > 0 and math.isfinite(self.strategy.outer_lr)):
            raise UserError("--outer-lr must be a positive number")
        if not 0 <= self.strategy.outer_momentum < 1:
            raise UserError("--outer-momentum must be in [0, 1)")
        from shoal.compress import parse_codec  # torch: only once a job is checked

        try:
            parse_codec(self.strategy.compress)
        except ValueError as e:
            raise UserError(str(e)) from None
        if not self.strategy.heartbeat_timeout > 0:
            raise UserError("--heartbeat-timeout must be positive")
        if self.strategy.ps_max_message_mb <= 0:
            raise UserError("--ps-max-message-mb must be positive")
        if self.strategy.bucket_mb <= 0:
            raise UserError("--bucket-mb must be positive")
        _check_choices(self)
        _check_numbers(self)


def _check_numbers(job: JobConfig) -> None:
    """Every number finite and in its field's range (``low``/``high``/``above``/``below``)."""
    for section in dataclasses.fields(job):
        comp = getattr(job, section.name)
        for f in dataclasses.fields(comp):
            value = getattr(comp, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
            if not math.isfinite(value):
                raise UserError(f"{flag} must be a finite number, got {value}")
            m = f.metadata
            low, high, above, below = (m.get(k) for k in ("low", "high", "above", "below"))
            ok = (
                (low is None or value >= low)
                and (above is None or value > above)
                and (high is None or value <= high)
                and (below is None or value < below)
            )
            if not ok:
                lo = (
                    f">= {low:g}"
                    if low is not None
                    else f"> {above:g}"
                    if above is not None
                    else ""
                )
                hi = (
                    f"<= {high:g}"
                    if high is not None
                    else f"< {below:g}"
                    if below is not None
                    else ""
                )
                if isinstance(value, int):  # counts and seeds read better whole
                    lo, hi = (x.replace("e+", "e") for x in (lo, hi))
                    if high is not None and high < 1e15:
                        hi = f"<= {int(high)}"
                need = " and ".join(x for x in (lo, hi) if x)
                raise UserError(f"{flag} must be {need}, got {value}")


def _positive(flag: str, value: int) -> None:
    if value <= 0:
        raise UserError(f"{flag} must be a positive integer, got {value}")


def _check_choices(job: JobConfig) -> None:
    for section in dataclasses.fields(job):
        comp = getattr(job, section.name)
        for f in dataclasses.fields(comp):
            choices = f.metadata.get("choices")
            value = getattr(comp, f.name)
            if choices and value not in choices:
                flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
                raise UserError(f"{flag} must be one of {', '.join(choices)}; got {value!r}")


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """Split ``HOST:PORT``; raise :class:`UserError` if it is not one."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise UserError(f"--rdzv-endpoint must look like HOST:PORT, got {endpoint!r}")
    return host, int(port)


# --- TOML ---------------------------------------------------------------------------


def from_dict(data: dict[str, Any], base: JobConfig | None = None, source: str = "") -> JobConfig:
    """Overlay a ``{section: {field: value}}`` mapping on ``base`` (default values)."""
    job = base or JobConfig()
    where = f" in {source}" if source else ""
    sections = {f.name: f for f in dataclasses.fields(JobConfig)}
    for sname, values in data.items():
        if sname not in sections:
            raise UserError(f"unknown section [{sname}]{where}; known: {', '.join(sections)}")
        if not isinstance(values, dict):
            raise UserError(f"[{sname}]{where} must be a table")
        comp = getattr(job, sname)
        fields = {f.name: f for f in dataclasses.fields(comp)}
        for key, value in values.items():
            if key not in fields:
                raise UserError(
                    f"unknown key {key!r} in [{sname}]{where}; known: {', '.join(fields)}"
                )
            setattr(comp, key, _coerce(value, fields[key], f"[{sname}] {key}{where}"))
    return job


def _coerce(value: Any, f: dataclasses.Field, what: str) -> Any:
    kind = type(f.default)
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(value, kind):
        return value
    raise UserError(f"{what} must be a {kind.__name__}, got {value!r}")


def load_toml(path: str | os.PathLike, base: JobConfig | None = None) -> JobConfig:
    """Read a job file; unreadable or invalid files raise :class:`UserError`."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise UserError(f"config file {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read config file {p}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"config file {p} is not valid TOML: {e}") from None
    return from_dict(data, base, source=str(p))


def dumps_toml(job: JobConfig) -> str:
    return tomli_w.dumps(job.to_dict())


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
