"""Top-k of each rank's optimizer update (shoal.strategies.dgc), in one process."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shoal.compress import TopK
from shoal.metrics import CommCounter
from shoal.strategies.dgc import SparseUpdates

pytestmark = pytest.mark.timeout(60)


def model_and_data(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 4))
    return model, torch.randn(64, 20, generator=gen), torch.randint(0, 4, (64,), generator=gen)


def step(model, optimizer, sparse, x, y) -> dict[str, torch.Tensor]:
    """One step; returns the change the optimizer's own step made (before the exchange)."""
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    sparse.keep()
    optimizer.step()
    own = {n: (p - k).detach().clone() for (n, p), k in zip(sparse.params, sparse.before)}
    sparse.exchange(world_size=1)
    return own


def test_what_is_applied_plus_what_is_held_back_is_every_step_the_optimizer_took():
    """Error feedback on updates: after any number of steps, the parameters' total change
    plus the residuals is exactly the sum of the optimizer's own steps (nothing lost);
    vectors (biases) are applied whole, and matrices keep 10% of entries a step."""
    model, x, y = model_and_data()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    codec = TopK(0.1)
    sparse = SparseUpdates(model, optimizer, codec, CommCounter())
    total = {n: torch.zeros_like(p) for n, p in start.items()}
    for _ in range(5):
        for n, d in step(model, optimizer, sparse, x, y).items():
            total[n] += d
    for n, p in model.named_parameters():
        moved = p.detach() - start[n]
        held = codec.residuals.get(n, torch.zeros_like(p))
        if p.dim() == 1:
            assert n not in codec.residuals
            torch.testing.assert_close(moved, total[n], atol=1e-6, rtol=0)
        else:
            assert held.abs().sum() > 0  # something is held back ...
            assert (moved != 0).float().mean() < 0.55  # ... and most entries never moved
            torch.testing.assert_close(moved + held.reshape(p.shape), total[n], atol=1e-6, rtol=0)


@pytest.mark.parametrize("optimizer", ["adam", "momentum"])
def test_momentum_is_masked_where_the_update_was_sent(optimizer):
    model, x, y = model_and_data(1)
    opt = (
        torch.optim.Adam(model.parameters(), lr=0.01)
        if optimizer == "adam"
        else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    )
    key = "exp_avg" if optimizer == "adam" else "momentum_buffer"
    codec = TopK(0.05)
    sparse = SparseUpdates(model, opt, codec, CommCounter())
    for _ in range(3):
        optimizer_step = step(model, opt, sparse, x, y)
        assert optimizer_step  # (the optimizer moved)
        for n, p in model.named_parameters():
            momentum = opt.state[p][key].reshape(-1)
            if p.dim() == 1:
                assert (momentum != 0).all()  # vectors travel whole: nothing to mask
                continue
            sent = codec.residuals[n].reshape(-1) == 0  # sent entries leave no residual
            assert sent.sum() == codec.k(p.numel())
            assert (momentum[sent] == 0).all()
            assert (momentum[~sent] != 0).float().mean() > 0.9


def test_an_uncompressed_exchange_is_the_optimizer_step():
    """At ratio 1 with plain SGD, one rank's exchange applies its optimizer's step as is."""
    model, x, y = model_and_data(2)
    twin, _, _ = model_and_data(2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    plain = torch.optim.SGD(twin.parameters(), lr=0.1)
    sparse = SparseUpdates(model, optimizer, TopK(1.0), CommCounter())
    for _ in range(4):
        step(model, optimizer, sparse, x, y)
        plain.zero_grad()
        nn.functional.cross_entropy(twin(x), y).backward()
        plain.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
