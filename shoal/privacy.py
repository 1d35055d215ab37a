"""Differential privacy: the budget, its accounting, and Poisson sampling.

Accounting is Opacus's own RDP accountant (Mironov 2017; Mironov, Talwar and
Zhang 2019): each step of the sampled Gaussian mechanism, with sampling rate
``q`` and noise multiplier ``sigma``, is recorded; epsilon at a ``delta`` is
computed from the history, which checkpoints carry, so a resumed run reports
the epsilon of every step it took before and after.

The analysis holds for Poisson sampling: each sample (sample-level DP-SGD) or
each client (client-level DP for ``fedavg``) is in a step independently with
probability ``q``. Fixed-size shuffled batches, which most training loops use,
are not what the accountant assumes, so under ``--dp-clip`` the global batch is
drawn by :func:`poisson_rows` and ``--batch-size`` is its expected size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from shoal.errors import UserError


@dataclass(frozen=True)
class Budget:
    """What ``--dp-clip``, ``--dp-noise``, ``--dp-epsilon`` and ``--dp-delta`` ask for."""

    clip: float
    noise: float
    epsilon: float
    delta: float

    @property
    def enabled(self) -> bool:
        return self.clip > 0


def budget(train: Any) -> Budget:
    """The privacy flags of a job's ``train`` section, checked; a :class:`UserError`
    for a combination that means nothing."""
    b = Budget(train.dp_clip, train.dp_noise, train.dp_epsilon, train.dp_delta)
    if not b.enabled and (b.noise or b.epsilon):
        raise UserError("--dp-noise and --dp-epsilon need --dp-clip (the norm each gradient "
                        "is clipped to), e.g. --dp-clip 1.0")  # fmt: skip
    if b.noise and b.epsilon:
        raise UserError("give --dp-noise or --dp-epsilon, not both: the noise follows from a "
                        "target epsilon")  # fmt: skip
    return b


def noise_for(b: Budget, sample_rate: float, steps: int) -> float:
    """The noise multiplier: ``--dp-noise``, or the least that keeps epsilon within
    ``--dp-epsilon`` after ``steps`` steps at ``sample_rate`` (Opacus's search)."""
    if not b.epsilon:
        return b.noise
    from opacus.accountants.utils import get_noise_multiplier

    try:
        return float(get_noise_multiplier(target_epsilon=b.epsilon, target_delta=b.delta,
                                          sample_rate=sample_rate, steps=steps,
                                          accountant="rdp"))  # fmt: skip
    except ValueError as e:
        raise UserError(f"--dp-epsilon {b.epsilon:g}: {e}") from None


class Accountant:
    """Epsilon spent so far: Opacus's RDP accountant over the steps taken."""

    def __init__(self, noise: float, sample_rate: float, delta: float) -> None:
        from opacus.accountants import RDPAccountant

        self.noise, self.sample_rate, self.delta = noise, sample_rate, delta
        self.rdp = RDPAccountant()

    def step(self) -> None:
        """One step of the sampled Gaussian mechanism was taken."""
        self.rdp.step(noise_multiplier=self.noise, sample_rate=self.sample_rate)

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.rdp.history)

    def epsilon(self) -> float:
        """Epsilon at :attr:`delta` so far (infinite without noise, 0 before a step)."""
        if not self.rdp.history:
            return 0.0
        if self.noise <= 0:
            return math.inf
        return float(self.rdp.get_epsilon(delta=self.delta))

    def state_dict(self) -> dict[str, Any]:
        return {"history": [list(h) for h in self.rdp.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rdp.history = [tuple(h) for h in state["history"]]

    def summary(self, clip: float) -> dict[str, Any]:
        eps = self.epsilon()
        return {"epsilon": eps if math.isfinite(eps) else None, "delta": self.delta,
                "noise_multiplier": self.noise, "clip": clip, "sample_rate": self.sample_rate,
                "steps": self.steps, "accountant": "rdp (opacus)"}  # fmt: skip


def poisson_rows(seed: int, step: int, n: int, rate: float) -> np.ndarray:
    """The sorted rows of global step ``step``: each of ``n`` in with probability
    ``rate``, independently (a function of the seed and the step only)."""
    rng = np.random.default_rng([seed, step, 0xD1FF])
    return np.flatnonzero(rng.random(n) < rate)
