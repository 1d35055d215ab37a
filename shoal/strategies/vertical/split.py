"""Split learning: each party's bottom model over its own columns, the label party's top.

A party's :class:`Bottom` turns its columns of a batch into an output (what it
sends); the label party's :class:`Top` joins every party's output, computes the
loss against its labels, steps, and returns to each party the gradient of the
loss with respect to that party's output; the party then finishes backward
through its bottom and steps its own optimizer. Only outputs and their
gradients leave a party. The arithmetic is the one model's: :class:`Pooled`
wraps the same bottoms and top as one module over the joined table, and split
training ends at its parameters (tests/test_vertical_split.py).

Built-in shapes: :func:`split_mlp` (a hidden layer per party, an MLP on top),
:func:`hetero_lr` (linear and logistic regression as FATE's hetero-LR: each
bottom a linear map to one logit part, the top their sum plus a bias) and
:func:`two_tower` (a recommender's user and item towers, a dot product or an
MLP on top).

Protection of what crosses (``noise``): a bottom may add Gaussian noise of a
given standard deviation to the output it sends, and the top to each gradient
it returns (per sample, on the gradient of that sample's own loss); the noise is
drawn from the party's own generator and never leaves it, so the receiver cannot
subtract it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Stash = tuple[torch.Tensor, dict[str, torch.Tensor]]
Reduce = Callable[[list[torch.Tensor]], None]
"""Sums gradients in place over a party's processes (a data-parallel party)."""


def _noisy(t: torch.Tensor, std: float, generator: torch.Generator | None) -> torch.Tensor:
    if std <= 0:
        return t
    return t + std * torch.randn(t.shape, generator=generator, dtype=t.dtype)


class Bottom:
    """One party's bottom model and its own optimizer; ``noise``: the standard deviation
    of the Gaussian noise added to every output it sends."""

    def __init__(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        noise: float = 0.0,
        generator: torch.Generator | None = None,
        reduce: Reduce | None = None,
    ) -> None:
        self.module, self.optimizer = module, optimizer
        self.noise, self.generator = noise, generator
        self.reduce = reduce
        """Sums the gradients over the party's processes before each step (if several)."""
        self.out: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """This party's output for its columns of a batch (detached, noise added: what it
        sends). Backward runs through the output as computed, as if the noise were a
        constant the party added."""
        self.out = self.module(x)
        return _noisy(self.out.detach(), self.noise, self.generator)

    def backward(self, grad: torch.Tensor) -> None:
        """Finish backward with the gradient the label party returned, and step."""
        if self.out is None or grad.shape != self.out.shape:
            raise ValueError("a gradient for no output, or of another shape than it")
        self.optimizer.zero_grad(set_to_none=True)
        self.out.backward(grad)
        self.out = None
        self._step()

    def _step(self) -> None:
        if self.reduce is not None:
            self.reduce([p.grad for _, p in self._params()])  # type: ignore[misc]
        self.optimizer.step()

    def forward_ahead(self, x: torch.Tensor) -> tuple[torch.Tensor, Stash]:
        """The output for a batch computed on a copy of the parameters as they are now
        (what to send, and what :meth:`backward_ahead` needs), so that the optimizer may
        step on an earlier batch's gradient before this batch's comes back (pipelining
        with staleness 1; PipeDream's weight stashing)."""
        params = {n: p.detach().clone().requires_grad_() for n, p in self._params()}
        out = torch.func.functional_call(self.module, params, (x,))
        return _noisy(out.detach(), self.noise, self.generator), (out, params)

    def backward_ahead(self, stash: Stash, grad: torch.Tensor) -> None:
        """Step on the gradient of a batch sent by :meth:`forward_ahead`: the gradient
        with respect to the parameters it was computed with, applied to the current ones."""
        out, params = stash
        if grad.shape != out.shape:
            raise ValueError("a gradient of another shape than its output")
        grads = torch.autograd.grad(out, list(params.values()), grad)
        self.optimizer.zero_grad(set_to_none=True)
        for (_, p), g in zip(self._params(), grads):
            p.grad = g
        self._step()

    def _params(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]


class Top:
    """The label party's top model, loss and optimizer; ``noise``: the standard deviation
    of the Gaussian noise on every sample's gradient of its own loss (the batch's loss
    is their mean, so a returned gradient of B samples gets ``noise / B``), on the same
    scale as a bottom's ``noise`` relative to its output."""

    def __init__(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss: LossFn,
        noise: float = 0.0,
        generator: torch.Generator | None = None,
        reduce: Reduce | None = None,
    ) -> None:
        self.module, self.optimizer, self.loss = module, optimizer, loss
        self.noise, self.generator = noise, generator
        self.reduce = reduce
        """Sums the top's gradients over the label party's processes (if several)."""

    def step(
        self, outputs: Sequence[torch.Tensor], labels: torch.Tensor, batch: int = 0
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Loss of the batch from every party's output (in party order); steps the top
        and returns, per party, the gradient of the loss with respect to its output.
        ``batch``: the whole batch's samples where these are a slice of it (a
        data-parallel label party): the loss is then the slice's share of the batch's
        mean, and the slices' gradients, summed, are the batch's."""
        parts = [o.detach().requires_grad_() for o in outputs]
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(self.module(torch.cat(parts, 1)), labels)
        batch = batch or len(labels)
        if batch != len(labels):
            loss = loss * (len(labels) / batch)
        loss.backward()
        if self.reduce is not None:
            self.reduce([p.grad for p in self.module.parameters()])  # type: ignore[misc]
        self.optimizer.step()
        # noise on each sample's gradient of its own loss: the loss is their mean
        std = self.noise / max(1, batch)
        grads = [_noisy(p.grad, std, self.generator) for p in parts]  # type: ignore[arg-type]
        return loss.detach(), grads


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


class DotTop(nn.Module):
    """The top of a two-tower recommender: the dot product of the user and item
    embeddings (the two halves of its input), plus a bias: one logit."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, parts: torch.Tensor) -> torch.Tensor:
        user, item = parts.chunk(2, dim=1)
        return (user * item).sum(1, keepdim=True) + self.bias


def tower(width: int, hidden: int, dim: int) -> nn.Module:
    """A two-tower recommender's tower: ``hidden`` ReLU units, then an embedding of ``dim``."""
    return nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, dim))


def two_tower(
    user_width: int, item_width: int, dim: int = 16, hidden: int = 64, top: str = "dot"
) -> tuple[list[nn.Module], nn.Module]:
    """A user tower over the user party's columns and an item tower over the item
    party's (each ``hidden`` ReLU units, then an embedding of ``dim``), and on top
    their dot product (``top="dot"``) or an MLP over both (``"mlp"``): one logit."""
    if top not in ("dot", "mlp"):
        raise ValueError(f"two_tower: top must be dot or mlp, not {top!r}")
    kind = "two-tower" if top == "dot" else "two-tower-mlp"
    return [tower(user_width, hidden, dim), tower(item_width, hidden, dim)], build_top(
        kind, 2, 1, hidden, dim
    )


KINDS = ("two-tower", "two-tower-mlp", "mlp", "linear")
"""The split models ``shoal train --strategy vertical`` builds (``--split-model``)."""


def build_bottom(kind: str, width: int, outputs: int, hidden: int, dim: int) -> nn.Module:
    """One party's bottom model of a ``kind`` split model, over its ``width`` columns."""
    if kind in ("two-tower", "two-tower-mlp"):
        return tower(width, hidden, dim)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(width, hidden), nn.ReLU())
    if kind == "linear":
        return nn.Linear(width, outputs, bias=False)
    raise ValueError(f"unknown split model {kind!r}")


def build_top(kind: str, parts: int, outputs: int, hidden: int, dim: int) -> nn.Module:
    """The label party's top model of a ``kind`` split model over ``parts`` bottoms."""
    if kind == "two-tower":
        return DotTop()
    if kind == "two-tower-mlp":
        return nn.Sequential(nn.Linear(parts * dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(parts * hidden, hidden), nn.ReLU(), nn.Linear(hidden, outputs)
        )
    if kind == "linear":
        return SumTop(outputs)
    raise ValueError(f"unknown split model {kind!r}")
