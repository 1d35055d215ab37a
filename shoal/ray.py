"""shoal on a Ray cluster, through Ray Train.

::

    import ray.train
    from ray.train.torch import TorchTrainer
    import shoal.ray

    job = {"model": {"name": "mlp"}, "train": {"steps": 300}, "output": {"out": "/shared/runs/a"}}
    trainer = TorchTrainer(
        shoal.ray.train_loop(job),
        scaling_config=ray.train.ScalingConfig(num_workers=4),
        run_config=ray.train.RunConfig(failure_config=ray.train.FailureConfig(max_failures=2)),
    )
    result = trainer.fit()        # result.metrics: final_loss, test_accuracy, ...

Each Ray worker is one shoal worker, in the process group Ray Train made; every
strategy that trains in a process group runs (allreduce, fsdp, tensor, pipeline,
local-sgd, diloco, easgd). When a worker dies, Ray's ``FailureConfig`` starts the
group again and it resumes from the run's newest checkpoint (``--checkpoint-every``),
with every sample still counted once. ``shoal train --engine ray`` does all of this
from the command line.
"""

from __future__ import annotations

from shoal.run.engines import JobLike, RayLoop, resolve, take_run_dir

__all__ = ["train_loop"]


def train_loop(job: JobLike) -> RayLoop:
    """The ``train_loop_per_worker`` that trains ``job`` (a JobConfig, its TOML tables as a
    dict, or a job file) in Ray Train's workers.

    The job is checked here, in the driver, which then holds the run directory
    (``--out``) until it exits: the directory must be one the workers reach (this
    machine, or a shared filesystem). ``--workers`` is Ray's to decide
    (``ScalingConfig(num_workers=...)``). Raises :class:`shoal.errors.UserError` with
    one line for a mistake in the job."""
    resolved = resolve(job, "ray")
    return RayLoop(take_run_dir(resolved))
