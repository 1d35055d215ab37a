"""What the launcher and the workers of an in-place job write in the launcher's store."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from shoal.config import JobConfig
from shoal.dist import INPLACE_STORE_ENV

STORE_ENV = INPLACE_STORE_ENV
"""``host:port`` of the launcher's store, in every worker's environment."""
UID_ENV = "SHOAL_UID"
"""This process's identity: ``SLOT.INCARNATION`` (slot 1's first replacement: ``1.1``)."""
PREFIX = "shoal/inplace/"
LATEST = "latest"
"""The number of the newest generation."""


@dataclass
class Generation:
    """Who trains from which step: a member's rank is its index in :attr:`members`."""

    number: int
    members: list[str]
    step: int
    """The global step it starts at (every step before it is committed); -1 for the
    first generation, whose members restore the run's newest checkpoint, if any."""
    source: str = ""
    """A member that holds the state at :attr:`step`."""
    needs_state: list[str] = field(default_factory=list)
    """Members that receive the state from :attr:`source` before training."""
    lost: list[str] = field(default_factory=list)
    """Members of the previous generation that are gone."""

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> Generation:
        return cls(**json.loads(text))


def generation_key(number: int) -> str:
    return f"gen/{number}"


def ready_key(uid: str) -> str:
    """Set by a worker that has built its job and can join."""
    return f"ready/{uid}"


def stopped_key(number: int, uid: str) -> str:
    """Set by a member that left generation ``number``: ``{"step": last committed + 1}``."""
    return f"stopped/{number}/{uid}"


def pending_key(number: int) -> str:
    """Set by the launcher: generation ``number`` is to end at its next boundary."""
    return f"pending/{number}"


def cut_key(number: int, step: int) -> str:
    """What the members of generation ``number`` decided at the boundary after ``step``."""
    return f"cut/{number}/{step}"


def group_prefix(number: int) -> str:
    """Where generation ``number``'s process group meets."""
    return f"pg/{number}/"


def collective_timeout(job: JobConfig) -> float:
    """Seconds a member may stay out of a collective its generation waits in."""
    return job.strategy.collective_timeout or 10 * job.strategy.heartbeat_timeout
