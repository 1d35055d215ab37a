"""Models with large, sparsely touched embedding tables (click-through rate).

:class:`SparseEmbedding` is an embedding whose rows may live elsewhere. Locally
(all-reduce) it is a plain table. Under the parameter server, the strategy
removes the local table and attaches a row source: each forward then fetches
only the batch's distinct rows, and their gradients are pushed back as rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

RowSource = Callable[["SparseEmbedding", torch.Tensor], torch.Tensor]


class SparseEmbedding(nn.Module):
    """``num_rows`` x ``dim`` table; rows start at 0 (``init_std`` 0) or small values."""

    def __init__(self, num_rows: int, dim: int, init_std: float = 0.0) -> None:
        super().__init__()
        self.num_rows, self.dim, self.init_std = num_rows, dim, init_std
        self.weight: nn.Parameter | None = nn.Parameter(torch.randn(num_rows, dim) * init_std)
        self.source: RowSource | None = None
        self.input_ids: Callable[[torch.Tensor], torch.Tensor] | None = None
        """Maps the model's input to this table's ids, so rows can be fetched ahead."""

    def attach(self, source: RowSource) -> None:
        """Fetch rows from ``source`` from now on and drop the local table."""
        self.source = source
        self.weight = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.source is not None:
            return self.source(self, ids)
        return F.embedding(ids, self.weight)


class LogisticCTR(nn.Module):
    """Logistic regression on hashed categorical features: bias + sum of row weights."""

    def __init__(self, num_rows: int) -> None:
        super().__init__()
        self.table = SparseEmbedding(num_rows, 1)
        self.table.input_ids = lambda ids: ids
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table(ids).sum(dim=(1, 2)) + self.bias
