"""Vertical training between two real processes over the authenticated wire: PSI
finds the common ids, split training ends at the pooled model's parameters."""

from __future__ import annotations

import multiprocessing as mp

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("private_set_intersection.python")

from shoal.strategies.vertical.label import LabelParty
from shoal.strategies.vertical.link import Party
from shoal.strategies.vertical.order import batch_rows, rows_of
from shoal.strategies.vertical.split import Bottom, Pooled, Top, split_mlp

pytestmark = pytest.mark.timeout(120)
SECRET = b"v" * 32
WIDTHS, HIDDEN, CLASSES = [5, 7], 8, 3
STEPS, BATCH, SEED = 40, 32, 7
AHEAD_STEPS = 200  # (the one-batch-ahead run: long enough to see it learn)


def world(n: int = 600):
    """A joined table of ``n`` customers; each party holds 70% of them (30% of its ids
    absent at the other), in its own row order, with its own columns."""
    rng = np.random.default_rng(0)
    ids = rng.choice(10**12, n, replace=False).astype(np.int64)
    x = torch.from_numpy(rng.standard_normal((n, sum(WIDTHS))).astype(np.float32))
    y = x @ torch.from_numpy(rng.standard_normal((sum(WIDTHS), CLASSES)).astype(np.float32))
    y = y.argmax(1)
    holds = [rng.permutation(n)[: int(0.7 * n)] for _ in WIDTHS]  # rows each party has
    cols = [slice(0, WIDTHS[0]), slice(WIDTHS[0], sum(WIDTHS))]
    return ids, x, y, holds, cols


def models():
    torch.manual_seed(3)
    return split_mlp(WIDTHS, HIDDEN, CLASSES, top_hidden=6)


def sgd(params):
    return torch.optim.SGD(params, lr=0.2)


def pooled_losses(ids, x, y, common, pooled: Pooled | None = None, steps: int = STEPS):
    """Train the one model on the joined table of the common ids, as the parties do;
    each step's loss."""
    pooled = pooled or Pooled(*models(), [range(5), range(5, 12)])
    opt = sgd(pooled.parameters())
    rows = torch.from_numpy(rows_of(ids, common))
    xj, yj, losses = x[rows], y[rows], []
    for step in range(steps):
        b = torch.from_numpy(batch_rows(len(common), step, BATCH, SEED))
        opt.zero_grad()
        loss = nn.functional.cross_entropy(pooled(xj[b]), yj[b])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _label(port_q: mp.Queue, out: mp.Queue) -> None:
    ids, x, y, holds, cols = world()
    bottoms, top = models()
    mine = holds[0]
    label = LabelParty(
        SECRET, ["b"], ids[mine], Top(top, sgd(top.parameters()), nn.functional.cross_entropy),
        Bottom(bottoms[0], sgd(bottoms[0].parameters())),
    )  # fmt: skip
    port_q.put(label.address)
    common = label.align(y[mine], x[mine][:, cols[0]])
    label.train(STEPS, BATCH, SEED)
    params = [p.detach().numpy().copy() for p in [*bottoms[0].parameters(), *top.parameters()]]
    out.put(("label", common, params, label.comm["b"].sent, label.comm["b"].received))
    out.put(("losses", list(label.losses)))
    label.close()


def _party(address: str, out: mp.Queue, staleness: int = 0) -> None:
    ids, x, _, holds, cols = world()
    bottoms, _ = models()
    mine = holds[1]
    party = Party(SECRET, "b", address, ids[mine], Bottom(bottoms[1], sgd(bottoms[1].parameters())))
    common = party.align("psi")
    party.train(x[mine][:, cols[1]], STEPS, BATCH, SEED, staleness)
    params = [p.detach().numpy().copy() for p in bottoms[1].parameters()]
    out.put(("b", common, params, party.comm.sent, party.comm.received))
    party.close()


def test_two_parties_align_by_psi_and_train_to_the_pooled_parameters():
    ctx = mp.get_context("spawn")
    port_q, out = ctx.Queue(), ctx.Queue()
    label = ctx.Process(target=_label, args=(port_q, out))
    label.start()
    party = ctx.Process(target=_party, args=(port_q.get(timeout=60), out))
    party.start()
    got = {r[0]: r[1:] for r in (out.get(timeout=100) for _ in range(3))}
    for proc in (label, party):
        proc.join(timeout=20)
        assert proc.exitcode == 0

    ids, x, y, holds, _ = world()
    expected = np.sort(np.intersect1d(ids[holds[0]], ids[holds[1]]))
    assert np.array_equal(got["label"][0], expected) and np.array_equal(got["b"][0], expected)

    # the reference: one model on the joined table of the common ids, same batches
    pooled = Pooled(*models(), [range(5), range(5, 12)])
    pooled_losses(ids, x, y, expected, pooled)
    ref_label = [*pooled.bottoms[0].parameters(), *pooled.top.parameters()]
    ref_b = list(pooled.bottoms[1].parameters())
    for got_params, ref in ((got["label"][1], ref_label), (got["b"][1], ref_b)):
        for a, r in zip(got_params, ref):
            assert np.abs(a - r.detach().numpy()).max() < 1e-5
    before = list(models()[0][1].parameters())
    assert np.abs(got["b"][1][0] - before[0].detach().numpy()).max() > 1e-3  # it trained

    # what crossed: the party's outputs and the gradients back, counted on both sides
    _, _, sent_b, received_b = got["b"]
    _, _, sent_l, received_l = got["label"]
    messages = STEPS + 4  # hello, three of PSI, a forward a step (and the replies)
    assert received_b == sent_l  # the same bytes, seen from both ends ...
    assert 0 < received_l - sent_b <= 8 * messages  # ... (+ the router's peer identity)
    payload = sum(len(batch_rows(len(expected), s, BATCH, SEED)) for s in range(STEPS)) * HIDDEN * 4
    assert payload < received_l < payload + 200 * STEPS + 200_000  # + headers and the PSI


def _label_exact(port_q: mp.Queue, out: mp.Queue) -> None:
    ids, x, y, _, cols = world(100)
    bottoms, top = models()
    label = LabelParty(
        SECRET, ["b"], ids, Top(top, sgd(top.parameters()), nn.functional.cross_entropy),
        Bottom(bottoms[0], sgd(bottoms[0].parameters())), align="exact",
    )  # fmt: skip
    port_q.put(label.address)
    label.align(y, x[:, cols[0]])
    label.train(AHEAD_STEPS, BATCH, SEED)
    out.put(list(label.losses))
    label.close()


def test_the_label_party_refuses_strangers_and_bad_outputs_and_goes_on():
    """A peer without the secret is refused at the door; one with it but not a party of
    the job is refused; a party's output of the wrong shape or type is refused with an
    error; the job then trains as if nothing happened, here with the party one batch
    ahead (staleness 1: step t+1's output sent before step t's gradient is back), which
    learns as fast as the exact job."""
    from shoal.errors import PeerRejected
    from shoal.net.peer import PeerError, PeerTimeout

    ctx = mp.get_context("spawn")
    port_q, out = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_label_exact, args=(port_q, out))
    proc.start()
    address = port_q.get(timeout=60)
    ids, x, _, _, cols = world(100)
    bottoms, _ = models()
    with pytest.raises((PeerRejected, PeerTimeout)):
        Party(b"w" * 32, "b", address, ids, Bottom(bottoms[1], sgd(bottoms[1].parameters())),
              timeout_s=3)  # fmt: skip
    other = nn.Linear(7, HIDDEN)
    with pytest.raises(PeerError, match="no party"):  # (at its first request: hello)
        Party(SECRET, "mallory", address, ids, Bottom(other, sgd(other.parameters())))
    party = Party(SECRET, "b", address, ids, Bottom(bottoms[1], sgd(bottoms[1].parameters())))
    with pytest.raises(PeerError, match="before the ids are aligned"):  # out of order
        party.peer.call({"op": "forward", "step": 0}, [torch.zeros(BATCH, HIDDEN)])
    with pytest.raises(PeerError, match="before psi-setup"):
        party.peer.call({"op": "psi-answer"}, [torch.zeros(4, dtype=torch.uint8)])
    party.align("exact")
    with pytest.raises(PeerError, match="not an output"):
        party.peer.call({"op": "forward", "step": 0}, [torch.zeros(3, HIDDEN)])
    with pytest.raises(PeerError, match="not an output"):
        wrong_type = torch.zeros(BATCH, HIDDEN, dtype=torch.float64)
        party.peer.call({"op": "forward", "step": 0}, [wrong_type])
    party.train(x[:, cols[1]], AHEAD_STEPS, BATCH, SEED, staleness=1)
    losses = out.get(timeout=60)
    party.close()
    proc.join(timeout=20)
    assert proc.exitcode == 0
    assert len(losses) == AHEAD_STEPS
    y = world(100)[2]
    exact = pooled_losses(ids, x, y, np.sort(ids), steps=AHEAD_STEPS)  # without staleness
    first, last, last_exact = (np.mean(v) for v in (losses[:20], losses[-20:], exact[-20:]))
    assert last < first - 0.2, (first, last)  # it learns ...
    assert abs(last - last_exact) < 0.1, (last, last_exact)  # ... about as fast


def test_a_party_run_with_other_flags_is_refused_by_both_sides():
    """One ``shoal train --party`` per machine may be given other flags: the party that
    differs is told what differs, and the label party stops with the same line."""
    import threading

    from shoal.errors import UserError
    from shoal.net.peer import PeerError

    ids, _, _, _, _ = world(100)
    bottoms, top = models()
    label = LabelParty(
        SECRET, ["b"], ids, Top(top, sgd(top.parameters()), nn.functional.cross_entropy)
    )
    label.plan_check = {"batch_size": 64, "seed": 7}
    said: list[BaseException] = []

    def serve() -> None:
        try:
            label.agree([])
        except UserError as e:
            said.append(e)

    thread = threading.Thread(target=serve)
    thread.start()
    party = Party(SECRET, "b", label.address, ids, Bottom(bottoms[1], sgd(bottoms[1].parameters())))
    with pytest.raises(
        PeerError, match="runs another job: its batch_size is 32, the label party's 64"
    ):
        party.agree([], {"batch_size": 32, "seed": 7})
    thread.join(timeout=10)
    party.close()
    label.close()
    assert said and "its batch_size is 32" in str(said[0])
