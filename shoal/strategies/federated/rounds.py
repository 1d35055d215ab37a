"""Rounds of a federation: which clients train, on which rows, on which process.

Everything here is a function of the seed, the round and the client, never of
the number of processes: a federation simulated on one process, on eight, or
run by clients on other machines trains the same clients on the same batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shoal.data import Task, partition


def sample_clients(
    seed: int, round_: int, clients: int, per_round: int, poisson: bool
) -> list[int]:
    """The clients of round ``round_`` (counted from 0), sorted: ``per_round`` of
    ``clients`` drawn without replacement, or, with ``poisson``, each client in with
    probability ``per_round / clients`` (the sampling that client-level DP's accounting
    assumes)."""
    rng = np.random.default_rng([seed, round_, 0xC11E])
    if poisson:
        return np.flatnonzero(rng.random(clients) < per_round / clients).tolist()
    if per_round >= clients:
        return list(range(clients))
    return np.sort(rng.choice(clients, size=per_round, replace=False)).tolist()


def local_batches(
    seed: int, round_: int, client: int, rows: np.ndarray, batch: int, steps: int, epochs: int
) -> list[np.ndarray]:
    """The local minibatches of ``client`` in ``round_``: its rows shuffled anew each
    local epoch and cut into batches of ``batch`` (the last of an epoch may be
    shorter), ``epochs`` whole epochs, or else the first ``steps`` batches."""
    if not len(rows):  # (a client whose rows are its own, at the server: not here)
        return []
    rng = np.random.default_rng([seed, round_, client, 0xBA7C])
    size = max(1, min(batch, len(rows)))
    per_epoch = math.ceil(len(rows) / size)
    wanted = epochs * per_epoch if epochs else steps
    out: list[np.ndarray] = []
    while len(out) < wanted:
        order = rows[rng.permutation(len(rows))]
        out.extend(order[i : i + size] for i in range(0, len(order), size))
    return out[:wanted]


@dataclass
class ClientWork:
    """One client's part of a round on this process."""

    client: int
    examples: int
    """The client's rows in all: the weight of its update (as FedAvg and Flower weigh)."""
    batches: list[np.ndarray]


@dataclass(frozen=True)
class RoundTask(Task):
    """This process's clients of one round (``step``); ``indices``: all their rows, batch
    after batch, client after client."""

    clients: list[ClientWork] = field(default_factory=list)
    sampled: int = 0
    """Clients in the round, on all processes together."""


@dataclass
class Federation:
    """The clients, their rows, and how each round picks and trains them."""

    partitions: list[np.ndarray]
    per_round: int
    batch: int
    local_steps: int
    local_epochs: int
    seed: int
    poisson: bool = False
    sample_seed: int | None = None
    """Under client-level DP, the secret the Poisson sample of clients is drawn from
    (:class:`shoal.privacy.Randomness`): who was sampled must not follow from the job."""

    @property
    def clients(self) -> int:
        return len(self.partitions)

    def chosen(self, round_: int) -> list[int]:
        """The clients of round ``round_``, sorted."""
        seed = self.seed if self.sample_seed is None else self.sample_seed
        return sample_clients(seed, round_, self.clients, self.per_round, self.poisson)

    def client_work(self, round_: int, client: int) -> ClientWork:
        """What ``client`` trains on in ``round_``."""
        rows = self.partitions[client]
        batches = local_batches(self.seed, round_, client, rows, self.batch, self.local_steps,
                                self.local_epochs)  # fmt: skip
        return ClientWork(client, len(rows), batches)

    def round(self, round_: int, rank: int, world: int) -> RoundTask:
        """Round ``round_``'s clients that process ``rank`` of ``world`` trains: the
        round's sorted clients dealt out in turn."""
        chosen = self.chosen(round_)
        mine = [self.client_work(round_, client) for client in chosen[rank::world]]
        rows = [b for c in mine for b in c.batches]
        indices = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        return RoundTask(round_, rank, world, indices, max(1, len(indices)), clients=mine,
                         sampled=len(chosen))  # fmt: skip


class RoundWork:
    """Every round from ``step`` to ``total``, this process's clients of each."""

    def __init__(
        self, federation: Federation, rank: int, world: int, step: int, total: int, log_every: int
    ) -> None:
        self.federation, self.rank, self.world = federation, rank, world
        self.step, self.total, self.log_every = step, total, log_every
        self.current: RoundTask | None = None

    def next(self) -> RoundTask | None:
        if self.step >= self.total:
            self.current = None
            return None
        self.current = self.federation.round(self.step, self.rank, self.world)
        self.step += 1
        return self.current

    def peek(self) -> RoundTask | None:
        if self.step >= self.total:
            return None
        return self.federation.round(self.step, self.rank, self.world)

    def log_now(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.total


def build_federation(job: Any, data: Any, poisson: bool = False) -> Federation:
    """The clients of ``job`` over the training rows of ``data``."""
    o = job.strategy.options
    spec = partition.parse(o.partition)
    labels = None
    if spec.kind not in ("iid", "files"):
        labels = np.asarray(data.rows.take(np.arange(data.num_train))[1].cpu())
    if spec.kind == "files" and o.listen:  # the rows are the clients', not the server's
        parts = [np.zeros(0, dtype=np.int64)] * o.clients
    else:
        parts = partition.partition(spec, o.clients, data.num_train, labels, job.train.seed,
                                    file_rows(data))  # fmt: skip
    per_round = o.clients_per_round or o.clients
    return Federation(parts, min(per_round, o.clients), job.train.batch_size, o.local_steps,
                      o.local_epochs, job.train.seed, poisson)  # fmt: skip


def file_rows(data: Any) -> list[int] | None:
    """The rows of each file of a Parquet training set, in order (``None`` for data that
    is not in files)."""
    files = getattr(data.rows, "files", None)
    return None if files is None else [shard.rows for shard in files.shards]
