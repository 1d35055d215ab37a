"""What a server shard stores: dense slices and lazily grown embedding tables."""

from __future__ import annotations

import numpy as np
import torch

from shoal.models.sparse import init_rows
from shoal.strategies.ps.optim import ServerOptimizer


class SparseTable:
    """Rows of one embedding table, created on first touch, with optimizer state.

    Rows live in one growing slab. Row ids are kept in sorted arrays beside their
    slots, so a batch of ids is looked up with a vectorised binary search and new
    ids are merged in with one insertion, not a Python loop. New ids go to a small
    sorted array first, merged into the main one once it holds an eighth as many
    (inserting into the main array every time copied all of it per request).
    Memory is proportional to the rows touched, not to the table's nominal size.
    """

    def __init__(self, dim: int, init_std: float, seed: int, optimizer: ServerOptimizer) -> None:
        self.dim = dim
        self.init_std = init_std
        self.seed = seed
        self.optimizer = optimizer
        self._keys = np.empty(0, dtype=np.int64)  # sorted row ids
        self._slots = np.empty(0, dtype=np.int64)  # slot of _keys[i] in the slab
        self._new_keys = np.empty(0, dtype=np.int64)  # the same for recent ids, fewer
        self._new_slots = np.empty(0, dtype=np.int64)
        self.rows = torch.empty(0, dim)
        self.state = optimizer.new_state(0, dim)
        self._version = 0  # ids added so far
        self._last: tuple[int, np.ndarray, np.ndarray] | None = None
        """(version, ids, their slots) of the last lookup: a push of the rows a pull
        just read (the usual order) finds them without searching again."""

    def __len__(self) -> int:
        return len(self._keys) + len(self._new_keys)

    @property
    def keys(self) -> np.ndarray:
        """Every row id, sorted."""
        self._merge()
        return self._keys

    @property
    def key_slots(self) -> np.ndarray:
        """The slot of each of :attr:`keys` in the slab."""
        self._merge()
        return self._slots

    def set_index(self, keys: np.ndarray, slots: np.ndarray) -> None:
        """Every row id (sorted) and its slot, as :attr:`keys` and :attr:`key_slots`
        gave them (a restored checkpoint)."""
        self._keys, self._slots = keys, slots
        self._new_keys = self._new_slots = np.empty(0, dtype=np.int64)
        self._version += 1

    def _merge(self) -> None:
        if len(self._new_keys):
            at = np.searchsorted(self._keys, self._new_keys)
            self._keys = np.insert(self._keys, at, self._new_keys)
            self._slots = np.insert(self._slots, at, self._new_slots)
            self._new_keys = self._new_slots = np.empty(0, dtype=np.int64)

    def ids(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(row ids, their slots) of every row that exists."""
        return torch.from_numpy(self.keys.copy()), torch.from_numpy(self.key_slots.copy())

    def slots(self, ids: torch.Tensor) -> torch.Tensor:
        """Slots of ``ids``, creating missing rows."""
        want = ids.to(torch.int64).numpy()
        last = self._last
        if last is not None and last[0] == self._version and np.array_equal(last[1], want):
            return torch.from_numpy(last[2])
        out = self._find(want)
        self._last = (self._version, want.copy(), out)
        return torch.from_numpy(out)

    def _find(self, want: np.ndarray) -> np.ndarray:
        out = np.empty(len(want), dtype=np.int64)
        found = _search(self._keys, self._slots, want, out)
        if found.all():
            return out
        missing = np.flatnonzero(~found)
        recent = np.empty(len(missing), dtype=np.int64)
        found = _search(self._new_keys, self._new_slots, want[missing], recent)
        out[missing[found]] = recent[found]
        missing = missing[~found]
        if len(missing):
            new, inverse = np.unique(want[missing], return_inverse=True)
            first = len(self)
            new_slots = np.arange(first, first + len(new), dtype=np.int64)
            out[missing] = new_slots[inverse]
            at = np.searchsorted(self._new_keys, new)
            self._new_keys = np.insert(self._new_keys, at, new)
            self._new_slots = np.insert(self._new_slots, at, new_slots)
            self._version += 1
            self._grow(torch.from_numpy(new))
            if len(self._new_keys) > max(MERGE_AT, len(self._keys) // 8):
                self._merge()
        return out

    def _grow(self, new_ids: torch.Tensor) -> None:
        needed = len(self)
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
        return self.rows.index_select(0, slots)

    def apply(self, ids: torch.Tensor, grads: torch.Tensor, step: int) -> None:
        slots = self.slots(ids)
        param = self.rows.index_select(0, slots)
        state = {k: v.index_select(0, slots) for k, v in self.state.items()}
        self.optimizer.apply(param, grads, state, step)
        self.rows.index_copy_(0, slots, param)
        for k, v in state.items():
            self.state[k].index_copy_(0, slots, v)


MERGE_AT = 4096
"""Recent ids are merged into the main sorted array once there are more than this many
(and more than an eighth of the main one)."""


def _search(keys: np.ndarray, slots: np.ndarray, want: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Which of ``want`` are in sorted ``keys``; their slots are written into ``out``."""
    pos = np.searchsorted(keys, want)
    found = pos < len(keys)
    found[found] = keys[pos[found]] == want[found]
    out[found] = slots[pos[found]]
    return found


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
