"""Two "machines" for tests: :func:`shoal.netns.hosts`, skipping where it cannot run."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from shoal import netns
from shoal.netns import Host

__all__ = ["Host", "hosts"]


@contextlib.contextmanager
def hosts(subnet: str = "10.231.7") -> Iterator[tuple[Host, Host]]:
    reason = netns.unavailable()
    if reason:
        pytest.skip(reason)
    try:
        made = netns.hosts(2, subnet=subnet)
        a, b = made.__enter__()
    except netns.NetnsError as e:
        pytest.skip(f"cannot build network namespaces: {e}")
    try:
        yield a, b
    finally:
        made.__exit__(None, None, None)
