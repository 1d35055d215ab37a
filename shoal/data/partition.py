"""Federated partitions: which training rows each simulated client holds.

A partition is a function of the labels, the number of clients, the spec and
the seed, never of the number of processes, so any number of workers trains
the same clients on the same data:

- ``iid``: a seeded shuffle cut into ``clients`` parts that differ by at most
  one row.
- ``dirichlet:ALPHA``: label skew (Hsu et al. 2019). For each class, the
  class's rows are shared among the clients in proportions drawn from
  Dirichlet(ALPHA, ..., ALPHA); a small ALPHA gives each client few classes. As
  in Flower's ``DirichletPartitioner``, the draw is repeated (a new draw from
  the same seeded stream) until every client holds at least
  :data:`MIN_ROWS` rows.
- ``shards:K``: pathological non-IID (McMahan et al. 2017): the rows sorted by
  label are cut into ``clients * K`` shards of equal size, and each client gets
  K shards at random, so at most K labels.
- ``files``: each file of a Parquet training set is one client's rows, in the
  order the files are listed (``--clients`` must be the number of files). A
  federation of clients on other machines with ``files`` leaves the rows with
  the clients: each brings its own file (``shoal federate --data``), and the
  server never has them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from shoal.errors import UserError

MIN_ROWS = 2
"""The fewest rows a Dirichlet partition gives a client (it redraws below that)."""
MAX_DRAWS = 1000
"""Dirichlet draws tried before giving up (an ALPHA too small for the clients)."""


@dataclass(frozen=True)
class PartitionSpec:
    """A parsed ``--partition``."""

    kind: str
    value: float = 0.0

    def __str__(self) -> str:
        if self.kind in ("iid", "files"):
            return self.kind
        return f"{self.kind}:{self.value:g}"


def parse(spec: str) -> PartitionSpec:
    """``iid``, ``dirichlet:ALPHA`` or ``shards:K``; a :class:`UserError` for anything else."""
    kind, _, rest = spec.strip().partition(":")
    if kind in ("iid", "files") and not rest:
        return PartitionSpec(kind)
    if kind in ("dirichlet", "shards") and rest:
        try:
            value = float(rest)
        except ValueError:
            value = math.nan
        if kind == "dirichlet" and math.isfinite(value) and value > 0:
            return PartitionSpec(kind, value)
        if kind == "shards" and value.is_integer() and value >= 1:
            return PartitionSpec(kind, value)
    raise UserError(
        f"--partition {spec}: use iid, dirichlet:ALPHA (ALPHA > 0, e.g. dirichlet:0.5) "
        "shards:K (K labels per client, e.g. shards:2) or files (a client per Parquet file)"
    )


def partition(
    spec: PartitionSpec,
    clients: int,
    num_rows: int,
    labels: np.ndarray | None,
    seed: int,
    file_rows: list[int] | None = None,
) -> list[np.ndarray]:
    """The sorted training rows of each of ``clients`` clients. ``labels`` (one per row)
    are needed for ``dirichlet`` and ``shards``, ``file_rows`` (rows in each file, in
    order) for ``files``; a :class:`UserError` where a partition cannot be made."""
    if spec.kind == "files":
        if file_rows is None:
            raise UserError("--partition files needs a Parquet training set (--data PATH)")
        if len(file_rows) != clients:
            raise UserError(f"--partition files: --clients {clients}, and the training set "
                            f"has {len(file_rows)} files (a client per file)")  # fmt: skip
        ends = np.cumsum(file_rows)
        return [np.arange(end - n, end) for n, end in zip(file_rows, ends)]
    if clients > num_rows:
        raise UserError(f"--clients {clients} is more than the {num_rows} training rows")
    rng = np.random.default_rng([seed, 0x5EED_FED])
    if spec.kind == "iid":
        order = rng.permutation(num_rows)
        return [np.sort(part) for part in np.array_split(order, clients)]
    if labels is None:
        raise UserError(f"--partition {spec} needs a classification dataset (labels)")
    labels = np.asarray(labels).reshape(-1)
    if spec.kind == "shards":
        return _shards(int(spec.value), clients, labels, rng)
    return _dirichlet(spec.value, clients, labels, rng)


def _shards(k: int, clients: int, labels: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    count = clients * k
    if count > len(labels):
        raise UserError(
            f"--partition shards:{k} with {clients} clients needs {count} shards, more than "
            f"the {len(labels)} training rows"
        )
    by_label = np.argsort(labels, kind="stable")
    shards = np.array_split(by_label, count)
    order = rng.permutation(count)
    return [np.sort(np.concatenate([shards[s] for s in order[c * k : (c + 1) * k]]))
            for c in range(clients)]  # fmt: skip


def _dirichlet(
    alpha: float, clients: int, labels: np.ndarray, rng: np.random.Generator
) -> list[np.ndarray]:
    classes = np.unique(labels)
    rows_of = [np.flatnonzero(labels == c) for c in classes]
    least = min(MIN_ROWS, len(labels) // clients)
    for _ in range(MAX_DRAWS):
        parts: list[list[np.ndarray]] = [[] for _ in range(clients)]
        for rows in rows_of:
            rows = rng.permutation(rows)
            shares = rng.dirichlet(np.full(clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(rows)).astype(np.int64)
            for c, piece in enumerate(np.split(rows, cuts)):
                parts[c].append(piece)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in out) >= least:
            return out
    raise UserError(
        f"--partition dirichlet:{alpha:g} left a client with fewer than {least} rows in "
        f"{MAX_DRAWS} draws: use a larger ALPHA or fewer --clients"
    )
