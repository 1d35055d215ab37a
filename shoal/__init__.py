"""shoal: distributed training with every classic strategy, one job model.

``shoal.train(job, **overrides)`` trains a job from Python and returns its
:class:`~shoal.run.api.Result` (see :mod:`shoal.run.api`); ``shoal train`` does
the same from the command line.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Result", "train"]


def __getattr__(name: str) -> Any:
    # (imported on first use: ``python -m shoal`` and the workers need none of it)
    if name in ("train", "Result"):
        from shoal.run import api

        return getattr(api, name)
    raise AttributeError(f"module 'shoal' has no attribute {name!r}")
