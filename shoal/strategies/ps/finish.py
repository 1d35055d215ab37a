"""The end of a parameter-server job: the final model, pulled from the shards.

The dense parameters come back slice by slice from the shards that hold them;
embedding tables are never built whole: each shard dumps the rows it touched,
and untouched rows keep their initial value (``StoredRows``). The shards are
then told to shut down.
"""

from __future__ import annotations

from typing import Any

import torch

from shoal.config import JobConfig
from shoal.data import Dataset, build_dataset
from shoal.metrics import CommCounter
from shoal.models import build_model
from shoal.models.sparse import SparseEmbedding, StoredRows, export_table, remote_tables
from shoal.strategies.ps.client import Client
from shoal.strategies.ps.placement import dense_plan
from shoal.strategies.ps.recovery import ShardTable


def pull_final_model(
    job: JobConfig, shards: ShardTable, secret: bytes, generation: int
) -> tuple[torch.nn.Module, Dataset, dict[str, torch.Tensor], list[dict[str, Any]]]:
    """(the model, its dataset, tensors to export beside it, each shard's stats); the
    shards shut down afterwards."""
    data = build_dataset(job.data)
    torch.manual_seed(job.train.seed)
    with remote_tables():  # never the whole table: the touched rows, from the shards
        model = build_model(job.model, data)
    tables = {n: m for n, m in model.named_modules() if isinstance(m, SparseEmbedding)}
    params = dict(model.named_parameters())
    exported: dict[str, torch.Tensor] = {}
    k = shards.count
    plan = dense_plan([(n, p.numel()) for n, p in params.items()], k)
    by_shard = [[s for s in plan if s.shard == i] for i in range(k)]
    client = Client(
        [shards.addresses[i] for i in range(k)],
        [shards.targets[i] for i in range(k)],
        secret,
        "coordinator",
        CommCounter(),
        timeout_s=60,
    )
    try:
        pull = {"op": "pull", "step": 0, "dense": True, "tables": [], "gen": generation}
        replies = client.call_all([(pull, [])] * k)
        stats = [h["stats"] for h, _ in client.call_all([({"op": "stats"}, [])] * k)]
        with torch.no_grad():
            for slices, (_, values) in zip(by_shard, replies):
                for s, v in zip(slices, values):
                    params[s.name].view(-1)[s.start : s.stop].copy_(v)
            for name, module in tables.items():
                dumps = client.call_all([({"op": "dump", "table": name}, [])] * k)
                stored = StoredRows(
                    torch.cat([ids for _, (ids, _) in dumps]),
                    torch.cat([rows for _, (_, rows) in dumps]),
                )
                module.attach(stored)
                exported.update(export_table(name, module, stored))
        client.call_all([({"op": "shutdown"}, [])] * k)
    finally:
        client.close()
    return model, data, exported, stats
