"""The launcher's decisions of an in-place job, on a real store, without workers."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
import torch.distributed as dist

from shoal.inplace import protocol as p
from shoal.inplace.coordinator import Coordinator, _fill

pytestmark = pytest.mark.timeout(60)


def test_a_replacement_takes_its_own_slot_s_place_and_a_spare_any_other():
    members = ["0.0", "1.0", "2.0", "3.0"]
    # 0.0 and 3.0 lost; 3.1 came up before 0.1: each still takes its own slot's place
    assert _fill(members, ["1.0", "2.0"], ["3.1", "0.1"]) == ["0.1", "1.0", "2.0", "3.1"]
    # a spare (slot 4) fills a place no replacement of its own takes
    assert _fill(members, ["0.0", "2.0", "3.0"], ["4.0"]) == ["0.0", "4.0", "2.0", "3.0"]
    # nobody to take a place: the living close up
    assert _fill(members, ["0.0", "2.0", "3.0"], []) == ["0.0", "2.0", "3.0"]


def _store() -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=10))


def _stop(store: dist.TCPStore, number: int, uid: str, step: int) -> None:
    record = json.dumps({"step": step, "why": "test", "at": 0.0})
    dist.PrefixStore(p.PREFIX, store).set(p.stopped_key(number, uid), record)


def _ready(store: dist.TCPStore, uid: str) -> None:
    dist.PrefixStore(p.PREFIX, store).set(p.ready_key(uid), "1")


def _started(replicas=None) -> tuple[dist.TCPStore, Coordinator]:
    store = _store()
    c = Coordinator(store, 4, 10.0, replicas)
    for u in ("0.0", "1.0", "2.0", "3.0"):
        c.started(u)
        _ready(store, u)
    c.tick()
    assert c.current is not None and c.current.number == 0
    return store, c


def test_with_sharded_state_the_living_wait_for_a_replacement_in_the_lost_place():
    """HSDP (shards {0, 2} and {1, 3}): after a loss the others do not go on fewer; the
    replacement joins in its slot's place and gets the state; losing both copies of a
    shard is seen."""
    store, c = _started([[0, 2], [1, 3]])
    c.exited("1.0", -9)
    for u in ("0.0", "2.0", "3.0"):
        _stop(store, 0, u, 40)
    c.tick()
    assert c.current.number == 0  # (no replacement yet: they wait)
    assert c.lost_shard() is None  # (slot 3 holds shard 1)
    c.started("1.1")
    _ready(store, "1.1")
    c.tick()
    assert c.current.members == ["0.0", "1.1", "2.0", "3.0"] and c.current.step == 40
    assert c.current.needs_state == ["1.1"]
    c.exited("1.1", -9)
    c.exited("3.0", -9)
    assert c.lost_shard() == 1


def test_with_whole_state_the_living_go_on_without_waiting():
    store, c = _started()
    c.exited("1.0", -9)
    for u in ("0.0", "2.0", "3.0"):
        _stop(store, 0, u, 40)
    c.tick()
    assert c.current.members == ["0.0", "2.0", "3.0"] and c.current.step == 40
    assert c.lost_shard() is None
