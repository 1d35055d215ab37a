"""Typed job configuration: one dataclass per component (TOML in and out:
:mod:`shoal.jobfile`).

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
from dataclasses import dataclass, field
from typing import Any

from shoal.errors import UserError

BIG = 1 << 40
"""An upper bound for counts: far beyond any real job, far below overflow."""
SEED_MAX = 2**32 - 1
"""numpy's seeds are 32-bit."""


def option(
    default: Any,
    help: str,
    flag: str | None = None,
    choices: tuple | None = None,
    low: float | None = None,
    high: float | None = None,
    above: float | None = None,
    below: float | None = None,
    reader: str | None = None,
    when: str | None = None,
) -> Any:
    """A field with its help text, flag name, choices, and the range a number must be in
    (``low <= x <= high``; ``above``/``below`` exclude their bound). Numbers without a
    range must still be finite.

    Who reads it, where not every job does (a value given that the job does not read is
    refused, see :mod:`shoal.run.reads`): ``reader`` names the owner that declares it
    reads the field (``"model"``, ``"data"`` or ``"strategy"``); ``when`` the setting it
    matters under: ``"train.dp_clip"`` (that one is set, non-zero), ``"train.balance=auto"``
    or ``"mode=ssp|asp"`` (one of these values; a bare name is a field of the same
    section), ``"cluster.engine!=shoal"``."""
    meta: dict[str, Any] = {"help": help}
    if reader:
        meta["reader"] = reader
    if when:
        meta["when"] = when
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

    name: str = option(
        "mlp",
        "built-in model (linear, softmax, mlp, cnn, ctr, transformer) or package.module:function "
        "for your own",
        flag="--model",
    )
    hidden: int = option(
        128,
        "width of each hidden layer (mlp, cnn); model width (transformer)",
        low=1,
        high=1 << 16,
        reader="model",
    )
    layers: int = option(
        2,
        "number of hidden layers (mlp); of blocks (transformer)",
        low=1,
        high=1024,
        reader="model",
    )
    heads: int = option(
        4, "attention heads per block (transformer)", low=1, high=1024, reader="model"
    )


@dataclass
class DataConfig:
    """The dataset and how it is cut into batches."""

    name: str = option(
        "",
        "built-in dataset (synthetic-linear, digits, ctr, text), parquet:PATH (a Parquet "
        "file or a directory of them, or a directory 'shoal data prepare' wrote) or "
        "package.module:function; empty picks the model's default",
        flag="--data",
    )
    num_samples: int = option(
        4096, "samples to generate (synthetic data)", low=1, high=1 << 31, reader="data"
    )
    num_features: int = option(
        32, "features per sample (synthetic data)", low=1, high=1 << 20, reader="data"
    )
    noise: float = option(
        0.1,
        "standard deviation of the label noise (synthetic-linear)",
        low=0,
        high=1e6,
        reader="data",
    )
    table_rows: int = option(
        1_000_000, "rows of the hashed embedding table (ctr)", low=1, high=BIG, reader="data"
    )
    context: int = option(
        64, "tokens per training sequence (text)", low=1, high=1 << 20, reader="data"
    )
    test_fraction: float = option(
        0.2,
        "fraction of generated data held out for evaluation (parquet: the test/ "
        "directory beside train/)",
        low=0,
        below=1,
        reader="data",
    )
    data_seed: int = option(
        1234,
        "seed of the data generator and of the train/test split",
        low=0,
        high=SEED_MAX,
        reader="data",
    )
    drop_last: bool = option(False, "drop the last, smaller global batch of each epoch")
    features: str = option(
        "",
        "feature columns of a parquet: dataset, comma-separated, * wildcards allowed; "
        "empty: the list its writer stored",
        reader="data",
    )
    label: str = option(
        "", "label column of a parquet: dataset; empty: the one its writer stored", reader="data"
    )
    transform: str = option(
        "",
        "package.module:function turning each batch read from disk (a pyarrow.Table of its "
        "rows) into (features, labels): decode, tokenize, normalize",
        flag="--data-transform",
        reader="data",
    )
    task: str = option(
        "auto",
        "what the label is (auto: as the dataset says, else from its type: float regression, "
        "integer classification, bool binary, list language-model)",
        choices=("auto", "regression", "classification", "binary", "language-model"),
        reader="data",
    )
    shuffle: str = option(
        "auto",
        "sample order, the same for any number of workers: full (a keyed permutation of "
        "all rows), block (blocks in random order, rows shuffled within a window of "
        "blocks: few reads on slow storage), auto (block for Parquet files, else full)",
        choices=("auto", "full", "block"),
    )
    shuffle_block: int = option(
        0,
        "rows per block of --shuffle block; 0: the files' row groups (else 1024)",
        low=0,
        high=BIG,
        when="shuffle=block|auto",
    )
    shuffle_window: int = option(
        16, "blocks shuffled together (--shuffle block)", low=1, high=BIG, when="shuffle=block|auto"
    )
    cache_mb: int = option(
        256,
        "decoded Parquet row groups a worker keeps, in MiB",
        low=1,
        high=1 << 20,
        flag="--data-cache-mb",
        reader="data",
    )
    prefetch: int = option(2, "batches a worker reads ahead in the background", low=0, high=64)
    audit_samples: bool = option(
        False, "write the sample ids of every step (audit/ in the run directory)"
    )


@dataclass
class OptimConfig:
    """The optimizer (torch.optim) and its learning-rate schedule."""

    name: str = option(
        "sgd",
        "optimizer",
        flag="--optimizer",
        choices=("sgd", "momentum", "adam", "adamw", "adagrad"),
    )
    lr: float = option(0.05, "peak learning rate", above=0, high=1e4)
    momentum: float = option(
        0.9, "momentum (momentum optimizer)", low=0, high=1, when="name=momentum"
    )
    weight_decay: float = option(0.0, "weight decay (decoupled for adamw)", low=0, high=1e4)
    warmup_steps: int = option(0, "steps of linear warmup from 0 to --lr", low=0, high=BIG)
    schedule: str = option(
        "constant",
        "learning-rate schedule after warmup",
        flag="--lr-schedule",
        choices=("constant", "cosine", "linear"),
    )


@dataclass
class StrategyConfig:
    """How the work is spread over processes.

    Each strategy's own options are its section, ``[strategy.NAME]`` in TOML (a
    dataclass beside the strategy: see :mod:`shoal.strategies`); :attr:`options`
    holds the chosen strategy's once it is resolved.
    """

    name: str = option(
        "allreduce",
        "distribution strategy: a built-in name or package.module:Plugin for your own",
        flag="--strategy",
    )
    heartbeat_timeout: float = option(
        3.0,
        "seconds without a heartbeat before a worker or shard is declared dead, hung or cut off",
        above=0,
        high=86400,
    )
    collective_timeout: float = option(
        0.0,
        "--recovery inplace: seconds a worker may stay out of a collective the others "
        "wait in before it is dropped (0: 10 x --heartbeat-timeout)",
        low=0,
        high=86400,
        reader="strategy",
        when="cluster.recovery=inplace|auto",
    )
    options: Any = field(default=None, repr=False, compare=False, metadata={"internal": True})
    """The chosen strategy's section (its plugin's ``Config``), once resolved."""
    tables: dict[str, Any] = field(
        default_factory=dict, repr=False, compare=False, metadata={"internal": True}
    )
    """``[strategy.NAME]`` tables (and loose keys of older files) as read, until resolved."""
    given: dict[str, Any] = field(
        default_factory=dict, repr=False, compare=False, metadata={"internal": True}
    )
    """Strategy options given as flags, by field name, applied over the tables."""
    section: str = field(default="", repr=False, compare=False, metadata={"internal": True})
    """The name of :attr:`options`' section (the plugin's name), once resolved."""


@dataclass
class TrainConfig:
    """The training loop."""

    steps: int = option(
        0, "global optimizer steps to run (0: derive from --epochs)", low=0, high=BIG
    )
    epochs: float = option(
        1.0,
        "passes over the training data, used when --steps is 0",
        above=0,
        high=1e6,
        when="steps=0",
    )
    batch_size: int = option(64, "GLOBAL batch size, split over all workers", low=1, high=1 << 31)
    seed: int = option(0, "seed for model initialisation and the data order", low=0, high=SEED_MAX)
    device: str = option(
        "cpu",
        "where to compute: cpu, cuda (NCCL), auto (cuda where a GPU is visible), mixed "
        "(each rank its GPU where it has one, else the CPU; gloo between them, for machines "
        "with and without GPUs in one job, balanced by --balance auto)",
        choices=("cpu", "cuda", "auto", "mixed"),
    )
    log_every: int = option(10, "steps between metric records", low=1, high=BIG)
    eval_every: int = option(
        0, "steps between evaluations on the test split (0: at the end only)", low=0, high=BIG
    )
    checkpoint_every: int = option(
        0, "steps between checkpoints (0: only at the end)", low=0, high=BIG
    )
    keep_checkpoints: int = option(3, "how many recent checkpoints to keep", low=0, high=1 << 20)
    checkpoint_async: bool = option(
        True, "write checkpoints in the background (training waits only for a copy of the state)"
    )
    balance: str = option(
        "equal",
        "how each global batch is cut between the data-parallel ranks: equal, auto (slices "
        "follow each rank's measured speed, re-planned every --balance-every steps) "
        "or static:W1,W2,... (fixed weights, one per rank); the samples of a step never change",
    )
    balance_every: int = option(
        10,
        "--balance auto: steps between re-plans of the slices",
        low=1,
        high=BIG,
        when="balance=auto",
    )
    max_rank_batch: int = option(
        0,
        "the most samples one rank computes at once (memory); a larger slice is cut into "
        "micro-batches whose gradients accumulate (0: no limit)",
        low=0,
        high=1 << 31,
    )
    dp_clip: float = option(
        0.0,
        "differential privacy: clip each sample's gradient (fedavg: each client's update) "
        "to this L2 norm, add Gaussian noise once per step, draw batches by Poisson "
        "sampling and account epsilon (0: no DP)",
        low=0,
        high=1e6,
    )
    dp_noise: float = option(
        0.0,
        "DP noise multiplier sigma: noise std is sigma x --dp-clip",
        low=0,
        high=1e6,
        when="dp_clip",
    )
    dp_epsilon: float = option(
        0.0, "DP target epsilon at the last step: sets the noise (instead of --dp-noise)",
        low=0, high=1e6,
        when="dp_clip",
    )  # fmt: skip
    dp_delta: float = option(
        1e-5, "DP delta of the reported epsilon", above=0, below=1, when="dp_clip"
    )
    dp_insecure_seed: bool = option(
        False,
        "draw DP noise and Poisson samples from --seed instead of the operating system's "
        "secure source: reproducible, and NOT private (anyone with the job file can rebuild "
        "the noise); for tests and benchmarks only, and said so in the summary",
        when="dp_clip",
    )

    def total_steps(self, steps_per_epoch: int) -> int:
        """Global steps of the job: ``--steps``, or ``--epochs`` worth of them."""
        if self.steps > 0:
            return self.steps
        return max(1, math.ceil(self.epochs * steps_per_epoch))


@dataclass
class ClusterConfig:
    """Processes and machines, as torchrun understands them."""

    engine: str = option(
        "shoal",
        "who starts and restarts the processes: shoal (its own launcher, torchrun's "
        "machinery), ray (Ray Train's TorchTrainer on a Ray cluster: --workers in all), "
        "spark (PySpark's TorchDistributor: --workers processes)",
        choices=("shoal", "ray", "spark"),
    )
    address: str = option(
        "",
        "--engine ray: the cluster to join (ray.init's address, e.g. auto or "
        "ray://HOST:10001; empty: a Ray instance on this machine); --engine spark: the "
        "master URL (empty: local[WORKERS])",
        when="engine!=shoal",
    )
    workers: int = option(
        2, "worker processes on this machine (torchrun --nproc-per-node)", low=0, high=1 << 16
    )
    servers: int = option(
        1,
        "parameter-server shards on this machine (--strategy ps)",
        low=0,
        high=1 << 16,
        reader="strategy",
    )
    nnodes: int = option(
        1,
        "number of machines (torchrun --nnodes); MIN:MAX is elastic: the job goes on with "
        "as few as MIN and takes in machines up to MAX (ps: starts once MIN are in; later "
        "machines bring more workers)",
        low=1,
        high=1 << 16,
    )
    min_nodes: int = option(
        0, "elastic jobs: the fewest machines to go on with (0: --nnodes)", low=0, high=1 << 16
    )
    node_rank: int = option(
        0, "rank of this machine, 0..nnodes-1 (torchrun --node-rank)", low=0, high=1 << 16
    )
    rdzv_endpoint: str = option(
        "",
        "HOST:PORT of node 0 where the machines meet (torchrun --rdzv-endpoint); "
        "empty picks a free local port",
    )
    rdzv_last_call: float = option(
        10.0,
        "elastic jobs (--nnodes MIN:MAX): once MIN machines have met, seconds to wait for "
        "more before the job (re)starts",
        above=0,
        high=3600,
        when="min_nodes",
    )
    startup_timeout: float = option(
        60.0,
        "seconds a parameter-server worker or shard may take from the job's start to its "
        "first word to the coordinator before it counts as hung",
        above=0,
        high=86400,
        reader="strategy",
    )
    grace_period: float = option(
        30.0,
        "after a SIGTERM or SIGUSR1 (a scheduler's preemption), seconds the job has to stop "
        "at a common step and checkpoint it; the time it took is in preempted.jsonl and "
        "summary.json",
        above=0,
        high=86400,
        reader="strategy",
    )
    max_restarts: int = option(
        3,
        "restarts after a failure: collective strategies restart every worker from the "
        "newest good checkpoint (torchrun --max-restarts); ps restarts the failed worker or shard",
        low=0,
        high=1000,
    )
    recovery: str = option(
        "auto",
        "what a lost worker of a collective strategy costs: inplace (the others go on "
        "where they are, redo the step they were in, and a replacement catches up from "
        "a live peer), restart (every worker starts again from the newest checkpoint, as "
        "torchrun does), or auto: inplace wherever the job allows it, else restart",
        choices=("auto", "inplace", "restart"),
        reader="strategy",
    )
    spares: int = option(
        0,
        "--recovery inplace: warm workers, started with the job, that take a lost "
        "worker's place at once",
        low=0,
        high=1024,
        reader="strategy",
        when="recovery=inplace|auto",
    )

    @property
    def elastic(self) -> bool:
        """Whether the number of machines may change while the job runs."""
        return 0 < self.min_nodes < self.nnodes


@dataclass
class OutputConfig:
    """Where results go and what is shown."""

    out: str = option("", "run directory (default runs/<time>-<strategy>)")
    resume: str = option("", "continue the run in this directory from its newest checkpoint")
    auto_resume: bool = option(
        False,
        "continue the run in --out from its newest checkpoint if it has one, else start it "
        "there: the same command for the first start and for a requeued Slurm job or a "
        "restarted pod",
    )
    progress: bool = option(True, "show a live progress display")
    report: bool = option(True, "write plots and report.html into the run directory at the end")
    tensorboard: bool = option(
        False,
        "also write TensorBoard event files into RUN_DIR/tensorboard (tensorboard --logdir runs/)",
    )


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
        """``{section: {field: value}}``; the strategy's options as its sub-table."""
        out: dict[str, dict[str, Any]] = {}
        for section in dataclasses.fields(self):
            comp = getattr(self, section.name)
            out[section.name] = {f.name: getattr(comp, f.name) for f in public_fields(comp)}
        s = self.strategy
        if s.options is not None:
            out["strategy"][s.section] = dataclasses.asdict(s.options)
        else:
            out["strategy"].update(s.tables)
        return out

    def validate(self) -> None:
        """Check what every job shares; raise :class:`UserError` with one clear line.

        A strategy's own options and what it needs of the job are its plugin's to check
        (:meth:`shoal.strategies.Plugin.check`)."""
        for section in dataclasses.fields(self):
            check_component(getattr(self, section.name))
        c, t = self.cluster, self.train
        _positive("--nnodes", c.nnodes)
        if not 0 <= c.node_rank < c.nnodes:
            raise UserError(f"--node-rank {c.node_rank} must be between 0 and {c.nnodes - 1}")
        if c.nnodes > 1 and not c.rdzv_endpoint:
            raise UserError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT of node 0")
        if c.rdzv_endpoint:
            parse_endpoint(c.rdzv_endpoint)
        if not 0 <= c.min_nodes <= c.nnodes:
            raise UserError(f"--nnodes {c.min_nodes}:{c.nnodes}: MIN must be between 1 and MAX")
        if t.batch_size < self.world_size:
            raise UserError(
                f"--batch-size {t.batch_size} is the global batch and must be at least the "
                f"number of workers ({self.world_size})"
            )
        if t.steps == 0 and not (t.epochs > 0 and math.isfinite(t.epochs)):
            raise UserError(f"--epochs must be > 0 when --steps is 0, got {t.epochs}")


def public_fields(comp: Any) -> list[dataclasses.Field]:
    """The fields of a config component a user sets (flags, TOML keys)."""
    return [f for f in dataclasses.fields(comp) if not f.metadata.get("internal")]


def flag_of(f: dataclasses.Field) -> str:
    """The command-line flag of a config field."""
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def check_component(comp: Any) -> None:
    """Every field of ``comp`` one of its choices, and every number finite and in its
    field's range (``low``/``high``/``above``/``below``)."""
    for f in public_fields(comp):
        value = getattr(comp, f.name)
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise UserError(f"{flag_of(f)} must be one of {', '.join(choices)}; got {value!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        flag = flag_of(f)
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
            lo = f">= {low:g}" if low is not None else f"> {above:g}" if above is not None else ""
            hi = f"<= {high:g}" if high is not None else f"< {below:g}" if below is not None else ""
            if isinstance(value, int):  # counts and seeds read better whole
                lo, hi = (x.replace("e+", "e") for x in (lo, hi))
                if high is not None and high < 1e15:
                    hi = f"<= {int(high)}"
            need = " and ".join(x for x in (lo, hi) if x)
            raise UserError(f"{flag} must be {need}, got {value}")


def _positive(flag: str, value: int) -> None:
    if value <= 0:
        raise UserError(f"{flag} must be a positive integer, got {value}")


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """Split ``HOST:PORT``; raise :class:`UserError` if it is not one."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise UserError(f"--rdzv-endpoint must look like HOST:PORT, got {endpoint!r}")
    return host, int(port)
