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

The noise and the Poisson samples must be secret: anyone who can rebuild the
noise subtracts it from two successive models, and the accountant's
amplification by sampling assumes nobody knows who was sampled. So both come
from a :class:`Randomness`, whose secret is drawn from the operating system
(``secrets``, i.e. ``os.urandom``) by rank 0 when a run starts, shared with the
other ranks over the process group, and kept only in the run's checkpoints
(never in ``config.toml``, the summary, the metrics, or anything sent to
clients), so a resumed run continues the same streams. ``--dp-insecure-seed``
derives the secret from ``--seed`` instead: reproducible, not private, and said
so in the summary.
"""

from __future__ import annotations

import hashlib
import math
import secrets
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
    if not b.enabled and (b.noise or b.epsilon or train.dp_insecure_seed):
        raise UserError("--dp-noise, --dp-epsilon and --dp-insecure-seed need --dp-clip (the "
                        "norm each gradient is clipped to), e.g. --dp-clip 1.0")  # fmt: skip
    if b.noise and b.epsilon:
        raise UserError("give --dp-noise or --dp-epsilon, not both: the noise follows from a "
                        "target epsilon")  # fmt: skip
    return b


SECRET_BITS = 128
"""Size of the secret behind a run's noise and samples."""


class Randomness:
    """The secret a run's DP noise and Poisson samples are drawn from (see the module's
    docstring): the same on every rank, in checkpoints only."""

    def __init__(self, secret: int, seeded: bool) -> None:
        self.secret, self.seeded = secret, seeded

    @classmethod
    def draw(cls, train: Any, env: Any = None) -> Randomness:
        """A new secret from the operating system, drawn by rank 0 and shared with the
        other ranks of ``env`` (or the job's seed under ``--dp-insecure-seed``)."""
        if train.dp_insecure_seed:
            return cls(int(train.seed), seeded=True)
        secret = secrets.randbits(SECRET_BITS)
        if env is not None and env.world_size > 1:
            import torch.distributed as dist

            box = [secret]
            dist.broadcast_object_list(box, src=0)
            secret = int(box[0])
        return cls(secret, seeded=False)

    def seed(self, label: str, *numbers: int) -> int:
        """A 64-bit seed for one use (``label``) at one step or round (``numbers``)."""
        text = f"shoal dp {label} {self.secret} " + " ".join(map(str, numbers))
        return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")

    def rows(self, step: int, n: int, rate: float) -> np.ndarray:
        """The Poisson sample of global step ``step`` (:func:`poisson_rows`)."""
        return poisson_rows(self.secret, step, n, rate)

    def state_dict(self) -> dict[str, Any]:
        return {"secret": str(self.secret), "seeded": self.seeded}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.secret, self.seeded = int(state["secret"]), bool(state["seeded"])

    def summary(self) -> dict[str, Any]:
        """What the summary says of the randomness (never the secret)."""
        if self.seeded:
            return {"randomness": "--seed (--dp-insecure-seed): reproducible, NOT private"}
        return {"randomness": "os.urandom secret, kept in checkpoints only"}


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
    """Epsilon spent so far: Opacus's RDP accountant over the steps taken.

    ``total_steps`` is the run's plan: under ``--dp-epsilon``, a resumed run with
    more (or fewer) steps draws its remaining steps' noise so that the whole run,
    steps before and after, stays within the target (:meth:`load_state_dict`)."""

    def __init__(self, noise: float, sample_rate: float, delta: float, total_steps: int = 0,
                 budget: Budget | None = None) -> None:  # fmt: skip
        from opacus.accountants import RDPAccountant

        self.noise, self.sample_rate, self.delta = noise, sample_rate, delta
        self.total_steps, self.budget = total_steps, budget
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
        if any(sigma <= 0 for sigma, _, _ in self.rdp.history):
            return math.inf
        return float(self.rdp.get_epsilon(delta=self.delta))

    def state_dict(self) -> dict[str, Any]:
        return {"history": [list(h) for h in self.rdp.history], "noise": self.noise,
                "total_steps": self.total_steps, "sample_rate": self.sample_rate}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The history of a checkpoint; under ``--dp-epsilon`` with a new number of
        steps or a new sampling rate (more clients a round, say), the noise of the steps
        left re-planned for the target over the whole run."""
        self.rdp.history = [tuple(h) for h in state["history"]]
        b = self.budget
        same = (state.get("total_steps") == self.total_steps
                and state.get("sample_rate", self.sample_rate) == self.sample_rate)  # fmt: skip
        if b is None or not b.epsilon or same:
            self.noise = float(state.get("noise", self.noise))
            return
        self.noise = _noise_for_rest(b, self.sample_rate, self.rdp.history,
                                     max(0, self.total_steps - self.steps))  # fmt: skip

    def summary(self, clip: float) -> dict[str, Any]:
        eps = self.epsilon()
        return {"epsilon": eps if math.isfinite(eps) else None, "delta": self.delta,
                "noise_multiplier": self.noise, "clip": clip, "sample_rate": self.sample_rate,
                "steps": self.steps, "accountant": "rdp (opacus)"}  # fmt: skip


def _noise_for_rest(b: Budget, rate: float, history: list[tuple], steps: int) -> float:
    """The least noise multiplier (to 1%) for ``steps`` more steps after ``history`` that
    keeps the whole run's epsilon within ``b.epsilon``; a :class:`UserError` where the
    steps taken already spent it."""
    from opacus.accountants import RDPAccountant

    def spent(sigma: float) -> float:
        acct = RDPAccountant()
        acct.history = [*history, (sigma, rate, steps)] if steps else list(history)
        return float(acct.get_epsilon(delta=b.delta))

    if not steps:
        return b.noise or 1.0
    high = 1.0
    while spent(high) > b.epsilon:
        high *= 2
        if high > 1e6:
            raise UserError(
                f"--dp-epsilon {b.epsilon:g}: the {sum(n for *_, n in history)} steps taken "
                f"already spent it; {steps} more steps cannot stay within it"
            )
    low = 0.0
    while high - low > 0.01 * high:
        mid = (low + high) / 2
        low, high = (low, mid) if spent(mid) <= b.epsilon else (mid, high)
    return high


def poisson_rows(seed: int, step: int, n: int, rate: float) -> np.ndarray:
    """The sorted rows of global step ``step``: each of ``n`` in with probability
    ``rate``, independently (a function of ``seed``, a :class:`Randomness` secret, and
    the step only)."""
    rng = np.random.default_rng([seed, step, 0xD1FF])
    return np.flatnonzero(rng.random(n) < rate)


def keep_probability(epsilon: float, classes: int) -> float:
    """Randomized response over ``classes`` labels at ``epsilon``: the probability that a
    label is kept (any other label comes with ``(1 - keep) / (classes - 1)`` each)."""
    if epsilon <= 0 or classes < 2:
        raise ValueError("randomized response needs epsilon > 0 and at least 2 classes")
    e = math.exp(min(epsilon, 700.0))
    return e / (e + classes - 1)


def randomized_response(
    labels: np.ndarray, classes: int, epsilon: float, rng: np.random.Generator
) -> np.ndarray:
    """Label differential privacy (Warner 1965; Ghazi et al. 2021): each integer label
    in ``[0, classes)`` is kept with :func:`keep_probability` and otherwise replaced by
    one of the other labels, uniformly. The ratio of the probabilities of any output
    under any two true labels is at most ``e^epsilon``, so training on the outputs is
    ``epsilon``-label-DP, whatever the training does with them and however long
    (post-processing): drawn once per run, from a secret generator, never redrawn."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise ValueError(f"labels must lie in [0, {classes})")
    keep = rng.random(labels.shape) < keep_probability(epsilon, classes)
    other = (labels + rng.integers(1, classes, size=labels.shape)) % classes
    return np.where(keep, labels, other)
