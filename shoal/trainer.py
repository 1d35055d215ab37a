"""The training loop: data -> strategy step -> metrics and checkpoints.

Runs inside every worker process. It knows nothing about how a strategy
communicates; it only feeds batches, gathers telemetry at log steps and saves
what the strategy says its state is.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from shoal import checkpoint
from shoal.config import JobConfig, dumps_toml, write_atomic
from shoal.data import Dataset, GlobalBatchSampler, Task, build_dataset
from shoal.dist import DistEnv
from shoal.errors import UserError
from shoal.faults import Injector
from shoal.memory import ActivationMeter, named
from shoal.metrics import (
    SUMMARY_FILE,
    MetricsFile,
    PhaseTimer,
    Progress,
    build_summary,
    merge_counts,
    read_totals,
    save_model,
    totals_row,
    window_record,
    window_row,
)
from shoal.models import build_model
from shoal.models.sparse import count_parameters, remote_tables
from shoal.models.tasks import evaluate, per_sample_loss
from shoal.strategies import Batch, Strategy, resolve


@dataclass
class _Window:
    """Telemetry accumulated on this rank since the last log record."""

    loss_sum: torch.Tensor
    count: int = 0
    global_samples: int = 0
    steps: int = 0
    start: float = field(default_factory=time.perf_counter)


class Trainer:
    """One worker's view of a training job."""

    def __init__(self, job: JobConfig, env: DistEnv) -> None:
        self.job = job
        self.env = env
        self.out = Path(job.output.out)
        torch.manual_seed(job.train.seed)
        self.data: Dataset = build_dataset(job.data)
        self.x, self.y = (t.to(env.device) for t in self.data.train)
        self.plugin = resolve(job)
        self.strategy: Strategy = self.plugin.build(job, env)
        with remote_tables(self.plugin.remote_tables):
            model = build_model(job.model, self.data).to(env.device)
        self.num_parameters = count_parameters(model)
        dp_rank, dp_size = self.strategy.data_rank
        self.sampler = GlobalBatchSampler(
            self.data.num_train,
            job.train.batch_size,
            dp_rank,
            dp_size,
            seed=job.train.seed,
            drop_last=job.data.drop_last,
        )
        self.total_steps = job.train.total_steps(self.sampler.steps_per_epoch)
        self.activations = ActivationMeter()
        """What each forward saves for backward (measured at logging steps)."""
        self.strategy.setup(model, self.total_steps, (self.x[:64], self.y[:64]), self.activations)
        self.gatherer = self.strategy.gatherer()
        self.step = 0
        self.wall_offset = 0.0
        self.prior_samples: dict[int, int] = {}
        self.last_loss = float("nan")
        self.eval_metrics: dict[str, float] = {}
        self.saver = checkpoint.AsyncSaver(
            self.out, job.train.keep_checkpoints, background=job.train.checkpoint_async
        )
        self.faults = Injector(env.rank, run_dir=self.out)
        self.resumed_from: int | None = None
        self.peak_memory: dict[str, int] = {}  # the most this rank held, per figure
        self.restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))

    # --- state --------------------------------------------------------------------

    def restore(self) -> Path | None:
        """Continue from the newest good checkpoint in the run directory, if any."""
        found = checkpoint.load_latest(self.out)
        self._agree_on(checkpoint.step_of(found[0]) if found else -1)
        if found is None:
            return None
        path, state = found
        self.strategy.load_state_dict(state["strategy"])
        if (path / checkpoint.SHARDS_DIR).is_dir():  # written by a sharded strategy
            self.strategy.load_shards(path / checkpoint.SHARDS_DIR)
        self.sampler.load_state_dict(state["sampler"])
        self.step = int(state["step"])
        self.faults.resumed_at(self.step)
        self.resumed_from = self.step
        self.wall_offset = float(state["wall_time"])
        self.prior_samples = {int(k): int(v) for k, v in state["samples_per_epoch"].items()}
        rng = state["rng"]
        if self.env.rank < len(rng):
            torch.set_rng_state(rng[self.env.rank])
        return path

    def _agree_on(self, step: int) -> None:
        """Every rank of a process group must resume from the same checkpoint."""
        if not torch.distributed.is_initialized():
            return
        mine = torch.tensor([step, -step], dtype=torch.int64)
        both = mine.clone()
        torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX)
        if int(both[0]) != -int(both[1]):
            raise UserError(
                f"the workers see different newest checkpoints in {self.out} (rank "
                f"{self.env.rank} sees step {step}): the run directory must be on a "
                "filesystem every machine sees"
            )

    def save_checkpoint(self) -> None:
        """Every rank contributes its RNG and sample counts; the writer saves."""
        rng = self.gatherer.gather(torch.get_rng_state(), "rng")
        counts = self.samples_per_epoch()
        own = self.strategy.state_dict()  # on every rank: a strategy may gather its state
        state: dict[str, Any] = {}
        if rng is not None and counts is not None:
            state = {
                "step": self.step,
                "strategy": own,
                "sampler": self.sampler.state_dict(),
                "rng": [r.clone() for r in rng],  # own storage each: set_rng_state ignores offsets
                "samples_per_epoch": counts,
                "wall_time": self.wall_time(),
            }
        if self.plugin.sharded_checkpoints:  # every rank writes its part of the model
            self.saver.save_sharded(self.step, state, self.strategy.save_shards, bool(state))
        elif state:
            self.saver.save(self.step, state)

    def samples_per_epoch(self) -> dict[int, int] | None:
        """Samples consumed per epoch by all workers together (on the writer)."""
        local = torch.zeros(self.sampler.epoch + 1, dtype=torch.float64)
        for epoch, n in self.sampler.samples_seen.items():
            local[epoch] = n if self.strategy.reports else 0
        rows = self.gatherer.gather(local, "counts")
        if rows is None:
            return None
        return merge_counts(self.prior_samples, rows.sum(0).tolist())

    # --- loop ---------------------------------------------------------------------

    def loss_fn(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        x, y = batch
        self.faults.in_step(self.step + 1)
        with self.activations.measure():
            return per_sample_loss(self.data.task, model(x), y)

    def run(self) -> None:
        """Train to ``total_steps``, logging, evaluating and checkpointing on the way."""
        t = self.job.train
        writer = self.gatherer.is_writer
        metrics = MetricsFile(self.out / "metrics.jsonl", self.step) if writer else None
        progress = Progress(
            self.total_steps,
            self.step,
            enabled=writer and self.job.output.progress,
            title=f"{self.job.strategy.name} x{self.env.world_size}",
        )
        self._start = time.perf_counter()
        timer = PhaseTimer(self.env.device)
        window = _Window(torch.zeros((), device=self.env.device, dtype=torch.float64))
        work = self.strategy.work(self.sampler, self.step, self.total_steps)
        first = True
        try:
            while True:
                with timer.phase("wait"):
                    task = work.next()
                if task is None:
                    break
                with timer.phase("data"):
                    batch = self._batch(task.indices)
                    ahead = work.peek() if self.strategy.prefetches else None
                    if ahead is not None:
                        self.strategy.prefetch(self._batch(ahead.indices))
                lr = self.strategy.lr
                self.step = task.step  # until it is done
                # activations: measured in the first step and each step that logs
                self.activations.enabled = first or work.log_now(task.step + 1)
                first = False
                loss_sum = self.strategy.train_step(batch, self.loss_fn, task.loss_scale, timer)
                self.step = task.step + 1
                window.loss_sum += loss_sum
                window.count += len(task.indices)
                window.global_samples += task.global_batch
                window.steps += 1
                last = self.step == self.total_steps
                if work.log_now(self.step):
                    record = self._log(window, timer, lr, task)
                    window = _Window(torch.zeros_like(window.loss_sum))
                    if metrics is not None and record is not None:
                        metrics.write(record)
                        progress.update(self.step, record["loss"], record["samples_per_s"])
                else:
                    progress.update(self.step, None, None)
                if t.eval_every and self.step % t.eval_every == 0 and not last:
                    self._evaluate(metrics)
                if t.checkpoint_every and self.step % t.checkpoint_every == 0 and not last:
                    self.save_checkpoint()
                self.faults.after_step(self.step)
        finally:
            progress.close()
        self.save_checkpoint()
        self._evaluate(metrics)
        self.saver.wait()
        if metrics is not None:
            metrics.close()
        self._finish()

    def _batch(self, idx: Any) -> Batch:
        index = torch.from_numpy(idx).to(self.env.device)
        return self.x[index], self.y[index]

    def wall_time(self) -> float:
        return self.wall_offset + time.perf_counter() - self._start

    def _log(
        self, window: _Window, timer: PhaseTimer, lr: float, task: Task
    ) -> dict[str, Any] | None:
        """Every rank contributes its window; the writer builds the record."""
        phases = timer.take()
        comm = self.strategy.comm
        reports = self.strategy.reports
        local = window_row(
            window.loss_sum.item() if reports else 0.0,
            window.count if reports else 0,
            comm.sent,
            comm.received,
            phases,
            self._memory(),
        )
        epoch = self.step / self.sampler.steps_per_epoch
        meta = {
            "step": self.step,
            "task": [task.step, task.part],
            "epoch": epoch,
            "lr": lr,
            "steps": window.steps,
            "global_samples": window.global_samples,
        }
        rows = self.gatherer.gather(local, "window", meta)
        if rows is None:
            return None
        self.last_loss = rows[:, 0].sum().item() / max(1.0, rows[:, 1].sum().item())
        return window_record(
            rows,
            step=self.step,
            epoch=epoch,
            lr=lr,
            steps=window.steps,
            global_samples=window.global_samples,
            elapsed=time.perf_counter() - window.start,
            wall_time=self.wall_time(),
        )

    def _memory(self) -> dict[str, int]:
        """This rank's memory figures (the activation peak: since the last call), also
        kept as the run's peak."""
        now = {**self.strategy.memory(), "activations_peak": self.activations.take_peak()}
        for k, v in now.items():
            self.peak_memory[k] = max(self.peak_memory.get(k, 0), v)
        return now

    def _evaluate(self, metrics: MetricsFile | None) -> None:
        model = self.strategy.eval_model()  # collective where the model is sharded
        if not self.gatherer.is_writer:
            return
        self.eval_metrics = evaluate(model, self.data, self.env.device)
        if metrics is not None:
            metrics.write(
                {"step": self.step, "wall_time": self.wall_time(), "eval": self.eval_metrics}
            )

    def _finish(self) -> None:
        """Every rank contributes its totals; the writer saves the model and summary."""
        comm = self.strategy.comm
        model = self.strategy.eval_model()  # collective where the model is sharded
        self._memory()
        own = self.strategy.totals()
        row = totals_row(comm.sent, comm.received, self.peak_memory, own, self.env.host)
        rows = self.gatherer.gather(row, "totals")
        counts = self.samples_per_epoch()
        if rows is None or counts is None:
            return
        save_model(model, self.out)
        totals = read_totals(rows, len(own))
        mem = totals["memory"]
        summary = build_summary(
            self.job,
            dataset=self.data.name,
            world_size=self.env.world_size,
            steps=self.step,
            num_parameters=self.num_parameters,
            final_loss=self.last_loss,
            eval_metrics=self.eval_metrics,
            wall_time=self.wall_time(),
            counts=counts,
            train_samples=self.data.num_train,
            per_worker=[
                {
                    "rank": r,
                    "host": host,
                    "bytes_sent": int(totals["sent"][r]),
                    "bytes_received": int(totals["received"][r]),
                    "memory": named(mem[r]),
                }
                for r, host in enumerate(totals["hosts"])
            ],
            memory=named(mem.max(0).values),  # the most any rank held
            **self.strategy.summarize(totals["own"]),
            checkpoints={
                "saved": self.saver.saves - self.saver.failed,
                "failed": self.saver.failed,
                "background": self.saver.background,
                "stall_s": self.saver.stall_s,
            },
            restarts=self.restarts,
            resumed_from_step=self.resumed_from,
        )
        write_atomic(self.out / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")


def write_resolved_config(job: JobConfig, run_dir: Path) -> None:
    """The fully resolved job, as ``config.toml`` in the run directory."""
    write_atomic(run_dir / "config.toml", dumps_toml(job))
