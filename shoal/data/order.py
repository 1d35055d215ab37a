"""Sample order and sample identities, computed without materializing anything large.

The order of an epoch is a function of (seed, epoch, dataset) alone:

* ``full``: a keyed pseudo-random permutation of all row numbers, a Feistel
  network on the smallest even power of two holding them, with cycle walking
  for the positions past the end. Position ``p`` maps to its row in O(1), so a
  billion rows cost no memory at all.
* ``block``: the dataset's blocks (row groups on disk, or ``block`` rows each)
  in a random order, then the rows of each window of ``window`` consecutive
  blocks shuffled among themselves. A step then reads a few blocks, not rows
  from everywhere: the mode for slow storage. Memory: O(number of blocks).

A sample's identity is its row number in the training set. An epoch's
*digest* is the sum modulo 2**64 of ``splitmix64(id)`` over the ids it
consumed, beside their count: order-independent, so workers add theirs, and
any lost, repeated or foreign sample changes it (up to 64-bit collisions).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

MASK64 = (1 << 64) - 1
_U64 = np.uint64
TABLE_ROWS = 1 << 20
"""Up to this many rows (8 MB of order), an epoch's order is computed whole, once."""


def splitmix64(x: np.ndarray | int) -> np.ndarray:
    """The splitmix64 finalizer, elementwise on uint64 (wrapping arithmetic)."""
    z = np.asarray(x)
    if z.dtype != _U64:
        z = z.astype(np.int64).astype(_U64)
    with np.errstate(over="ignore"):
        z = z + _U64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
    return z ^ (z >> _U64(31))


def digest(ids: np.ndarray) -> int:
    """Order-independent digest of sample ids: sum of splitmix64(id) mod 2**64."""
    if len(ids) == 0:
        return 0
    with np.errstate(over="ignore"):
        return int(splitmix64(ids).sum(dtype=_U64))


def range_digest(start: int, stop: int, chunk: int = 1 << 22) -> int:
    """:func:`digest` of ``arange(start, stop)``, in bounded memory."""
    total = 0
    for a in range(start, stop, chunk):
        total = (total + digest(np.arange(a, min(stop, a + chunk), dtype=np.int64))) & MASK64
    return total


def _key(*parts: int) -> int:
    k = 0x2545F4914F6CDD1D
    for p in parts:
        k = int(splitmix64(np.array([k ^ (int(p) & MASK64)], dtype=_U64))[0])
    return k


class FeistelPermutation:
    """A keyed bijection of ``range(n)``: a balanced Feistel network on the smallest
    even power of two holding ``n``, plus cycle walking. Four rounds (Luby-Rackoff's
    count for a pseudo-random permutation), each a multiply-xorshift hash of the right
    half and the round key, the top bits kept."""

    ROUNDS = 4
    _C1, _C2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9)

    def __init__(self, n: int, key: int) -> None:
        if n < 1:
            raise ValueError("a permutation needs at least one element")
        self.n = n
        self.half = max(1, math.ceil(math.log2(n) / 2)) if n > 1 else 1
        self.mask = _U64((1 << self.half) - 1)
        self.keys = [_U64(_key(key, r)) for r in range(self.ROUNDS)]

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        h = _U64(self.half)
        top, s32 = _U64(64 - self.half), _U64(32)
        left, right = x >> h, x & self.mask
        with np.errstate(over="ignore"):
            for k in self.keys:
                f = (right + k) * self._C1
                f ^= f >> s32
                f *= self._C2
                left, right = right, left ^ (f >> top)
        return (left << h) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """The rows at ``positions`` (each in ``[0, n)``) of the permuted order."""
        pos = np.asarray(positions, dtype=np.int64)
        if self.n == 1:
            return np.zeros_like(pos)
        y = self._encrypt(pos.astype(_U64))
        out = y >= _U64(self.n)
        while out.any():  # cycle walking: the domain is at most 4n, so a few rounds
            y[out] = self._encrypt(y[out])
            out = y >= _U64(self.n)
        return y.astype(np.int64)


class Order:
    """Row of each position of an epoch, by a shuffle mode; see the module docstring.

    Args:
        n: rows in the training set.
        seed: the run's seed.
        mode: ``"full"`` or ``"block"``.
        blocks: sizes of the dataset's blocks, in row order (block mode), summing to n.
        window: blocks shuffled together (block mode).
    """

    MODES = ("full", "block")

    def __init__(
        self,
        n: int,
        seed: int,
        mode: str = "full",
        blocks: Sequence[int] | None = None,
        window: int = 16,
    ) -> None:
        if mode not in self.MODES:
            raise ValueError(f"unknown shuffle mode {mode!r}")
        self.n, self.seed, self.mode, self.window = n, seed, mode, max(1, window)
        if mode == "block":
            sizes = np.asarray(blocks if blocks is not None else [n], dtype=np.int64)
            if int(sizes.sum()) != n or (sizes <= 0).any():
                raise ValueError("block sizes must be positive and add up to the row count")
            self.sizes = sizes
            self.starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self._epoch: int | None = None
        self._table: np.ndarray | None = None

    def _prepare(self, epoch: int) -> None:
        if self._epoch == epoch:
            return
        self._epoch = epoch
        if self.mode == "full":
            self._perm = FeistelPermutation(self.n, _key(self.seed, epoch))
            # a small epoch's whole order, once: a step's rows are then one lookup
            # (the network costs ~0.25 ms per step of 64 rows, 2% of a short step)
            small = self.n <= TABLE_ROWS
            self._table = self._perm(np.arange(self.n, dtype=np.int64)) if small else None
            return
        nb = len(self.sizes)
        rng = np.random.default_rng([self.seed, epoch, 0xB10C])
        self._block_order = rng.permutation(nb)
        sizes = self.sizes[self._block_order]
        self._ends = np.cumsum(sizes)  # end of each permuted block, in positions
        bounds = self._ends[self.window - 1 :: self.window]
        if len(bounds) == 0 or bounds[-1] != self.n:
            bounds = np.append(bounds, self.n)
        self._window_ends = bounds
        self._perms: dict[int, FeistelPermutation] = {}

    def rows(self, epoch: int, positions: np.ndarray) -> np.ndarray:
        """Rows at ``positions`` of epoch ``epoch``'s order."""
        self._prepare(epoch)
        pos = np.asarray(positions, dtype=np.int64)
        if self.mode == "full":
            return self._table[pos] if self._table is not None else self._perm(pos)
        win = np.searchsorted(self._window_ends, pos, side="right")
        out = np.empty_like(pos)
        for w in np.unique(win):
            here = win == w
            start = int(self._window_ends[w - 1]) if w > 0 else 0
            size = int(self._window_ends[w]) - start
            perm = self._perms.get(int(w))
            if perm is None:
                if len(self._perms) > 64:
                    self._perms.clear()
                perm = self._perms[int(w)] = FeistelPermutation(size, _key(self.seed, epoch, w))
            shuffled = start + perm(pos[here] - start)  # a position inside the same window
            b = np.searchsorted(self._ends, shuffled, side="right")
            within = shuffled - (self._ends[b] - self.sizes[self._block_order[b]])
            out[here] = self.starts[self._block_order[b]] + within
        return out

    def describe(self) -> str:
        """What fixes the order besides the seed (saved with the position)."""
        if self.mode == "full":
            return "full"
        return f"block/{len(self.sizes)}x{digest(self.sizes):016x}/window={self.window}"

    def permutation(self, epoch: int) -> np.ndarray:
        """The whole order of an epoch (for small datasets and references)."""
        return self.rows(epoch, np.arange(self.n, dtype=np.int64))
