"""shoal on Spark, through PySpark's TorchDistributor.

::

    import shoal.spark

    df = spark.read.table("events").select("f1", "f2", "f3", "clicked")
    job = {"model": {"name": "mlp"}, "data": {"features": "f*", "label": "clicked"},
           "train": {"steps": 2000}, "output": {"out": "/shared/runs/clicks"}}
    summary = shoal.spark.train(job, data=df, num_processes=4, local_mode=False)

A DataFrame is written once as Parquet (``data_dir``) and every process reads its
own part of each global batch from there with shoal's Parquet reader, so the
sample order, exact accounting and resume are those of ``shoal train --data
parquet:DIR``; a path is read where it is. ``shoal train --engine spark`` runs a
job through TorchDistributor from the command line.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from shoal.errors import UserError
from shoal.layout import SUMMARY_FILE
from shoal.run.engines import (
    JobLike,
    distribute,
    has_checkpoint,
    release,
    resolve,
    take_run_dir,
)
from shoal.run.resolve import Request, as_config, layered

__all__ = ["train"]


def train(
    job: JobLike,
    data: Any = None,
    num_processes: int = 2,
    local_mode: bool = True,
    data_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Train ``job`` (a JobConfig, its TOML tables as a dict, or a job file) with
    ``num_processes`` processes started by ``TorchDistributor`` (``local_mode``: on the
    driver's machine; else one per Spark task on the executors). Returns the run's
    summary (what ``RUN_DIR/summary.json`` holds).

    ``data``: a Spark DataFrame (written as Parquet to ``data_dir``, by default
    ``RUN_DIR-data`` beside the run directory; its numeric or array columns are the
    features and label, chosen by ``--features`` and ``--label``), or the path of
    Parquet files already written (read where they are), or ``None`` (the job's own
    ``--data``). A SparkSession must be active (the DataFrame's, or
    ``SparkSession.builder.getOrCreate()``).

    The DataFrame's copy is readable by this user only, and is removed when the run
    ends, except after a failure that left a checkpoint: ``--resume RUN_DIR`` with the
    same ``data_dir`` continues on the same files (a new copy of the rows would have
    new file names, which the resumed run refuses), and removes it when it ends."""
    given: dict[str, Any] = {"cluster.workers": num_processes}
    written, fresh = None, False
    if data is not None:
        path = data
        if not isinstance(data, (str, os.PathLike)):
            path, fresh = _write(data, job, data_dir)
            written = path
        given["data.name"] = f"parquet:{os.fspath(path)}"
    resolved = None
    try:
        resolved = resolve(job, "spark", given)
        take_run_dir(resolved)
        try:
            distribute(resolved, num_processes, local_mode)
        finally:
            release(resolved)
        path = Path(resolved.output.out) / SUMMARY_FILE
        if not path.is_file():
            raise RuntimeError(f"shoal: the Spark job wrote no summary in {resolved.output.out}")
        return json.loads(path.read_text())
    except BaseException:
        if not fresh or (resolved is not None and has_checkpoint(resolved)):
            written = None  # (kept for --resume)
        raise
    finally:
        if written is not None:
            shutil.rmtree(written, ignore_errors=True)


def _write(df: Any, job: JobLike, data_dir: str | os.PathLike | None) -> tuple[Path, bool]:
    """Write the DataFrame as Parquet into a new directory only this user may enter
    (refusing one that exists: the rows of a run may not change under it). Returns
    the directory, and whether it was written now (not a resumed run's)."""
    output = layered(Request(config=as_config(job)))[0].output
    if data_dir is None:
        out = output.out or output.resume
        if not out:
            raise UserError("shoal.spark.train: give [output] out (or data_dir) to write the "
                            "DataFrame")  # fmt: skip
        data_dir = f"{os.path.abspath(out)}-data"
    path = Path(data_dir).absolute()
    if path.exists() and output.resume:
        return path, False  # (the run's rows, written when it started; fingerprints checked)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=0o700)  # (Spark would make it with the umask's permissions)
    except FileExistsError:
        raise UserError(f"data_dir {path} exists; remove it or choose another") from None
    path.chmod(0o700)  # (mkdir's mode passes through the umask)
    try:
        df.write.mode("append").parquet(str(path))  # (into the directory made above)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    return path, True
