"""Split learning in one process against the one model on the joined table."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from shoal.strategies.vertical.split import Bottom, Pooled, Top, hetero_lr, split_mlp, two_tower

pytestmark = pytest.mark.timeout(60)


def joined_table(n: int, widths: list[int], classes: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, sum(widths), generator=gen)
    w = torch.randn(sum(widths), max(classes, 1), generator=gen)
    logits = x @ w
    y = logits.argmax(1) if classes > 1 else (logits[:, 0] > 0).float().unsqueeze(1)
    columns, at = [], 0
    for width in widths:  # party p holds a contiguous block here, scattered below
        columns.append(list(range(at, at + width)))
        at += width
    perm = torch.randperm(at, generator=gen).tolist()  # the joined table's column order
    columns = [[perm.index(c) for c in cols] for cols in columns]
    return x[:, torch.argsort(torch.tensor(perm))], y, columns


def train_both(bottoms, top, x, y, columns, loss, make_opt, steps=60, batch=32):
    pooled = Pooled(copy.deepcopy(bottoms), copy.deepcopy(top), columns)
    pooled_opt = make_opt(pooled.parameters())
    parties = [Bottom(b, make_opt(b.parameters())) for b in bottoms]
    head = Top(top, make_opt(top.parameters()), loss)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        rows = torch.randperm(len(x), generator=gen)[:batch]
        xb, yb = x[rows], y[rows]
        # split: each party sees only its columns; only outputs and gradients cross
        outputs = [p.forward(xb[:, c]) for p, c in zip(parties, columns)]
        _, grads = head.step(outputs, yb)
        for p, g in zip(parties, grads):
            p.backward(g)
        # pooled: one model, one optimizer, the joined table
        pooled_opt.zero_grad()
        loss(pooled(xb), yb).backward()
        pooled_opt.step()
    return pooled, parties, head


def max_diff(pooled: Pooled, parties: list[Bottom], head: Top) -> float:
    split = [*(p.module for p in parties), head.module]
    ref = [*pooled.bottoms, pooled.top]
    return max(
        (a - b).abs().max().item()
        for m, r in zip(split, ref)
        for a, b in zip(m.parameters(), r.parameters())
    )


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_an_mlp_split_between_two_parties_ends_at_the_pooled_parameters(optimizer):
    torch.manual_seed(0)
    x, y, columns = joined_table(400, [7, 5], classes=3)
    bottoms, top = split_mlp([7, 5], hidden=16, outputs=3, top_hidden=8)
    make = (lambda p: torch.optim.SGD(p, lr=0.1)) if optimizer == "sgd" else (
        lambda p: torch.optim.Adam(p, lr=0.01))  # fmt: skip
    start = copy.deepcopy(bottoms)
    loss = nn.functional.cross_entropy
    pooled, parties, head = train_both(bottoms, top, x, y, columns, loss, make)
    assert max_diff(pooled, parties, head) < 1e-5
    for party, before in zip(parties, start):  # (and training moved every bottom)
        assert (party.module[0].weight - before[0].weight).abs().max() > 1e-3


def test_logistic_regression_split_three_ways_ends_at_the_pooled_parameters():
    torch.manual_seed(1)
    x, y, columns = joined_table(500, [4, 6, 3], classes=1)
    bottoms, top = hetero_lr([4, 6, 3])
    start = [copy.deepcopy(b) for b in bottoms]
    pooled, parties, head = train_both(
        bottoms, top, x, y, columns, nn.functional.binary_cross_entropy_with_logits,
        lambda p: torch.optim.SGD(p, lr=0.5), steps=100,
    )  # fmt: skip
    assert max_diff(pooled, parties, head) < 1e-5
    assert all((p.module.weight - s.weight).abs().max() > 1e-3 for p, s in zip(parties, start))
    with torch.no_grad():
        accuracy = ((pooled(x) > 0).float() == y).float().mean()
    assert accuracy > 0.9  # it learned: the labels are a linear function of all columns


def test_a_gradient_of_the_wrong_shape_is_refused():
    bottom = Bottom(nn.Linear(3, 2), torch.optim.SGD(nn.Linear(3, 2).parameters(), lr=0.1))
    bottom.forward(torch.randn(4, 3))
    with pytest.raises(ValueError):
        bottom.backward(torch.randn(4, 3))


@pytest.mark.parametrize("top", ["dot", "mlp"])
def test_the_two_tower_recommender_split_ends_at_the_pooled_parameters(top):
    torch.manual_seed(2)
    x, _, columns = joined_table(300, [6, 4], classes=1)
    clicks = ((x[:, columns[0][:3]].sum(1) * x[:, columns[1][:2]].sum(1)) > 0).float()
    bottoms, head = two_tower(6, 4, dim=5, hidden=12, top=top)
    pooled, parties, split_top = train_both(
        bottoms, head, x, clicks.unsqueeze(1), columns,
        nn.functional.binary_cross_entropy_with_logits,
        lambda p: torch.optim.Adam(p, lr=0.01), steps=80,
    )  # fmt: skip
    assert max_diff(pooled, parties, split_top) < 1e-5


def test_noise_is_added_to_what_crosses_and_only_there():
    """A bottom's noisy output and the top's noisy gradients differ from the exact ones
    by draws of the asked deviation; backward at the party runs on its exact output."""
    torch.manual_seed(4)
    module = nn.Linear(5, 3)
    exact = Bottom(copy.deepcopy(module), torch.optim.SGD(module.parameters(), lr=0.0))
    noisy = Bottom(module, torch.optim.SGD(module.parameters(), lr=0.0), noise=0.5,
                   generator=torch.Generator().manual_seed(0))  # fmt: skip
    x = torch.randn(4000, 5)
    diff = noisy.forward(x) - exact.forward(x)
    assert abs(diff.std().item() - 0.5) < 0.02 and abs(diff.mean().item()) < 0.02
    assert torch.equal(noisy.out, exact.out)  # what backward uses is exact
    head = nn.Linear(3, 2)
    loss = nn.functional.cross_entropy
    y = torch.randint(0, 2, (4000,))
    plain = Top(copy.deepcopy(head), torch.optim.SGD(head.parameters(), lr=0.0), loss)
    top = Top(head, torch.optim.SGD(head.parameters(), lr=0.0), loss, noise=40.0,
              generator=torch.Generator().manual_seed(1))  # fmt: skip
    out = exact.forward(x)
    (g_plain,), (g_noisy,) = plain.step([out], y)[1], top.step([out], y)[1]
    assert abs((g_noisy - g_plain).std().item() - 40.0 / 4000) < 0.001  # per sample: 40


def test_a_stashed_forward_is_the_plain_one_and_staleness_one_still_learns():
    """forward_ahead/backward_ahead with nothing in between is forward/backward exactly;
    with one batch in flight (the optimizer steps on batch t while batch t+1's output is
    out) training still reaches the pooled model's loss, on other parameters."""
    torch.manual_seed(5)
    x, y, columns = joined_table(400, [7, 5], classes=3)
    loss = nn.functional.cross_entropy
    bottoms, _ = split_mlp([7, 5], hidden=16, outputs=3)
    twins = copy.deepcopy(bottoms)
    plain = Bottom(twins[0], torch.optim.SGD(twins[0].parameters(), lr=0.1))
    ahead = Bottom(bottoms[0], torch.optim.SGD(bottoms[0].parameters(), lr=0.1))
    for _ in range(3):
        out, stash = ahead.forward_ahead(x[:32, columns[0]])
        assert torch.equal(out, plain.forward(x[:32, columns[0]]))
        g = torch.randn_like(out)
        ahead.backward_ahead(stash, g)
        plain.backward(g)
    assert all(torch.equal(a, b) for a, b in zip(twins[0].parameters(), bottoms[0].parameters()))

    def run(staleness: int) -> tuple[float, list[torch.Tensor]]:
        torch.manual_seed(6)
        bs, head = split_mlp([7, 5], hidden=16, outputs=3)
        parties = [Bottom(b, torch.optim.SGD(b.parameters(), lr=0.1)) for b in bs]
        t = Top(head, torch.optim.SGD(head.parameters(), lr=0.1), loss)
        gen = torch.Generator().manual_seed(1)
        batches = [torch.randperm(400, generator=gen)[:32] for _ in range(300)]
        inflight = None
        for rows in [*batches, None]:
            sent = None
            if rows is not None:
                outs = [p.forward_ahead(x[rows][:, c]) for p, c in zip(parties, columns)]
                sent = (outs, y[rows])
            if staleness == 0 and sent is not None:
                inflight, sent = sent, None
            if inflight is not None:
                (outs, labels) = inflight
                _, grads = t.step([o for o, _ in outs], labels)
                for p, (_, stash), g in zip(parties, outs, grads):
                    p.backward_ahead(stash, g)
            inflight = sent
        with torch.no_grad():
            full = loss(Pooled(bs, head, columns)(x), y).item()
        return full, [p.detach().clone() for b in bs for p in b.parameters()]

    exact_loss, exact = run(0)
    stale_loss, stale = run(1)
    assert max((a - b).abs().max().item() for a, b in zip(exact, stale)) > 1e-4  # not the same
    assert stale_loss < 1.2 * exact_loss + 0.02, (stale_loss, exact_loss)
    assert stale_loss < 0.5  # (from ~1.1 at the start)
