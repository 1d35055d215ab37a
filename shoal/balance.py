"""Load balancing for synchronous data parallel: where each global batch is cut.

The samples of a global step never change (see :mod:`shoal.data.sampler`); what
``--balance`` moves is the cut between the data-parallel ranks. Every rank's
loss is already scaled by ``ranks / global_batch``, so the averaged gradient is
the mean over the step's samples however they are cut: a balanced run ends at
the parameters of an equal one (up to float reduction order).

- ``equal``: slices differ by at most one sample (the default).
- ``static:W1,W2,...``: slices in proportion to fixed weights, one per rank.
- ``auto``: each rank measures its busy seconds per sample in every step: the
  step's wall time less the time it waited in the gradient exchange (and in the
  metrics gather) for slower peers. Busy time holds all the rank's work, its
  data, optimizer and bookkeeping too, which is slow on a slow machine as well,
  and throttling wherever it falls. After step :data:`FIRST`, then every
  ``--balance-every`` steps, the ranks exchange their window's figures and every
  rank computes the same plan (:func:`plan`): the shares that make every rank
  equally busy, a rank being busy ``(fixed + n) / speed`` with ``n`` samples.
  Against noise: the lower quartile of each window's times; ranks whose speeds
  are within :data:`THRESHOLD` of each other plan as one speed (:func:`pooled`),
  so that alike machines split their work evenly; a plan is adopted
  only when it would shorten the predicted step by more than :data:`THRESHOLD`
  (:data:`FIRST_THRESHOLD` on the first, shorter window);
  every change after the first moves :data:`DAMPING` of the way to the target,
  and no share by more than a factor of :data:`STRIDE`, so shares settle
  instead of chasing each window's noise.

  Where the model has settled on uneven shares, the balancer tries the cut it
  cannot predict: for a window, the ranks below an equal share keep only
  :data:`PROBE` of theirs. It keeps a probe (and tries further) only when the
  window's steps, timed whole (the exchange and the metrics gather included;
  their lower quartile), are more than :data:`GAIN` quicker; otherwise it goes
  back and stops probing until the model moves the plan. What the busy-time
  model misses is mostly how a slow rank holds up the collectives: on a machine
  throttled by a CPU quota (containers' CPU limits) a rank with no slack
  answers each round of an all-reduce late, so the quickest cut leaves it idle
  for part of a step.

A slice larger than ``--max-rank-batch`` is computed as micro-batches whose
gradients accumulate; every rank uses the same number of micro-batches in a
step (the most any rank needs), so collectives inside forward and backward
(FSDP, tensor parallel) stay matched.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from shoal.errors import UserError

THRESHOLD = 0.20
"""A new plan must shorten the predicted step by more than this fraction."""
DAMPING = 0.5
"""The fraction of the way from the current shares to the target a change moves."""
FIRST = 4
"""The first re-plan comes after this step, not after a whole ``--balance-every``
window: three measured steps, whose quickest counts (see :func:`_summarize`), so a
transient straggler would have to hit one rank in all three to move it."""
FIRST_THRESHOLD = 0.50
"""The first re-plan, on three steps, must shorten the predicted step by more than
this: machines alike measure up to a quarter apart in so few steps (under CPU
quotas), a machine that is really slow is told apart at once, and a small
difference waits for a whole window."""
STRIDE = 3.0
"""One re-plan changes a rank's share by at most this factor, up or down."""
SMOOTHING = 0.5
"""Weight of the newest window in each rank's smoothed rate (an exponential average)."""
PROBE = 0.5
"""A probe scales the shares of the ranks below an equal share by this factor."""
GAIN = 0.03
"""A probe is kept when its window's steps (lower quartile) are quicker by more than this."""


@dataclass(frozen=True)
class BalanceSpec:
    """A parsed ``--balance``: its mode and, for ``static``, the weights."""

    mode: str
    weights: tuple[float, ...] = ()

    def __str__(self) -> str:
        if self.mode == "static":
            return "static:" + ",".join(f"{w:g}" for w in self.weights)
        return self.mode


def parse(spec: str) -> BalanceSpec:
    """``equal``, ``auto`` or ``static:W1,W2,...``; a :class:`UserError` for anything else."""
    mode, _, rest = spec.strip().partition(":")
    if mode in ("equal", "auto") and not rest:
        return BalanceSpec(mode)
    if mode == "static" and rest:
        try:
            weights = tuple(float(w) for w in rest.split(","))
        except ValueError:
            weights = ()
        if weights and all(math.isfinite(w) and w > 0 for w in weights):
            return BalanceSpec(mode, weights)
        raise UserError(
            f"--balance {spec}: static weights must be positive numbers, e.g. static:3,3,1"
        )
    raise UserError(f"--balance {spec}: use equal, auto or static:W1,W2,... (one weight per rank)")


def check(spec: BalanceSpec, ranks: int) -> None:
    """A :class:`UserError` unless ``spec`` fits ``ranks`` data-parallel ranks."""
    if spec.mode == "static" and len(spec.weights) != ranks:
        raise UserError(
            f"--balance {spec} gives {len(spec.weights)} weights for {ranks} data-parallel "
            "ranks: one weight per rank"
        )


def cut(n: int, shares: Sequence[float]) -> list[int]:
    """Sizes of ``len(shares)`` slices of ``n`` items in proportion to ``shares`` (largest
    remainder), each at least one item when there are enough; equal shares give the
    equal cut (the first ``n % parts`` slices one longer)."""
    parts, total = len(shares), float(sum(shares))
    least = 1 if n >= parts else 0
    spare = n - least * parts
    exact = [spare * s / total for s in shares]
    sizes = [least + math.floor(e) for e in exact]
    left = n - sum(sizes)
    order = sorted(range(parts), key=lambda r: (-(exact[r] - math.floor(exact[r])), r))
    for r in order[:left]:
        sizes[r] += 1
    return sizes


def micro_batches(sizes: Sequence[int], cap: int) -> int:
    """Micro-batches every rank cuts its slice into so that none exceeds ``cap`` samples
    (``cap`` 0: no limit)."""
    if cap <= 0:
        return 1
    return max(1, max(math.ceil(s / cap) for s in sizes))


def _summarize(window: list[tuple[int, float, float, float]]) -> list[float]:
    """A window's samples per step (median), busy seconds per sample (lower quartile:
    a straggling step only ever adds time, so the quickest steps show a rank's speed,
    and a rank that is slow in every step is slow in those too), the step's fixed
    cost as samples' worth of compute (median; 0 where compute was not measured), and
    the whole step's seconds (lower quartile: a transient straggler in most of a
    window's steps would otherwise decide a probe)."""
    if not window:
        return [0.0] * 4
    fixed = [n * (busy - compute) / compute for n, busy, compute, _ in window
             if 0 < compute < busy]  # fmt: skip
    return [statistics.median(n for n, *_ in window),
            float(np.percentile([busy / n for n, busy, *_ in window], 25, method="lower")),
            statistics.median(fixed) if fixed else 0.0,
            float(np.percentile([wall for *_, wall in window], 25, method="lower"))]  # fmt: skip


def plan(rates: Sequence[float], fixed: float, total: float) -> list[float]:
    """Shares of ``total`` samples that make every rank equally busy, where a rank of
    speed ``rate`` (samples per second) is busy ``(fixed + n) / rate`` seconds with
    ``n`` samples. Every rank keeps at least one sample."""
    active, least = set(range(len(rates))), min(1.0, total / len(rates))
    sizes = [least] * len(rates)
    while active:
        left = total - least * (len(rates) - len(active))
        busy = (left + fixed * len(active)) / sum(rates[r] for r in active)
        for r in active:
            sizes[r] = busy * rates[r] - fixed
        short = {r for r in active if sizes[r] < least}
        if not short:
            break
        for r in short:
            sizes[r] = least
        active -= short
    return [n / total for n in sizes]


def pooled(rates: Sequence[float], tolerance: float = THRESHOLD) -> list[float]:
    """``rates`` where ranks within ``tolerance`` of the fastest of their group count as
    one speed, the group's mean: ranks alike measure a few percent apart, and a plan
    that followed those differences would load the one that measured quickest most."""
    out = list(rates)
    order = sorted(range(len(rates)), key=lambda r: -rates[r])
    while order:
        group = [r for r in order if rates[r] * (1 + tolerance) >= rates[order[0]]]
        mean = sum(rates[r] for r in group) / len(group)
        for r in group:
            out[r] = mean
        order = order[len(group) :]
    return out


def predicted(shares: Sequence[float], rates: Sequence[float], fixed: float, total: float) -> float:
    """The busy time of the slowest rank under ``shares`` (the model of :func:`plan`)."""
    return max((fixed + s * total) / r for s, r in zip(shares, rates))


def further(shares: Sequence[float]) -> list[float]:
    """A probe's shares: the ranks below an equal share scaled by :data:`PROBE`, the
    others taking up what they gave in proportion to their shares."""
    mean = 1 / len(shares)
    low = [s < mean for s in shares]
    freed = sum((1 - PROBE) * s for s, lo in zip(shares, low) if lo)
    high = sum(s for s, lo in zip(shares, low) if not lo)
    return [s * PROBE if lo else s * (1 + freed / high) for s, lo in zip(shares, low)]


class Balancer:
    """The plan of one job's data-parallel ranks: each rank's share of a global batch.

    Every rank holds the same plan; under ``auto`` they change it together in
    :meth:`replan`, a collective over the default process group.
    """

    def __init__(self, spec: BalanceSpec, ranks: int, rank: int, every: int) -> None:
        check(spec, ranks)
        self.spec, self.ranks, self.rank, self.every = spec, ranks, rank, every
        weights = spec.weights if spec.mode == "static" else (1.0,) * ranks
        self.shares = [w / sum(weights) for w in weights]
        self.history: list[tuple[int, list[float]]] = []
        """(step, shares) each time the plan was set: from the start, and each change."""
        self.replans = 0
        self.rates: list[float] | None = None  # smoothed speeds (samples/s), per rank
        self.previous: list[list[float]] | None = None
        self.fixed = 0.0  # the smoothed fixed cost of a step, as samples' worth of compute
        self.window: list[tuple[int, float, float, float]] = []
        """(samples, busy, compute, whole step) seconds, per measured step"""
        self.trial: tuple[list[float], float] | None = None
        """while a probe runs: the shares before it and the lower quartile of their steps"""
        self.probed = False  # the probes since the model last moved the plan are done
        self.probes = [0, 0]  # probes tried, kept
        self.logged: list[list[float]] = []  # the shares at each metrics record

    @property
    def auto(self) -> bool:
        return self.spec.mode == "auto" and self.ranks > 1

    def start(self, step: int) -> None:
        """The plan in force from ``step`` on (where the run starts or resumes)."""
        if not self.history or self.history[-1][1] != self.shares:
            self.history.append((step, list(self.shares)))

    def observe(self, samples: int, busy: float, compute: float, wall: float) -> None:
        """This rank's step of ``samples`` took ``wall`` seconds and kept it busy ``busy``
        of them, ``compute`` in forward and backward."""
        if samples > 0 and busy > 0:
            self.window.append((samples, busy, compute, wall))

    def due(self, step: int) -> bool:
        """Whether the ranks re-plan after global ``step`` (the same answer on every rank):
        after step :data:`FIRST`, then every ``--balance-every`` steps from there, so that
        every window is whole (the step after a re-plan is not measured)."""
        return self.auto and step >= self.first and (step - self.first) % self.every == 0

    @property
    def first(self) -> int:
        """The step after which the ranks first re-plan."""
        return min(FIRST, self.every)

    def replan(self, step: int, device: torch.device) -> bool:
        """Exchange this window's measurements and set the next plan. Collective.
        Returns whether the plan changed."""
        on = device if dist.get_backend() == "nccl" else torch.device("cpu")
        mine = torch.tensor([float(self.rank), *_summarize(self.window)], dtype=torch.float64,
                            device=on)  # fmt: skip
        self.window = []
        rows = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(rows, mine)
        best: dict[int, list[float]] = {}
        step_time = 0.0
        for rank, *row, wall in (r.tolist() for r in rows):
            step_time = max(step_time, wall)
            # ranks that share a slice (tensor shards): the slowest counts
            if int(rank) not in best or row[1] > best[int(rank)][1]:
                best[int(rank)] = row
        measured = [best[r] for r in range(self.ranks)]
        if min(n for n, _, _ in measured) <= 0:
            return False  # a window without measurements (just started): keep the plan
        fixed = statistics.median(f for _, _, f in measured)
        # where a rank's slice changed much since the last window, how its busy time
        # changed measures the fixed cost better (it holds the rank's share of the
        # exchange's CPU, which a CPU quota makes it pay for later)
        secant = []
        mean = sum(n for n, _, _ in measured) / self.ranks
        for (n2, p2, _), (n1, p1, _) in zip(measured, self.previous or []):
            b1, b2 = n1 * p1, n2 * p2
            sizable = min(n1, n2) >= mean / 4  # (a tiny slice's time is all fixed cost)
            if sizable and abs(n2 - n1) > 0.2 * n1 and (b2 - b1) * (n2 - n1) > 0:
                secant.append((n2 * b1 - n1 * b2) / (b2 - b1))
        if secant:
            fixed = max(0.0, statistics.median(secant))
        self.previous = measured
        total = sum(n for n, _, _ in measured)
        # a fixed cost beyond a mean slice's compute cannot be told from noise, and it
        # multiplies the noise of the speeds in the plan: count it as that at most
        fixed = min(fixed, total / self.ranks)
        # a rank's speed: what its busy time would be with no fixed cost (fixed cost
        # and compute both run at the rank's speed: a slow machine is slow at both)
        rates = [(fixed + n) / (per_sample * n) for n, per_sample, _ in measured]
        if self.rates is not None:
            rates = [SMOOTHING * new + (1 - SMOOTHING) * old for new, old in zip(rates, self.rates)]
            fixed = SMOOTHING * fixed + (1 - SMOOTHING) * self.fixed
        self.rates, self.fixed = rates, fixed
        if self._consider(step, plan(pooled(rates), fixed, total), total):
            self.trial, self.probed = None, False
            return True
        return self._probe(step, step_time)

    def _probe(self, step: int, step_time: float) -> bool:
        """Judge a running probe by its window's ``step_time`` (the slowest rank's lower
        quartile of whole steps), or start one where the plan has settled on uneven
        shares. Returns whether the plan changed."""
        if self.trial is not None:
            before, then = self.trial
            if step_time >= then * (1 - GAIN):  # not quicker: back, and no more probes
                self.trial, self.probed = None, True
                self._set(step, before)
                return True
            self.probes[1] += 1  # quicker: kept, and a probe further
        elif (
            self.probed or not self.replans or max(self.shares) < (1 + THRESHOLD) * min(self.shares)
        ):
            return False
        self.trial = (list(self.shares), step_time)
        self.probes[0] += 1
        self._set(step, further(self.shares))
        return True

    def _set(self, step: int, shares: list[float]) -> None:
        self.shares = [s / sum(shares) for s in shares]
        self.history.append((step, list(self.shares)))

    def _consider(self, step: int, target: list[float], total: float) -> bool:
        """Adopt ``target`` if it shortens the predicted step by more than THRESHOLD
        (FIRST_THRESHOLD after the first window)."""
        assert self.rates is not None
        rates = pooled(self.rates)
        now = predicted(self.shares, rates, self.fixed, total)
        then = predicted(target, rates, self.fixed, total)
        if now <= then * (1 + (FIRST_THRESHOLD if step == self.first else THRESHOLD)):
            return False
        move = DAMPING if self.replans else 1.0  # the first plan goes all the way
        shares = [s + move * (t - s) for s, t in zip(self.shares, target)]
        shares = [min(max(n, s / STRIDE), s * STRIDE) for n, s in zip(shares, self.shares)]
        self.replans += 1
        self._set(step, shares)
        return True

    def log(self) -> list[float]:
        """The shares now, kept for the spread over time; for a metrics record."""
        self.logged.append(list(self.shares))
        return [round(s, 6) for s in self.shares]

    def sizes(self, n: int) -> list[int]:
        """The slice of each rank in a global batch of ``n`` samples."""
        return cut(n, self.shares)

    def state_dict(self) -> dict[str, Any]:
        return {"spec": str(self.spec), "shares": list(self.shares), "rates": self.rates,
                "fixed": self.fixed, "replans": self.replans, "trial": self.trial,
                "probed": self.probed, "probes": self.probes,
                "history": [[s, v] for s, v in self.history], "logged": self.logged}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the saved plan where the spec and the number of ranks are the same."""
        if state.get("spec") != str(self.spec) or len(state.get("shares", [])) != self.ranks:
            return
        self.shares = [float(s) for s in state["shares"]]
        self.rates = state["rates"]
        self.fixed = float(state.get("fixed", 0.0))
        self.replans = int(state["replans"])
        trial = state.get("trial")
        self.trial = None if trial is None else ([float(s) for s in trial[0]], float(trial[1]))
        self.probed = bool(state.get("probed", False))
        self.probes = [int(n) for n in state.get("probes", [0, 0])]
        self.history = [(int(s), [float(x) for x in v]) for s, v in state["history"]]
        self.logged = [[float(x) for x in v] for v in state.get("logged", [])]

    def summary(self) -> dict[str, Any]:
        """The plan for ``summary.json``: mode, final shares, changes, its history, and
        the standard deviation of each rank's share over the metrics records."""
        std = [0.0] * self.ranks
        if self.logged:
            t = torch.tensor(self.logged, dtype=torch.float64)
            std = t.std(0, unbiased=False).tolist()
        return {
            "mode": str(self.spec),
            "shares": list(self.shares),
            "replans": self.replans,
            "probes": {"tried": self.probes[0], "kept": self.probes[1]},
            "history": [{"step": s, "shares": v} for s, v in self.history],
            "share_std": std,
        }
