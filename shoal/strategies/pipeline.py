"""Pipeline (layer) parallel: consecutive units of the model on consecutive ranks.

Built on ``torch.distributed.pipelining``. The model must be an
``nn.Sequential`` (the built-in ones are; the transformer's units are
``embed``, ``block0`` .. and ``head``): its children are cut into ``pp`` stages
(``pp x 2`` with ``--schedule interleaved``, two per rank), balanced by
parameter count or by measured time (``--stage-balance``), or where the user says
(``--split-at``). A stage is an ``nn.Sequential`` of its units under their own
names, so every parameter keeps the name it has in the whole model and
checkpoints move between layouts.

Each rank's slice of the global batch is cut into ``--microbatches`` M; the
schedule (``gpipe``: every forward, then every backward; ``1f1b``: one forward,
one backward once the pipeline is full, so fewer activations are held;
``interleaved``: 1F1B over two stages per rank, a smaller bubble) streams them
through the stages, gradients accumulate over the microbatches, and with
``--mesh dp=D,pp=P`` they are then averaged over ``dp``. Slices that do not
fill M equal microbatches (the last step of an epoch) are padded, and the
padding is left out of the loss.

The bubble: each stage times its own forward and backward chunks; the rest of
a step is idle (waiting for a neighbour). GPipe with equal stages idles
(P-1)/(M+P-1) of the time.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from shoal import balance
from shoal.config import JobConfig, option
from shoal.errors import UserError
from shoal.memory import ActivationMeter
from shoal.metrics import PhaseTimer
from shoal.strategies.base import Batch, LossFn
from shoal.strategies.mesh import MeshConfig, MeshPlugin, ModelParallel
from shoal.telemetry import Totals


def partition(costs: list[float], parts: int) -> list[int]:
    """Where each of ``parts`` contiguous groups of ``costs`` starts, minimizing the
    largest group's total (every group non-empty)."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    # best[k][i]: the smallest possible largest group splitting costs[:i] into k groups
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for k in range(1, parts + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                worst = max(best[k - 1][j], prefix[i] - prefix[j])
                if worst < best[k][i]:
                    best[k][i], cut[k][i] = worst, j
    starts, i = [], n
    for k in range(parts, 0, -1):
        i = cut[k][i]
        starts.append(i)
    return starts[::-1]


@dataclass
class PipelineConfig(MeshConfig):
    """[strategy.pipeline]"""

    stages: int = option(
        0, "stages, one per rank along pp (0: --mesh, else all workers)", low=0, high=1 << 16
    )
    microbatches: int = option(
        4, "microbatches each rank's slice of a step is cut into", low=1, high=1 << 16
    )
    schedule: str = option(
        "1f1b",
        "gpipe (all forwards, then all backwards), 1f1b (fewer activations held), "
        "interleaved (1f1b over two stages per rank: a smaller bubble)",
        choices=("gpipe", "1f1b", "interleaved"),
    )
    stage_balance: str = option(
        "params",
        "cut the model into stages of equal parameter count, or of equal measured time",
        choices=("params", "time"),
    )
    split_at: str = option(
        "",
        "units that begin stages 1.. (comma-separated child names of the model, "
        "e.g. block2,head), instead of --stage-balance",
    )


def stage_count(options: PipelineConfig, pp: int) -> int:
    return pp * (2 if options.schedule == "interleaved" else 1)


def split_points(options: PipelineConfig, model: nn.Module, stages: int) -> list[str]:
    """The units that begin stages 1..: those ``--split-at`` names, else those the model
    declares (``model.pipeline_split_points(stages)``), else none (balanced by
    ``--stage-balance``)."""
    given = [s.strip() for s in options.split_at.split(",") if s.strip()]
    declare = getattr(model, "pipeline_split_points", None)
    if given or not callable(declare):
        return given
    return list(declare(stages))


def check_units(model: nn.Module, stages: int, split: list[str]) -> None:
    """A :class:`UserError` unless ``model`` can be cut into ``stages`` (at ``split``)."""
    if not isinstance(model, nn.Sequential):
        raise UserError(
            "--strategy pipeline needs an nn.Sequential model (its children run in order, "
            f"and are cut into stages); this model is a {type(model).__name__}"
        )
    names = [n for n, _ in model.named_children()]
    if len(names) < stages:
        raise UserError(f"the model has {len(names)} units, too few for {stages} stages")
    unknown = [s for s in split if s not in names]
    if unknown:
        raise UserError(f"--split-at {unknown[0]}: no such unit (units: {', '.join(names)})")
    if split and len(split) != stages - 1:
        raise UserError(f"--split-at names {len(split)} units; {stages} stages need {stages - 1}")


class Pipeline(ModelParallel):
    """Stages of the model on ``pp`` ranks, microbatches streamed through them."""

    options: PipelineConfig

    def setup(
        self, model: nn.Module, total_steps: int, example: Batch, activations: ActivationMeter
    ) -> None:
        from torch.distributed.pipelining import (  # (slow to import: when used)
            PipelineStage,
            Schedule1F1B,
            ScheduleGPipe,
            ScheduleInterleaved1F1B,
        )

        stages = stage_count(self.options, self.sizes["pp"])
        check_units(model, stages, split_points(self.options, model, stages))
        self.example, self.activations = example, activations
        self._keep_replica(model)
        units = list(model.named_children())
        starts = self._starts(model, units, stages)
        bounds = [*starts, len(units)]
        pp, rank = self.sizes["pp"], self.mesh["pp"].get_local_rank()
        mine = [s for s in range(stages) if s % pp == rank]  # interleaved: s, s + pp
        self.stage_units = [[n for n, _ in units[bounds[s] : bounds[s + 1]]] for s in range(stages)]
        group = self.mesh["pp"].get_group()
        modules = {n: m for n, m in units}
        self.stages = []
        for s in mine:
            sub = nn.Sequential(OrderedDict((n, modules[n]) for n in self.stage_units[s]))
            stage = PipelineStage(sub, s, stages, self.env.device, group=group)
            self._time_chunks(stage)
            self.stages.append(stage)
        # every unit this rank holds, under its own name: for state, memory and the optimizer
        self.model = nn.Sequential(
            OrderedDict((n, modules[n]) for s in mine for n in self.stage_units[s])
        )
        self.is_first = 0 in mine
        self.is_last = stages - 1 in mine
        schedules = {
            "gpipe": ScheduleGPipe,
            "1f1b": Schedule1F1B,
            "interleaved": ScheduleInterleaved1F1B,
        }
        schedule = schedules[self.options.schedule]
        m = self.options.microbatches
        stage_arg: Any = self.stages if schedule is ScheduleInterleaved1F1B else self.stages[0]
        self.schedule = schedule(stage_arg, m, loss_fn=self._loss, scale_grads=False)
        self._optimizer(self.model.parameters(), total_steps)
        self.busy = 0.0  # seconds this rank's stages computed in the current step
        self.idle: list[float] = []

    def _starts(self, model: nn.Module, units: list[tuple[str, nn.Module]], stages: int):
        names = [n for n, _ in units]
        split = split_points(self.options, model, stages)
        if split:
            return [0, *sorted(names.index(s) for s in split)]
        if self.options.stage_balance == "time":
            costs = self._measured_costs(model)
        else:
            costs = [float(sum(p.numel() for p in m.parameters())) + 1.0 for _, m in units]
        return partition(costs, stages)

    def _measured_costs(self, model: nn.Module) -> list[float]:
        """Seconds of forward and backward per unit on a microbatch of training data (the
        median of 3), averaged over every rank so that all cut the model alike."""
        m = max(1, math.ceil(self.job.train.batch_size / self.sizes["dp"]))
        x = self.example[0][: max(1, m // self.options.microbatches)]
        costs = []
        for _, unit in model.named_children():
            runs = []
            for _ in range(3):
                inp = x.detach().requires_grad_(x.is_floating_point())
                start = time.perf_counter()
                out = unit(inp)
                if out.requires_grad:
                    out.float().sum().backward()
                runs.append(time.perf_counter() - start)
            x = out.detach()
            costs.append(sorted(runs)[1])
        for p in model.parameters():  # the measurement's gradients are not training's
            p.grad = None
        mean = torch.tensor(costs, dtype=torch.float64)
        dist.all_reduce(mean)
        return (mean / self.env.world_size).tolist()

    def _time_chunks(self, stage: Any) -> None:
        """Count the seconds this stage computes (its forward and backward chunks)."""
        for name in ("forward_one_chunk", "backward_one_chunk"):
            inner = getattr(stage, name)

            def timed(*args: Any, _inner: Any = inner, **kwargs: Any) -> Any:
                start = time.perf_counter()
                try:
                    return _inner(*args, **kwargs)
                finally:
                    self.busy += time.perf_counter() - start

            setattr(stage, name, timed)

    @property
    def reports(self) -> bool:
        return self.is_last

    def full_state(self) -> dict[str, torch.Tensor]:
        """Every stage's parameters, gathered to rank 0. Collective."""
        mine = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        parts: list[Any] = [None] * self.env.world_size if self.env.rank == 0 else []
        dist.gather_object(mine, parts if self.env.rank == 0 else None, dst=0)
        return {k: v for part in parts for k, v in part.items()}

    def _loss(self, output: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """A microbatch's loss, by the trainer's loss function: ``rows`` index the step's
        samples (padding: -1, left out)."""
        real = rows >= 0
        batch = (torch.empty(0), self.targets[rows[real]])
        return self.loss_fn(lambda _: output[real], batch).sum() * self.loss_scale

    def train_step(self, batch: Batch, loss_fn: LossFn, loss_scale: float, timer: PhaseTimer):
        x, y = batch
        m = self.options.microbatches
        size = math.ceil(self.largest_slice() / m) * m
        n = len(x)
        rows = torch.full((size,), -1, dtype=torch.long, device=x.device)
        rows[:n] = torch.arange(n, device=x.device)
        padded = torch.zeros((size, *x.shape[1:]), dtype=x.dtype, device=x.device)
        padded[:n] = x
        self.targets, self.loss_scale, self.loss_fn = y, loss_scale, loss_fn
        self.optimizer.zero_grad(set_to_none=True)
        start, self.busy = time.perf_counter(), 0.0
        with timer.phase("forward_backward"), self.activations.measure():
            args = (padded,) if self.is_first else ()
            losses: list[torch.Tensor] = []  # the last stage's, one per microbatch
            kwargs = {"target": rows, "losses": losses} if self.is_last else {}
            self.schedule.step(*args, **kwargs)
        elapsed = time.perf_counter() - start
        self.idle.append(max(0.0, 1.0 - self.busy / elapsed) if elapsed > 0 else 0.0)
        loss_sum = sum(
            (loss.detach().double() for loss in losses), torch.zeros((), dtype=torch.float64)
        )
        with timer.phase("comm"):
            self._sync_grads()
        with timer.phase("optimizer"):
            self.optimizer.step()
            self.scheduler.step()
        return (loss_sum / loss_scale).to(x.device)

    def largest_slice(self) -> int:
        """The most samples a pipeline gets in a step (under ``--balance static``, the
        heaviest weight's slice): every step is padded to it, the shape the stages know."""
        spec = balance.parse(self.job.train.balance)
        weights = spec.weights or (1.0,) * self.sizes["dp"]
        return max(balance.cut(self.job.train.batch_size, weights))

    def totals(self) -> dict[str, float]:
        """The idle fraction of this rank's steps (the first, which also sets the pipeline
        up, left out) and its place in the pipeline."""
        steps = self.idle[1:] or self.idle
        idle = sum(steps) / len(steps) if steps else 0.0
        return {"idle": idle, "pp_rank": float(self.mesh["pp"].get_local_rank())}

    def summarize(self, totals: list[Totals]) -> dict[str, Any]:
        p, m = self.sizes["pp"], self.options.microbatches
        idle = [t.own["idle"] for t in totals]
        return {
            "pipeline": {
                "stages": len(self.stage_units),
                "ranks": p,
                "microbatches": m,
                "schedule": self.options.schedule,
                "units": self.stage_units,
                "bubble": sum(idle) / len(idle),
                "idle_per_rank": idle,
                "gpipe_bubble_theory": (p - 1) / (m + p - 1),
            }
        }


class Plugin(MeshPlugin):
    name = "pipeline"
    description = "pipeline parallel: layers in stages, microbatches (gpipe, 1f1b, interleaved)"
    Config = PipelineConfig
    runtime = Pipeline
    own_dim = "pp"
    restart_only = "each stage's layers exist on one rank only"
    # not auto: the stages are built for the microbatch shape of the largest slice
    balance_modes = ("equal", "static")

    def check(self, job: JobConfig) -> None:
        super().check(job)
        opts, sizes = self.options(job), self.sizes(job)
        m, pp = opts.microbatches, sizes["pp"]
        if opts.schedule == "interleaved" and m % pp:
            raise UserError(f"--schedule interleaved needs --microbatches a multiple of pp={pp}")
        if opts.schedule == "1f1b" and m < pp:
            raise UserError(f"--schedule 1f1b needs --microbatches at least pp={pp}, got {m}")
        per_rank = math.ceil(job.train.batch_size / sizes["dp"])
        if per_rank < m:
            raise UserError(
                f"--batch-size {job.train.batch_size} gives each pipeline {per_rank} samples "
                f"a step, fewer than --microbatches {m}"
            )

    def check_model(self, job: JobConfig, model: Any) -> None:
        opts = self.options(job)
        stages = stage_count(opts, self.sizes(job)["pp"])
        check_units(model, stages, split_points(opts, model, stages))

    def summary_rows(self, summary: dict[str, Any]) -> list[tuple[str, str]]:
        pipe = summary["pipeline"]
        bubble = f"{pipe['bubble']:.3f} (gpipe theory {pipe['gpipe_bubble_theory']:.3f})"
        return [(f"pipeline bubble ({pipe['schedule']})", bubble)]
