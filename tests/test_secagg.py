"""Secure aggregation: the protocol, with real X25519, AES-GCM and Shamir shares."""

from __future__ import annotations

import numpy as np
import pytest

from shoal import secagg


def run_round(
    inputs: dict[int, np.ndarray],
    drop_before_input: set[int] = frozenset(),
    drop_after_input: set[int] = frozenset(),
    seed: int = 0,
) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """One round between real clients and the server's unmasking, the server routing
    every message; returns the unmasked sum (floats) and what the server received."""
    clients = {u: secagg.Client(u) for u in inputs}
    keys = {u: c.advertise() for u, c in clients.items()}
    peers = secagg.neighbours(list(clients), seed)
    mail = {u: c.share_keys(keys, peers[u]) for u, c in clients.items()}
    shared = set(mail)
    for v, c in clients.items():
        c.receive({u: out[v] for u, out in mail.items() if v in out})
    masked = {u: c.masked_input(secagg.encode(inputs[u])) for u, c in clients.items()
              if u not in drop_before_input}  # fmt: skip
    answers = {v: c.unmask(masked) for v, c in clients.items()
               if v in masked and v not in drop_after_input}  # fmt: skip
    total = secagg.unmask_sum(masked, keys, peers, shared, answers)
    return secagg.decode(total), masked


def test_the_sum_is_the_plain_sum_within_fixed_point():
    rng = np.random.default_rng(0)
    inputs = {u: rng.normal(0, 10, 1000) for u in range(6)}
    total, _ = run_round(inputs)
    assert np.abs(total - sum(inputs.values())).max() <= 6 * 2.0**-secagg.FRACTION_BITS


def test_a_client_dropped_after_its_masked_input_is_recovered():
    """Client 2 sends its input, then never answers the unmasking: its self mask comes
    back from its peers' shares of its seed, and its input is in the sum."""
    rng = np.random.default_rng(1)
    inputs = {u: rng.normal(0, 1, 200) for u in range(5)}
    total, masked = run_round(inputs, drop_after_input={2})
    assert 2 in masked
    assert np.allclose(total, sum(inputs.values()), atol=1e-5)


def test_a_client_dropped_before_its_input_is_left_out_and_its_masks_removed():
    rng = np.random.default_rng(2)
    inputs = {u: rng.normal(0, 1, 200) for u in range(5)}
    total, masked = run_round(inputs, drop_before_input={0, 3})
    assert set(masked) == {1, 2, 4}
    assert np.allclose(total, inputs[1] + inputs[2] + inputs[4], atol=1e-5)


def test_what_the_server_receives_is_independent_of_the_update():
    """Across 200 rounds, one client's received vector against its update: no
    correlation (the update is the same vector each round, scaled, so that a leak of its
    direction or size would show)."""
    base = np.random.default_rng(3).normal(0, 1, 64)
    xs, ys = [], []
    for r in range(200):
        x = base * (1 + r / 50)
        _, masked = run_round({0: x, 1: -x, 2: np.zeros(64)}, seed=r)
        xs.append(x)
        ys.append(masked[0].astype(np.float64) / 2.0**64)  # uniform on [0, 1) if hidden
    xs, ys = np.concatenate(xs), np.concatenate(ys)
    assert abs(np.corrcoef(xs, ys)[0, 1]) < 0.05
    assert abs(ys.mean() - 0.5) < 0.02 and abs(ys.std() - (1 / 12) ** 0.5) < 0.02


def test_large_rounds_mask_with_neighbourhoods_and_survive_drops():
    n = 60
    peers = secagg.neighbours(list(range(n)), seed=7)
    assert all(u not in p and len(p) < n - 1 for u, p in peers.items())
    assert all(u in peers[v] for u, p in peers.items() for v in p)  # symmetric
    rng = np.random.default_rng(4)
    inputs = {u: rng.normal(0, 1, 16) for u in range(n)}
    total, masked = run_round(inputs, drop_before_input={5, 17}, drop_after_input={30}, seed=7)
    want = sum(v for u, v in inputs.items() if u in masked)
    assert np.allclose(total, want, atol=1e-4)


def test_too_few_or_forged_shares_are_refused():
    secret = bytes(range(32))
    shares = secagg.share(secret, [0, 1, 2, 3, 4], 3)
    assert secagg.rebuild({k: shares[k] for k in (1, 3, 4)}, 3) == secret
    with pytest.raises(secagg.SecAggError, match="needed"):
        secagg.rebuild({0: shares[0], 1: shares[1]}, 3)
    forged = {**shares, 2: (shares[2] + 1) % secagg.PRIME}  # with more than the threshold
    with pytest.raises(secagg.SecAggError, match="forged"):
        secagg.rebuild(forged, 3)
