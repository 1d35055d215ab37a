"""The global-batch sampler and the epoch order: worker-count independence, exact
resume, sample digests."""

from __future__ import annotations

import numpy as np
import pytest

from shoal.data import GlobalBatchSampler, split_sizes
from shoal.data.order import FeistelPermutation, Order, digest, range_digest


def global_steps(num_samples, batch, world, steps, drop_last=False):
    """Per step, the union of every rank's indices (sorted), for ``world`` ranks."""
    samplers = [
        GlobalBatchSampler(num_samples, batch, r, world, seed=5, drop_last=drop_last)
        for r in range(world)
    ]
    out = []
    for _ in range(steps):
        parts = [s.next_batch() for s in samplers]
        assert len({g for _, g in parts}) == 1
        out.append(np.sort(np.concatenate([idx for idx, _ in parts])))
    return out


@pytest.mark.parametrize("world", [2, 3, 4, 7])
def test_step_contents_do_not_depend_on_world_size(world):
    ref = global_steps(103, 10, 1, 25)
    got = global_steps(103, 10, world, 25)
    for a, b in zip(ref, got):
        np.testing.assert_array_equal(a, b)


def test_epoch_covers_every_sample_once_with_uneven_last_batch():
    steps = global_steps(103, 10, 3, 11)
    first_epoch = np.concatenate(steps[:11])
    assert sorted(first_epoch.tolist()) == list(range(103))
    assert len(steps[10]) == 3  # the last, smaller global batch


def test_drop_last():
    s = GlobalBatchSampler(103, 10, drop_last=True)
    assert s.steps_per_epoch == 10
    steps = global_steps(103, 10, 2, 10, drop_last=True)
    assert all(len(x) == 10 for x in steps)


def test_epochs_use_different_orders():
    s = GlobalBatchSampler(50, 10)
    a, b = s.permutation(0), s.permutation(1)
    assert sorted(a) == sorted(b) == list(range(50)) and not np.array_equal(a, b)
    assert not np.array_equal(a, np.arange(50))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64, 65, 1000, 4099])
def test_feistel_permutation_is_a_bijection(n):
    for key in (0, 1, 2**63 + 5):
        rows = FeistelPermutation(n, key)(np.arange(n))
        assert sorted(rows.tolist()) == list(range(n))


def test_a_small_epoch_computed_whole_is_the_same_order(monkeypatch):
    """Up to TABLE_ROWS rows an epoch's order is one table; above, computed per step:
    both give every position the same row (a run that grows past the limit, or a
    checkpoint taken by a process on the other side of it, keeps its order)."""
    import shoal.data.order as order_mod

    n, positions = 5000, np.arange(4999, -1, -7)
    whole = Order(n, seed=9)
    assert whole.rows(2, np.arange(n)) is not None and whole._table is not None
    monkeypatch.setattr(order_mod, "TABLE_ROWS", 10)
    per_step = Order(n, seed=9)
    assert per_step.rows(2, positions) is not None and per_step._table is None
    np.testing.assert_array_equal(whole.rows(2, positions), per_step.rows(2, positions))
    np.testing.assert_array_equal(whole.rows(3, positions), per_step.rows(3, positions))


def test_full_shuffle_looks_random():
    """Far from the identity and from a shift, and pairs of neighbours scattered."""
    n = 100_000
    perm = Order(n, seed=3).permutation(0)
    assert abs(np.corrcoef(np.arange(n), perm)[0, 1]) < 0.02
    gaps = np.abs(np.diff(perm))
    assert np.median(gaps) > n / 5  # neighbours land far apart, like a uniform permutation
    assert (perm[:1000] < n // 2).mean() == pytest.approx(0.5, abs=0.06)


@pytest.mark.parametrize("window", [1, 3, 16])
def test_block_shuffle_keeps_locality_and_covers_every_row(window):
    sizes = [100] * 10 + [37, 5, 250]
    n = sum(sizes)
    order = Order(n, seed=1, mode="block", blocks=sizes, window=window)
    perm = order.permutation(4)
    assert sorted(perm.tolist()) == list(range(n))
    starts = np.cumsum([0, *sizes])
    block_of = np.searchsorted(starts, perm, side="right") - 1
    # the first window's positions come from at most `window` blocks
    first = int(sum(sorted(sizes)[-window:]))
    assert len(set(block_of[: min(first, 100)].tolist())) <= window
    assert not np.array_equal(perm, Order(n, 1, "block", sizes, window).permutation(5))


def test_digest_is_order_independent_and_sees_a_swap():
    ids = np.arange(10_000)
    assert digest(ids) == digest(ids[::-1]) == range_digest(0, 10_000, chunk=999)
    swapped = ids.copy()
    swapped[5] = 7  # one sample twice, one missing: same count, different digest
    assert digest(swapped) != digest(ids)


def test_sampler_digests_add_up_to_the_dataset_over_ranks():
    samplers = [GlobalBatchSampler(103, 10, r, 3, seed=2) for r in range(3)]
    for _ in range(11):
        for s in samplers:
            s.next_batch()
    total = sum(s.digests[0] for s in samplers) % 2**64
    assert total == range_digest(0, 103)
    assert sum(s.samples_seen[0] for s in samplers) == 103


def test_state_dict_rejects_another_order():
    s = GlobalBatchSampler(100, 10)
    block = Order(100, 0, "block", [50, 50])
    with pytest.raises(ValueError, match="order changed"):
        GlobalBatchSampler(100, 10, order=block).load_state_dict(s.state_dict())


def test_split_sizes():
    assert split_sizes(10, 4) == [3, 3, 2, 2]
    assert split_sizes(2, 4) == [1, 1, 0, 0]
    assert sum(split_sizes(97, 8)) == 97


def test_loss_scale_turns_mean_of_ranks_into_global_mean():
    rng = np.random.default_rng(0)
    losses = rng.random(103)
    world = 4
    samplers = [GlobalBatchSampler(103, 10, r, world, seed=1) for r in range(world)]
    for _ in range(11):
        parts = [s.next_batch() for s in samplers]
        global_batch = parts[0][1]
        # gradient averaging divides the sum of per-rank values by world_size
        averaged = (
            sum(losses[idx].sum() * s.loss_scale(g) for s, (idx, g) in zip(samplers, parts)) / world
        )
        union = np.concatenate([idx for idx, _ in parts])
        assert averaged == pytest.approx(losses[union].mean())
        assert len(union) == global_batch


def test_resume_mid_epoch_on_a_different_world_size():
    """4 workers stop mid-epoch, 3 resume: every sample of the epoch exactly once."""
    n, batch = 101, 12
    four = [GlobalBatchSampler(n, batch, r, 4, seed=9) for r in range(4)]
    seen = []
    for _ in range(5):
        for s in four:
            seen.extend(s.next_batch()[0].tolist())
    state = four[0].state_dict()
    three = [GlobalBatchSampler(n, batch, r, 3, seed=9) for r in range(3)]
    for s in three:
        s.load_state_dict(state)
    while three[0].epoch == 0:
        for s in three:
            seen.extend(s.next_batch()[0].tolist())
    assert sorted(seen) == list(range(n))


def test_state_dict_rejects_a_different_dataset():
    s = GlobalBatchSampler(100, 10)
    with pytest.raises(ValueError, match="num_samples"):
        GlobalBatchSampler(99, 10).load_state_dict(s.state_dict())


def test_iterates_as_dataloader_batch_sampler():
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    data = TensorDataset(torch.arange(30))
    sampler = GlobalBatchSampler(30, 8, rank=1, world_size=2, seed=0)
    batches = [b[0].tolist() for b in DataLoader(data, batch_sampler=sampler)]
    assert len(batches) == 4 and sampler.epoch == 1
    assert sum(len(b) for b in batches) == 15


def test_rejects_impossible_sizes():
    with pytest.raises(ValueError):
        GlobalBatchSampler(100, 2, world_size=4)
    with pytest.raises(ValueError):
        GlobalBatchSampler(10, 20)
