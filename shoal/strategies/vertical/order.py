"""The sample order every party computes alike: which common ids a step trains.

The common ids are sorted; each epoch is a keyed Feistel permutation of their
positions, cut into batches (the last of an epoch shorter), so no row number
crosses the wire and every party draws the same batches. A party of several
processes cuts each batch into slices (:func:`part_of`).
"""

from __future__ import annotations

import functools

import numpy as np

from shoal.data.order import FeistelPermutation


def batch_rows(common: int, step: int, batch: int, seed: int) -> np.ndarray:
    """Positions (in the ascending common ids) of the samples of ``step``: epochs of a
    keyed permutation of the common ids, cut into batches (the last one of an epoch
    shorter); the same at every party."""
    per_epoch = -(-common // batch)
    epoch, k = divmod(step, per_epoch)
    key = seed * 1_000_003 + epoch
    wanted = slice(k * batch, min((k + 1) * batch, common))
    if common <= WHOLE_EPOCH:
        return _epoch_order(common, key)[wanted]
    return FeistelPermutation(common, key)(np.arange(wanted.start, wanted.stop))


def part_of(rows: np.ndarray, part: tuple[int, int]) -> np.ndarray:
    """Process ``part[0]`` of ``part[1]``'s slice of a batch's rows (a data-parallel
    party: each of its processes trains one slice; the same cut at every party)."""
    index, count = part
    return rows if count == 1 else np.array_split(rows, count)[index]


WHOLE_EPOCH = 1 << 24
"""Up to this many common ids an epoch's order is computed whole, once (8 bytes an id;
a seventh of the time batch by batch costs), beyond it batch by batch."""


@functools.lru_cache(maxsize=2)
def _epoch_order(n: int, key: int) -> np.ndarray:
    return FeistelPermutation(n, key)(np.arange(n))  # (callers index it, never write)


def rows_of(ids: np.ndarray, common: np.ndarray) -> np.ndarray:
    """Each common id's row in a party's own table (``ids``, its id column)."""
    order = np.argsort(ids, kind="stable")
    at = np.searchsorted(ids, common, sorter=order)
    if (at >= len(ids)).any() or (ids[order[np.minimum(at, len(ids) - 1)]] != common).any():
        raise ValueError("a common id this party does not hold")
    return order[at]
