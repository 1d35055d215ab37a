"""The reference a vertical job is measured against: the same model, from the same
initial weights, trained by one process on the joined table of the common ids, in the
same batches (what the tests compare parameters with, and the bench time and AUC)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from shoal.models.tasks import per_sample_loss
from shoal.strategies.vertical.job import seeded
from shoal.strategies.vertical.order import batch_rows, rows_of
from shoal.strategies.vertical.split import Pooled, build_bottom, build_top
from shoal.strategies.vertical.tables import PartyTable, read_party


@dataclass
class PooledRun:
    model: Pooled
    evals: list[dict[str, float]] = field(default_factory=list)
    """``{"step", "train_s", "test_loss", "auc"}`` at each evaluation."""
    train_s: float = 0.0
    """Seconds in training steps (reading and joining the tables left out)."""
    samples: int = 0


def _joined(tables: list[PartyTable], split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The columns of every party (label party first, as its top sees them) and the
    labels, for the ids all of them hold, ascending."""
    parts = [getattr(t, split) for t in tables]
    common = parts[0].ids
    for p in parts[1:]:
        common = np.intersect1d(common, p.ids)
    xs = [p.features[torch.from_numpy(rows_of(p.ids, common))] for p in parts]
    y = parts[0].labels[torch.from_numpy(rows_of(parts[0].ids, common))]
    return torch.cat(xs, 1), y


def train_pooled(
    parties: dict[str, str], label: str, label_column: str, kind: str, *, steps: int,
    batch: int, seed: int, lr: float, hidden: int = 64, dim: int = 16, eval_every: int = 0,
    id_column: str = "id",
) -> PooledRun:  # fmt: skip
    """Train ``kind`` (a ``--split-model``) on the joined table of ``parties`` with Adam at
    ``lr``, as ``shoal train --strategy vertical`` would split it."""
    names = list(parties)
    order = [label, *[n for n in names if n != label]]  # (the top's input order)
    tables = [read_party(n, parties[n], id_column, label_column if n == label else "")
              for n in order]  # fmt: skip
    x, y = _joined(tables, "train")
    test = _joined(tables, "test") if all(t.test is not None for t in tables) else None
    task, outputs = tables[0].task, tables[0].num_outputs
    bottoms, columns, at = [], [], 0
    for t in tables:
        if t.width == 0:
            continue
        seeded(seed, names.index(t.name))
        bottoms.append(build_bottom(kind, t.width, outputs, hidden, dim))
        columns.append(range(at, at + t.width))
        at += t.width
    seeded(seed, -1)
    top = build_top(kind, len(bottoms), outputs, hidden, dim)
    model = Pooled(bottoms, top, columns)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    run = PooledRun(model)
    for step in range(steps):
        began = time.perf_counter()
        b = torch.from_numpy(batch_rows(len(y), step, batch, seed))
        opt.zero_grad()
        per_sample_loss(task, model(x[b]), y[b]).mean().backward()
        opt.step()
        run.train_s += time.perf_counter() - began
        run.samples += len(b)
        if test is not None and eval_every and ((step + 1) % eval_every == 0 or step + 1 == steps):
            run.evals.append({"step": step + 1, "train_s": run.train_s, **score(model, test, task)})
    return run


@torch.no_grad()
def score(
    model: torch.nn.Module, test: tuple[torch.Tensor, torch.Tensor], task: str
) -> dict[str, float]:
    """Held-out loss (and AUC for a binary label) of ``model``."""
    from sklearn.metrics import roc_auc_score

    x, y = test
    out = model(x)
    metrics = {"test_loss": float(per_sample_loss(task, out, y).mean())}
    if task == "binary":
        metrics["auc"] = float(roc_auc_score(y.numpy(), out.reshape(y.shape).numpy()))
    return metrics
