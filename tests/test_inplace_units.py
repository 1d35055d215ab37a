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


def _state() -> dict:
    import torch

    g = torch.Generator().manual_seed(0)
    big = torch.randn(300, 200, generator=g)
    return {
        "model": {"w": big, "half": torch.randn(256, 256, generator=g).half()},
        "optimizer": {"state": {0: {"step": torch.tensor(7.0), "exp_avg": big * 2}},
                      "param_groups": [{"lr": 0.1, "params": [0]}]},
        "view": torch.randn(1000, 100, generator=g)[:, :50],  # (not contiguous)
        "slice": torch.arange(400_000)[1000:30_000],  # (of a larger storage)
        "small": [torch.ones(3, dtype=torch.bool), (1, "two", 3.0)],
        "rng": torch.Generator().manual_seed(5).get_state(),
        "copies": [big.clone(), big.clone().neg_().neg_(), torch.zeros(300, 200),
                   torch.zeros(300, 200).neg_()],  # (sent once; -0.0 is not 0.0)
    }  # fmt: skip


def _pass(rank: int, port: int, out: str) -> None:
    import torch

    from shoal.inplace import state

    store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0,
                          timeout=timedelta(seconds=30))  # fmt: skip
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    try:
        if rank == 0:
            torch.save(state.send(_state(), [1]), out + ".sent")
        else:
            torch.save(state.receive(0), out)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(60)
def test_state_passes_whole_its_large_tensors_sent_as_themselves(tmp_path):
    """Between two real processes over gloo: every value arrives equal, with its dtype,
    shape and container; a slice of a large storage costs its own bytes only, and copies
    of a tensor (bit for bit) are sent once."""
    import socket

    import torch
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "received.pt")
    mp.start_processes(_pass, args=(port, out), nprocs=2, start_method="spawn")
    got, want = torch.load(out, weights_only=True), _state()
    flat_got, flat_want = [], []
    for x, into in ((got, flat_got), (want, flat_want)):
        torch.utils._pytree.tree_map(into.append, x)
    assert torch.utils._pytree.tree_structure(got) == torch.utils._pytree.tree_structure(want)
    for a, b in zip(flat_got, flat_want, strict=True):
        if isinstance(b, torch.Tensor):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        else:
            assert a == b
    sent = torch.load(out + ".sent", weights_only=True)
    big_bytes = 300 * 200 * 4
    tensor_bytes = sum(
        t.numel() * t.element_size() for t in flat_want if isinstance(t, torch.Tensor)
    )
    copies = 2 * big_bytes  # (the two copies of w, sent once)
    assert tensor_bytes - copies < sent < tensor_bytes - copies + 20_000  # (outline: KBs)
    signs = torch.signbit(got["copies"][3]), torch.signbit(got["copies"][2])
    assert signs[0].all() and not signs[1].any()
