"""What a server shard stores: dense slices and lazily grown embedding tables."""

from __future__ import annotations

import numpy as np
import torch

from shoal.models.sparse import init_rows
from shoal.strategies.ps.optim import ServerOptimizer


class SparseTable:
    """Rows of one embedding table, created on first touch, with optimizer state.

    Rows live in one growing slab. Row ids are kept in a sorted array beside
    their slots, so a batch of ids is looked up with one vectorised binary
    search and new ids are merged in with one insertion, not a Python loop.
    Memory is proportional to the rows touched, not to the table's nominal size.
    """

    def __init__(self, dim: int, init_std: float, seed: int, optimizer: ServerOptimizer) -> None:
        self.dim = dim
        self.init_std = init_std
        self.seed = seed
        self.optimizer = optimizer
        self.keys = np.empty(0, dtype=np.int64)  # sorted row ids
        self.key_slots = np.empty(0, dtype=np.int64)  # slot of keys[i] in the slab
        self.rows = torch.empty(0, dim)
        self.state = optimizer.new_state(0, dim)
        self._last: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        """(keys array, ids, their slots) of the last lookup: a push of the rows a pull
        just read (the usual order) finds them without searching again."""

    def __len__(self) -> int:
        return len(self.keys)

    def ids(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(row ids, their slots) of every row that exists."""
        return torch.from_numpy(self.keys.copy()), torch.from_numpy(self.key_slots.copy())

    def slots(self, ids: torch.Tensor) -> torch.Tensor:
        """Slots of ``ids``, creating missing rows."""
        want = ids.to(torch.int64).numpy()
        last = self._last
        if last is not None and last[0] is self.keys and np.array_equal(last[1], want):
            return torch.from_numpy(last[2])
        out = self._find(want)
        self._last = (self.keys, want.copy(), out)
        return torch.from_numpy(out)

    def _find(self, want: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(self.keys, want)
        found = pos < len(self.keys)
        found[found] = self.keys[pos[found]] == want[found]
        out = np.empty(len(want), dtype=np.int64)
        out[found] = self.key_slots[pos[found]]
        if not found.all():
            new, inverse = np.unique(want[~found], return_inverse=True)
            first = len(self.keys)
            new_slots = np.arange(first, first + len(new), dtype=np.int64)
            out[~found] = new_slots[inverse]
            at = np.searchsorted(self.keys, new)
            self.keys = np.insert(self.keys, at, new)
            self.key_slots = np.insert(self.key_slots, at, new_slots)
            self._grow(torch.from_numpy(new))
        return out

    def _grow(self, new_ids: torch.Tensor) -> None:
        needed = len(self.keys)
        if needed > len(self.rows):
            capacity = max(needed, 2 * len(self.rows), 1024)
            self.rows = _resize(self.rows, capacity)
            self.state = {k: _resize(v, capacity) for k, v in self.state.items()}
        start = needed - len(new_ids)
        self.rows[start:needed] = init_rows(new_ids, self.dim, self.init_std, self.seed)
        for v in self.state.values():
            v[start:needed] = 0

    def read(self, ids: torch.Tensor) -> torch.Tensor:
        slots = self.slots(ids)  # first: it may grow (replace) self.rows
        return self.rows[slots]

    def apply(self, ids: torch.Tensor, grads: torch.Tensor, step: int) -> None:
        slots = self.slots(ids)
        param = self.rows[slots]
        state = {k: v[slots] for k, v in self.state.items()}
        self.optimizer.apply(param, grads, state, step)
        self.rows[slots] = param
        for k, v in state.items():
            self.state[k][slots] = v


def _resize(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` with room for ``rows`` rows; the new ones are set when they are created."""
    out = torch.empty(rows, *t.shape[1:], dtype=t.dtype)
    out[: len(t)] = t
    return out


def sum_rows(
    ids: list[torch.Tensor], grads: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate row gradients and add up duplicates: (unique ids, summed grads)."""
    if len(ids) == 1 and (len(ids[0]) < 2 or bool((ids[0][1:] > ids[0][:-1]).all())):
        return ids[0], grads[0]  # one part's rows, ascending (as workers send them): unique
    all_ids = torch.cat(ids)
    unique, inverse = torch.unique(all_ids, return_inverse=True)
    summed = torch.zeros(len(unique), grads[0].shape[1]).index_add_(0, inverse, torch.cat(grads))
    return unique, summed
