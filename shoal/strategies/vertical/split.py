"""Split learning: each party's bottom model over its own columns, the label party's top.

A party's :class:`Bottom` turns its columns of a batch into an output (what it
sends); the label party's :class:`Top` joins every party's output, computes the
loss against its labels, steps, and returns to each party the gradient of the
loss with respect to that party's output; the party then finishes backward
through its bottom and steps its own optimizer. Only outputs and their
gradients leave a party. The arithmetic is the one model's: :class:`Pooled`
wraps the same bottoms and top as one module over the joined table, and split
training ends at its parameters (tests/test_vertical_split.py).

Built-in shapes: :func:`split_mlp` (a hidden layer per party, an MLP on top)
and :func:`hetero_lr` (linear and logistic regression as FATE's hetero-LR:
each bottom a linear map to one logit part, the top their sum plus a bias).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Bottom:
    """One party's bottom model and its own optimizer."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.module, self.optimizer = module, optimizer
        self.out: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """This party's output for its columns of a batch (detached: what it sends)."""
        self.out = self.module(x)
        return self.out.detach()

    def backward(self, grad: torch.Tensor) -> None:
        """Finish backward with the gradient the label party returned, and step."""
        if self.out is None or grad.shape != self.out.shape:
            raise ValueError("a gradient for no output, or of another shape than it")
        self.optimizer.zero_grad(set_to_none=True)
        self.out.backward(grad)
        self.out = None
        self.optimizer.step()


class Top:
    """The label party's top model, loss and optimizer."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, loss: LossFn) -> None:
        self.module, self.optimizer, self.loss = module, optimizer, loss

    def step(
        self, outputs: Sequence[torch.Tensor], labels: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Loss of the batch from every party's output (in party order); steps the top
        and returns, per party, the gradient of the loss with respect to its output."""
        parts = [o.detach().requires_grad_() for o in outputs]
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(self.module(torch.cat(parts, 1)), labels)
        loss.backward()
        self.optimizer.step()
        return loss.detach(), [p.grad for p in parts]  # type: ignore[misc]


class Pooled(nn.Module):
    """The same bottoms and top as one model over the joined table (the reference):
    ``columns[p]`` are party ``p``'s column positions in the joined table."""

    def __init__(
        self, bottoms: Sequence[nn.Module], top: nn.Module, columns: Sequence[Sequence[int]]
    ) -> None:
        super().__init__()
        self.bottoms = nn.ModuleList(bottoms)
        self.top = top
        self.columns = [torch.as_tensor(list(c), dtype=torch.long) for c in columns]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [b(x.index_select(1, c)) for b, c in zip(self.bottoms, self.columns)]
        return self.top(torch.cat(parts, 1))


class SumTop(nn.Module):
    """The top of hetero-LR: the sum of the parties' logit parts, plus a bias."""

    def __init__(self, outputs: int = 1) -> None:
        super().__init__()
        self.outputs = outputs
        self.bias = nn.Parameter(torch.zeros(outputs))

    def forward(self, parts: torch.Tensor) -> torch.Tensor:
        return parts.view(len(parts), -1, self.outputs).sum(1) + self.bias


def hetero_lr(widths: Sequence[int], outputs: int = 1) -> tuple[list[nn.Module], nn.Module]:
    """Linear (or logistic) regression split by columns: party ``p`` holds
    ``widths[p]`` columns and a linear map of them, the top adds the parts and a bias."""
    bottoms: list[nn.Module] = [nn.Linear(w, outputs, bias=False) for w in widths]
    return bottoms, SumTop(outputs)


def split_mlp(
    widths: Sequence[int], hidden: int, outputs: int, top_hidden: int = 0
) -> tuple[list[nn.Module], nn.Module]:
    """A ReLU layer of ``hidden`` units per party over its columns; on top, an optional
    ReLU layer of ``top_hidden`` and a linear map to ``outputs``."""
    bottoms: list[nn.Module] = [nn.Sequential(nn.Linear(w, hidden), nn.ReLU()) for w in widths]
    joined = hidden * len(widths)
    if top_hidden:
        top: nn.Module = nn.Sequential(
            nn.Linear(joined, top_hidden), nn.ReLU(), nn.Linear(top_hidden, outputs)
        )
    else:
        top = nn.Linear(joined, outputs)
    return bottoms, top
