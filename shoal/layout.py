"""The run directory's layout: every file name in it, spelled once, and how files are
written (atomically: a reader never sees half a file).

::

    RUN_DIR/
      config.toml         the resolved job (CONFIG_FILE)
      metrics.jsonl       one record per log window and evaluation (METRICS_FILE)
      summary.json        the finished run (SUMMARY_FILE)
      model.safetensors   the final model (MODEL_FILE)
      report.html, *.png  the report (REPORT_FILE)
      tensorboard/        event files with --tensorboard (TENSORBOARD_DIR)
      checkpoints/        step-NNNNNNNN/ (CHECKPOINTS_DIR; see shoal.checkpoint)
      ps-shards/          the parameter server's shards' and coordinator's checkpoints
      ps_endpoints.json   where a parameter-server job listens (ENDPOINTS_FILE)
      failures/           the exceptions workers stopped on (FAILURES_DIR)
      .lock               held by the job that owns the directory (LOCK_FILE)
      .shoal-user-error   a worker's one-line refusal of the job (USER_ERROR_FILE)
      .attempts           how many times Ray started the workers (ATTEMPTS_FILE)
      .secret             the driver's SHOAL_SECRET for an engine's workers, 0600,
                          while the job runs (SECRET_FILE)
      ray/                Ray Train's own records of an --engine ray run
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from shoal.config import JobConfig
from shoal.jobfile import dumps_toml

if TYPE_CHECKING:
    import torch

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
MODEL_FILE = "model.safetensors"
REPORT_FILE = "report.html"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINTS_DIR = "checkpoints"
PS_SHARDS_DIR = "ps-shards"
ENDPOINTS_FILE = "ps_endpoints.json"
AUDIT_DIR = "audit"
DATASET_FILE = "dataset.json"
FAILURES_DIR = "failures"
"""A worker's exception, as ``worker-N.json``, read by its launcher (see shoal.failure)."""
LOCK_FILE = ".lock"
ATTEMPTS_FILE = ".attempts"
SECRET_FILE = ".secret"
USER_ERROR_FILE = ".shoal-user-error"
"""Left by a worker that stopped on a :class:`~shoal.errors.UserError`: the processes
torchrun's agent restarts after it exit at once, and the launcher ends with the
worker's line alone (a mistake is not retried)."""


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` to ``path`` through a temporary file, fsync and a rename."""
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


def write_config(job: JobConfig, run_dir: Path) -> Path:
    """The fully resolved job, as ``RUN_DIR/config.toml``; returns its path."""
    path = Path(run_dir) / CONFIG_FILE
    write_atomic(path, dumps_toml(job))
    return path


def save_model(
    model: torch.nn.Module, out: Path, extra: dict[str, torch.Tensor] | None = None
) -> None:
    """The final model (plus ``extra`` tensors) as ``model.safetensors``, written atomically."""
    from safetensors.torch import save_file

    state = {**model.state_dict(), **(extra or {})}
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    tmp = Path(out) / f".{MODEL_FILE}.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(Path(out) / MODEL_FILE)


GENERATIONS_FILE = "generations.jsonl"
"""``--recovery inplace``: each generation of the job (members, first step, their pids)."""
