"""Where the parameter server's processes find each other: the variables its launcher
sets for the coordinator, shards and workers, and the largest message they accept."""

from __future__ import annotations

from shoal.config import JobConfig

COORDINATOR_ENV = "SHOAL_PS_COORDINATOR"
"""Where workers and servers find the coordinator (set by the launcher)."""
HOST_ENV = "SHOAL_PS_HOST"
"""The address this machine's servers listen on (set by the launcher)."""
BIND_ENV = "SHOAL_PS_BIND"
"""The exact address a restarted server binds: the one its predecessor had."""


def max_message_bytes(job: JobConfig) -> int:
    """The largest message a peer accepts, from ``--ps-max-message-mb``."""
    return int(job.strategy.options.max_message_mb * 1024 * 1024)
