"""Top-k compression of each rank's optimizer update: Deep Gradient Compression for any optimizer.

Top-k of the *gradient* with error feedback loses accuracy under momentum and
Adam: the optimizer's state sees a gradient that is zero on most steps and a
burst of accumulated value now and then. Deep Gradient Compression (Lin et
al. 2018) moves the momentum in front of the compression ("momentum
correction"): each rank keeps its own velocity and sends the largest entries
of what it would have applied. :class:`SparseUpdates` does the same for any
optimizer: each rank steps its own optimizer on its own gradient, and the
change that step made to the parameters, plus whatever earlier steps left
unsent (the codec's error feedback), is what is compressed. Every rank then
applies the mean of the ranks' sparse changes to the parameters as they were
before the step, so the replicas stay one model, bit for bit.

- **Momentum factor masking** (DGC, section 3.2): where a rank sent an entry,
  its optimizer's momentum there (SGD's momentum buffer, Adam's first moment)
  is zeroed, so the velocity it already sent does not push again later.
- **Vectors travel dense** (biases, normalisation scales), as DGC leaves its
  small layers uncompressed: they are few bytes, and the top 1% of a 128-entry
  bias is 2 entries.
- Not done, measured (docs/BENCHMARKS.md): DGC's sparsity warm-up (denser
  first steps) cost bytes and no accuracy here; local gradient clipping guards
  accumulated raw gradients, while an optimizer's update is already bounded
  (Adam's by about its learning rate per step).

The optimizers' states differ between ranks (each saw its own gradients); a
checkpoint keeps rank 0's, which every rank resumes with, and the error
feedback restarts at zero, as with every codec.
"""

from __future__ import annotations

import torch
from torch import nn

from shoal.compress import NoCompression, TopK
from shoal.metrics import CommCounter
from shoal.strategies.collectives import average

MOMENTA = ("momentum_buffer", "exp_avg")
"""Optimizer state that momentum factor masking zeroes (torch's SGD; Adam, AdamW)."""


class SparseUpdates:
    """Each rank's optimizer update, top-k with error feedback, averaged over the ranks.

    Call :meth:`keep` before the optimizer's step and :meth:`exchange` after it.
    """

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, codec: TopK, comm: CommCounter
    ) -> None:
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.optimizer = optimizer
        self.codec = codec
        self.dense = NoCompression()
        self.comm = comm
        self.before = [torch.empty_like(p) for _, p in self.params]

    @torch.no_grad()
    def keep(self) -> None:
        """Remember the parameters as they are before this rank's optimizer step."""
        for kept, (_, p) in zip(self.before, self.params):
            kept.copy_(p)

    @torch.no_grad()
    def exchange(self, world_size: int, group: object = None) -> None:
        """Replace this rank's step by the mean of every rank's compressed step."""
        for kept, (_, p) in zip(self.before, self.params):
            p.sub_(kept)  # the parameter holds its own update for a moment
        matrices = [i for i, (_, p) in enumerate(self.params) if p.dim() > 1]
        vectors = [i for i, (_, p) in enumerate(self.params) if p.dim() <= 1]
        means: dict[int, torch.Tensor] = {}
        for which, codec in ((matrices, self.codec), (vectors, self.dense)):
            items = [self.params[i] for i in which]
            means.update(zip(which, average(items, codec, world_size, self.comm, group)))
        for i, (kept, (_, p)) in enumerate(zip(self.before, self.params)):
            p.copy_(kept).add_(means[i].reshape(p.shape))
        self._mask(matrices)

    def _mask(self, matrices: list[int]) -> None:
        """Momentum factor masking: no momentum left where this rank's update was sent."""
        for i in matrices:
            name, p = self.params[i]
            sent = self.codec.kept.pop(name, None)
            state = self.optimizer.state.get(p, {})
            for key in MOMENTA:
                buffer = state.get(key)
                if sent is not None and isinstance(buffer, torch.Tensor):
                    buffer.view(-1)[sent] = 0
