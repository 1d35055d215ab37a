"""The global-batch sampler: worker-count independence and exact resume."""

from __future__ import annotations

import numpy as np
import pytest

from shoal.data import GlobalBatchSampler, split_sizes


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
    s = GlobalBatchSampler(50, 50)
    a, _ = s.next_batch()
    b, _ = s.next_batch()
    assert sorted(a) == sorted(b) and not np.array_equal(a, b)


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
