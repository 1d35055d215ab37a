"""Label differential privacy by randomized response (shoal.privacy): the attacker who
sees the noisy labels does no better than the mechanism's bound."""

from __future__ import annotations

import math

import numpy as np
import pytest

from shoal.privacy import keep_probability, randomized_response

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("classes, epsilon", [(2, 1.0), (10, 2.0), (10, 0.5)])
def test_the_output_distribution_is_the_mechanism_s(classes, epsilon):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, classes, 200_000)
    noisy = randomized_response(labels, classes, epsilon, rng)
    keep = keep_probability(epsilon, classes)
    assert abs((noisy == labels).mean() - keep) < 0.005
    wrong = noisy[noisy != labels] - labels[noisy != labels]
    counts = np.bincount(wrong % classes, minlength=classes)[1:]  # uniform over the others
    assert counts.min() / counts.max() > 0.9
    # epsilon-DP: P(out | true a) / P(out | true b) is keep / ((1 - keep) / (k - 1))
    assert keep / ((1 - keep) / (classes - 1)) == pytest.approx(math.exp(epsilon))


@pytest.mark.parametrize("epsilon, skewed", [(1.0, False), (0.05, True)])
def test_an_attacker_guessing_true_labels_is_held_to_the_bound(epsilon, skewed):
    """The attacker knows the mechanism and the prior and sees every sample's noisy label;
    it guesses the true one Bayes-optimally (for each value seen, the label most likely
    to have produced it). epsilon-DP holds its success to at most e^epsilon times that of
    the best guess made without seeing anything."""
    rng = np.random.default_rng(1)
    classes, n = 10, 200_000
    if skewed:  # 90% of samples have label 3
        labels = np.where(rng.random(n) < 0.9, 3, rng.integers(0, classes, n))
    else:
        labels = rng.integers(0, classes, n)
    noisy = randomized_response(labels, classes, epsilon, rng)
    prior = np.bincount(labels, minlength=classes) / n
    keep = keep_probability(epsilon, classes)
    likelihood = np.full((classes, classes), (1 - keep) / (classes - 1))  # [seen, true]
    np.fill_diagonal(likelihood, keep)
    guess = (likelihood * prior).argmax(1)  # for each value seen
    success = (guess[noisy] == labels).mean()
    blind = prior.max()
    assert success <= math.exp(epsilon) * blind + 0.005, (success, blind)
    if not skewed:
        assert success == pytest.approx(keep, abs=0.005)  # ~0.23 at epsilon 1, not 1.0


def test_bad_arguments_are_refused():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        randomized_response(np.array([0, 5]), 3, 1.0, rng)
    with pytest.raises(ValueError):
        keep_probability(0.0, 10)


def test_the_label_party_trains_on_labels_drawn_once_and_secretly():
    """Two draws differ (the generator is secret, not the job's seed); binary float
    labels stay float; the share kept is the mechanism's."""
    import torch

    from shoal.strategies.vertical.label import private_labels

    labels = (torch.rand(50_000) > 0.5).float()
    a, b = private_labels(labels, 2, 1.0), private_labels(labels, 2, 1.0)
    assert a.dtype == torch.float32 and not torch.equal(a, b)
    assert abs((a == labels).float().mean().item() - keep_probability(1.0, 2)) < 0.01
