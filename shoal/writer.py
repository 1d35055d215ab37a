"""The one writer of a run's results, fed by rank 0 of a collective job and by the
parameter server's coordinator alike.

It owns ``metrics.jsonl`` (one record per log window, one per evaluation), the
TensorBoard event files (``--tensorboard``), the live progress display, the
final model and ``summary.json``. Whoever feeds it hands it named records
(:class:`~shoal.telemetry.Window`, :class:`~shoal.telemetry.Totals`), so a run
reads the same whatever the strategy.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from shoal.config import JobConfig
from shoal.data import Dataset
from shoal.errors import UserError
from shoal.layout import METRICS_FILE, SUMMARY_FILE, TENSORBOARD_DIR, save_model, write_atomic
from shoal.memory import MEMORY_FIELDS
from shoal.metrics import PHASES, MetricsFile, Progress
from shoal.models.tasks import evaluate
from shoal.telemetry import Totals, Window, window_record


def check_tensorboard(job: JobConfig) -> None:
    """``--tensorboard`` needs the tensorboard package; say so before anything starts."""
    if not job.output.tensorboard:
        return
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise UserError(
            "--tensorboard needs the tensorboard package: pip install 'shoal[tensorboard]'"
        ) from None


class RunWriter:
    """Writes one run's results into its run directory (see :mod:`shoal.layout`)."""

    def __init__(
        self, job: JobConfig, total_steps: int, resume_step: int | None, model_name: str = ""
    ) -> None:
        """``resume_step``: records after it are dropped (``None``: none are);
        ``model_name``: what the summary calls the model (``--model``'s by default)."""
        self.job = job
        self.model_name = model_name or job.model.name
        self.out = Path(job.output.out)
        self.total_steps = total_steps
        self.metrics = MetricsFile(self.out / METRICS_FILE, resume_step)
        self.progress = Progress(total_steps, 0, False, "")
        self.last_loss = float("nan")
        self.samples_logged = 0  # in this session's records (where epochs do not count)
        self.eval_metrics: dict[str, float] = {}
        self.tb: Any = None
        if job.output.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self.tb = SummaryWriter(str(self.out / TENSORBOARD_DIR), purge_step=purge)

    def start(self, title: str, start_step: int) -> None:
        """Show progress (with ``--progress``) from ``start_step`` on."""
        self.progress = Progress(self.total_steps, start_step, self.job.output.progress, title)

    # --- during the run -----------------------------------------------------------

    def window(
        self,
        windows: dict[int, Window],
        *,
        step: int,
        epoch: float,
        lr: float,
        steps: int,
        global_samples: int,
        elapsed: float,
        wall_time: float,
        shares: int = 0,
        rank_shares: list[float] | None = None,
        extra: dict[str, float] | None = None,
    ) -> dict[str, Any]:
        """A log window's record from each worker's window (by worker rank); with
        ``rank_shares``, the load balancer's plan (each rank's share of a step); with
        ``extra``, the strategy's own figures (epsilon spent, say), also shown in the
        progress line."""
        record = window_record(
            list(windows.values()),
            step=step,
            epoch=epoch,
            lr=lr,
            steps=steps,
            global_samples=global_samples,
            elapsed=elapsed,
            wall_time=wall_time,
            shares=shares,
        )
        if rank_shares is not None:
            record["shares"] = rank_shares
        record.update(extra or {})
        self.last_loss = record["loss"]
        self.samples_logged += global_samples
        self.metrics.write(record)
        note = "  ".join(f"{k} {v:.3g}" for k, v in (extra or {}).items())
        self.progress.update(step, record["loss"], record["samples_per_s"], note)
        if self.tb is not None:
            self._tensorboard(record, windows, steps)
        return record

    def tick(self, step: int) -> None:
        """A step finished without a record: the progress display moves."""
        self.progress.update(step, None, None)

    def _tensorboard(self, record: dict[str, Any], windows: dict[int, Window], steps: int) -> None:
        step, add = record["step"], self.tb.add_scalar
        add("train/loss", record["loss"], step)
        add("train/lr", record["lr"], step)
        add("throughput/samples_per_s", record["samples_per_s"], step)
        add("throughput/step_time_s", record["step_time_s"], step)
        add("comm/bytes_sent", record["bytes_sent"], step)
        add("comm/bytes_received", record["bytes_received"], step)
        for p in PHASES:
            add(f"time/{p}", record[f"t_{p}"], step)
        for m in MEMORY_FIELDS:
            add(f"memory/{m}", record["memory"][m], step)
        for rank, w in sorted(windows.items()):  # the figures that are per worker
            if w.samples:
                add(f"worker{rank}/loss", w.loss_sum / w.samples, step)
            add(f"worker{rank}/bytes_sent", w.bytes_sent, step)
            for p in PHASES:
                add(f"worker{rank}/time_{p}", w.phases.get(p, 0.0) / max(1, steps), step)

    def evaluation(
        self, model: torch.nn.Module, data: Dataset, device: torch.device, step: int, wall: float
    ) -> dict[str, float]:
        """Evaluate ``model`` on the test split and record it (``wall``: when it began)."""
        start = time.perf_counter()
        metrics = evaluate(model, data, device)
        return self.record_evaluation(metrics, step, wall, time.perf_counter() - start)

    def record_evaluation(
        self, metrics: dict[str, float], step: int, wall: float, seconds: float | None = None
    ) -> dict[str, float]:
        """Record held-out ``metrics`` measured after ``step`` (by whoever could: the
        label party of a vertical job scores the parties' outputs itself); ``wall`` is
        when the evaluation began and ``seconds`` how long it took (``eval_s``: what a
        reader of the metrics leaves out of training's time)."""
        self.eval_metrics = metrics
        record: dict[str, Any] = {"step": step, "wall_time": wall, "eval": metrics}
        if seconds is not None:
            record["eval_s"] = seconds
        self.metrics.write(record)
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(f"eval/{k}", v, step)
        return metrics

    def rewind(self, step: int) -> None:
        """Records after ``step`` are void (the parameter server restored a checkpoint)."""
        self.metrics.close()
        self.metrics = MetricsFile(self.out / METRICS_FILE, resume_step=step)

    # --- the end ------------------------------------------------------------------

    def finish(
        self,
        model: torch.nn.Module,
        *,
        dataset: Dataset,
        world_size: int,
        steps: int,
        num_parameters: int,
        wall_time: float,
        counts: dict[int, int],
        totals: list[Totals],
        extra_tensors: dict[str, torch.Tensor] | None = None,
        per_worker: dict[int, dict[str, Any]] | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """Export the model and write ``summary.json`` (returned). ``per_worker`` adds
        entries to the workers' (the parameter server's tasks, failures)."""
        self.close()
        save_model(model, self.out, extra_tensors)
        entries = {t.rank: t.summary_entry() for t in totals}
        for rank, more in (per_worker or {}).items():
            entries.setdefault(rank, {"rank": rank}).update(more)
        workers = [entries[r] for r in sorted(entries)]
        summary = {
            "strategy": self.job.strategy.name,
            "model": self.model_name,
            "data": dataset.name,
            "world_size": world_size,
            "steps": steps,
            "global_batch_size": self.job.train.batch_size,
            "num_parameters": num_parameters,
            "final_loss": self.last_loss,
            **self.eval_metrics,
            "wall_time_s": wall_time,
            # (Poisson batches and federated rounds are not epochs: what the records saw)
            "samples_per_s": (sum(counts.values()) or self.samples_logged) / wall_time
            if wall_time > 0
            else 0.0,
            "bytes_sent_total": sum(w.get("bytes_sent", 0) for w in workers),
            "bytes_received_total": sum(w.get("bytes_received", 0) for w in workers),
            "samples_per_epoch": {str(k): v for k, v in sorted(counts.items())},
            "train_samples": dataset.num_train,
            "per_worker": workers,
            "memory": {
                m: max((t.memory.get(m, 0) for t in totals), default=0) for m in MEMORY_FIELDS
            },
            **extra,
        }
        write_atomic(self.out / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
        return summary

    def close(self) -> None:
        self.progress.close()
        self.metrics.close()
        if self.tb is not None:
            self.tb.close()
            self.tb = None
