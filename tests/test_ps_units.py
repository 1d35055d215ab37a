"""Parameter-server parts in one process: placement, wire, optimizers, rows, steps, tasks."""

from __future__ import annotations

import importlib
import itertools
import json
import threading

import pytest
import torch
import zmq

from shoal.config import JobConfig, OptimConfig
from shoal.metrics import CommCounter
from shoal.models.sparse import (
    SparseEmbedding,
    StoredRows,
    count_parameters,
    hashed_uniform,
    init_rows,
    remote_tables,
)
from shoal.net import gate, wire
from shoal.net.peer import Peer, PeerError
from shoal.strategies import resolve
from shoal.strategies.ps.consistency import Steps
from shoal.strategies.ps.coordinator import Coordinator
from shoal.strategies.ps.optim import ServerOptimizer
from shoal.strategies.ps.placement import dense_plan, row_shard, shard_bytes
from shoal.strategies.ps.server import Server
from shoal.strategies.ps.storage import SparseTable, sum_rows
from shoal.strategies.ps.tasks import TaskQueue
from shoal.telemetry import Window


def test_dense_plan_balances_bytes_and_covers_every_element():
    params = [("big", 1000), ("a", 10), ("b", 7), ("c", 300)]
    plan = dense_plan(params, 3)
    for name, numel in params:
        covered = sorted((s.start, s.stop) for s in plan if s.name == name)
        assert covered[0][0] == 0 and covered[-1][1] == numel
        assert all(a[1] == b[0] for a, b in itertools.pairwise(covered))
    sizes = shard_bytes(plan, 3)
    assert max(sizes) - min(sizes) <= 4 * 1 and sum(sizes) == 4 * 1317
    assert len([s for s in plan if s.name == "big"]) >= 3  # the large tensor is split


def test_dense_plan_more_shards_than_elements():
    plan = dense_plan([("w", 2)], 4)
    assert sum(s.numel for s in plan) == 2


def test_row_shard():
    assert row_shard(torch.tensor([0, 5, 7, 12]), 4).tolist() == [0, 1, 3, 0]


@pytest.mark.parametrize("dtype", list(wire.DTYPES.values()))
def test_wire_round_trip(dtype):
    t = torch.arange(12).reshape(3, 4).to(dtype)
    header, tensors = wire.decode(
        wire.encode({"op": "x", "k": 1}, [t, torch.empty(0, 5, dtype=dtype)]), 1 << 20
    )
    assert header["op"] == "x" and header["k"] == 1
    assert torch.equal(tensors[0], t) and tensors[1].shape == (0, 5)


@pytest.mark.parametrize(
    "frames, kind",
    [
        ([], "malformed"),
        ([b"\xff\xfe"], "malformed"),
        ([b"[1,2]"], "malformed"),
        ([b'{"op":"x","t":[["float32",[4]]]}'], "truncated"),
        ([b'{"op":"x","t":[["float32",[4]]]}', b"\0" * 8], "truncated"),
        ([b'{"op":"x","t":[["complex",[1]]]}', b"\0" * 8], "malformed"),
        ([b'{"op":"x","t":[["float32",[-1]]]}', b""], "malformed"),
        ([b'{"op":"x","t":[["float32",[1000000]]]}', b""], "oversized"),
        ([b"{" + b" " * (wire.MAX_HEADER_BYTES + 1) + b"}"], "oversized"),
    ],
)
def test_wire_refuses(frames, kind):
    with pytest.raises(wire.WireError) as e:
        wire.decode(frames, max_bytes=1 << 20)
    assert e.value.kind == kind


def test_large_tensors_travel_in_bounded_frames():
    t = torch.arange(3 * wire.FRAME_BYTES // 4 + 5, dtype=torch.float32)  # 4 frames
    frames = wire.encode({"op": "x"}, [torch.ones(2), t])
    assert len(frames) == 1 + 1 + 4 and max(len(memoryview(f)) for f in frames) <= wire.FRAME_BYTES
    _, (small, big) = wire.decode(frames, 1 << 20)
    assert torch.equal(big, t) and torch.equal(small, torch.ones(2))
    for bad in (frames[:-1], [*frames[:-1], bytes(memoryview(frames[-1]))[:-4]]):
        with pytest.raises(wire.WireError, match="truncated"):
            wire.decode(bad, 1 << 20)
    with pytest.raises(wire.WireError, match="oversized"):  # checked before any frame is read
        wire.decode(frames[:1], 1000)


def test_larger_frames_only_where_the_receiver_takes_them():
    """A message cut in 1 MiB frames says so (``f``); a receiver whose cap is smaller, or
    a frame size that is not an integer or under the smallest, is refused; messages
    whose tensors all fit a small frame say nothing of frames."""
    t = torch.arange(3 * wire.LARGE_FRAME_BYTES // 4 + 9, dtype=torch.float32)  # 4 frames
    frames = wire.encode({"op": "x"}, [t], frame_bytes=wire.LARGE_FRAME_BYTES)
    assert len(frames) == 1 + 4 and json.loads(frames[0])["f"] == wire.LARGE_FRAME_BYTES
    _, (got,) = wire.decode(frames, 1 << 24, frame_cap=wire.LARGE_FRAME_BYTES)
    assert torch.equal(got, t)
    with pytest.raises(wire.WireError, match="this receiver takes"):
        wire.decode(frames, 1 << 24)  # (a listener with 64 KiB frames)
    small = wire.encode({"op": "x"}, [torch.ones(10)], frame_bytes=wire.LARGE_FRAME_BYTES)
    assert "f" not in json.loads(small[0])
    for f in ("1024", 1024, 2**40, True):
        bad = [json.dumps({**json.loads(frames[0]), "f": f}).encode(), *frames[1:]]
        with pytest.raises(wire.WireError, match=r"f must be|this receiver takes"):
            wire.decode(bad, 1 << 24, frame_cap=wire.LARGE_FRAME_BYTES)


def test_a_listener_s_frames_times_its_connections_stay_bounded():
    assert gate.frame_bytes(gate.SHARD_CONNECTIONS) == wire.LARGE_FRAME_BYTES
    assert gate.frame_bytes(gate.MAX_CONNECTIONS) == wire.FRAME_BYTES
    for cap in (1, 64, 65, 100, 256, 1024, 5000):
        size = gate.frame_bytes(cap)
        assert wire.FRAME_BYTES <= size <= wire.LARGE_FRAME_BYTES
        assert size * cap <= gate.STRANGERS_BYTES or size == wire.FRAME_BYTES


def test_a_shard_and_its_client_agree_on_large_frames():
    """Over the authenticated wire: the shard's welcome says its frame size, the client
    cuts its pushes in it, the shard's replies come in it, and the values arrive whole."""
    server = Server(0, b"k" * 32, OptimConfig(name="sgd", lr=0.5), "asp", 0)
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    peer = Peer(zmq.Context.instance(), server.address, b"k" * 32, "w0", CommCounter(),
                timeout_s=30, target=server.target)  # fmt: skip
    try:
        assert peer.frame_bytes == server.listener.frame_bytes == wire.LARGE_FRAME_BYTES
        w = torch.arange(2 * wire.LARGE_FRAME_BYTES // 4 + 3, dtype=torch.float32)
        peer.call({"op": "init", "parts": 1, "total_steps": 10, "tables": []},
                  [w, wire.strings_tensor(["w@0"])])  # fmt: skip
        push = {"op": "push", "step": 0, "part": 0, "read_through": -1, "tables": []}
        peer.call(push, [torch.ones_like(w)])
        _, (values,) = peer.call({"op": "pull", "step": 1, "tables": []})
        assert torch.equal(values, w - 0.5)
    finally:
        peer.call({"op": "shutdown"})
        peer.close()
        thread.join(timeout=10)


def test_buffers_are_reused_only_once_nothing_refers_to_them():
    buffers = wire.Buffers(keep=2)
    a = buffers.take(1000)
    view = a.view(torch.float32)[:10]  # a receiver kept a view: a is not free
    b = buffers.take(1000)
    assert b.data_ptr() != a.data_ptr()
    del view
    assert buffers.take(1000).data_ptr() == a.data_ptr()  # free again: taken again
    assert buffers.take(24).numel() == 24 and len(buffers.held) == 2  # bounded


def test_receive_takes_frames_into_buffers_and_stays_in_step_after_a_bad_message():
    """Over a real socket: a multi-frame tensor arrives in a reused buffer; a message
    whose frames do not make what its header declares is refused and read to its end,
    so the message after it is received whole."""
    ctx = zmq.Context.instance()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    port = a.bind_to_random_port("tcp://127.0.0.1")
    b.connect(f"tcp://127.0.0.1:{port}")
    try:
        big = torch.arange(3 * wire.FRAME_BYTES // 4 + 7, dtype=torch.float32)  # 4 frames
        frames = wire.encode({"op": "x", "id": 1}, [torch.ones(3), big])
        buffers = wire.Buffers()
        b.send_multipart(frames, copy=False)
        _, size, header, (small, got) = wire.receive(a, 1 << 20, buffers)
        assert header["id"] == 1 and torch.equal(got, big) and torch.equal(small, torch.ones(3))
        assert size == wire.message_bytes(frames)
        where = got.data_ptr()
        del got
        b.send_multipart(frames, copy=False)
        assert wire.receive(a, 1 << 20, buffers)[3][1].data_ptr() == where  # reused
        short = [*frames[:-1], bytes(memoryview(frames[-1]))[:-4], b"x" * 10]  # cut, then extra
        for bad in (short, frames[:-1], [*frames, b"extra"]):
            b.send_multipart(bad, copy=False)
            with pytest.raises(wire.WireError, match="truncated") as e:
                wire.receive(a, 1 << 20, buffers)
            assert e.value.received[1] == wire.message_bytes(bad)  # read to its end
            b.send_multipart(frames, copy=False)
            assert torch.equal(wire.receive(a, 1 << 20, buffers)[3][1], big)
    finally:
        a.close(0)
        b.close(0)


def test_door_takes_each_good_token_once_and_only_for_its_target():
    door = gate.Door(b"s" * 32, "shard-1")
    token = gate.client_token(b"s" * 32, "worker0", "shard-1").encode()
    why, user = door.check(b"PLAIN", b"worker0", token)
    assert why == "" and user.startswith("worker0|")
    assert door.check(b"PLAIN", b"worker0", token)[0] == "replayed"
    refusals = [
        door.check(
            b"PLAIN", b"worker0", gate.client_token(b"x" * 32, "worker0", "shard-1").encode()
        ),
        door.check(
            b"PLAIN", b"worker0", gate.client_token(b"s" * 32, "worker0", "shard-2").encode()
        ),
        door.check(
            b"PLAIN", b"worker1", gate.client_token(b"s" * 32, "worker0", "shard-1").encode()
        ),
        door.check(b"PLAIN", b"w", gate.client_token(b"s" * 32, "w", "shard-1", now=0).encode()),
        door.check(b"NULL", b"", b""),
        door.check(b"PLAIN", b"\xff", b"1.2"),
        door.check(b"PLAIN", b"w", "1.2.é".encode()),  # (compare_digest takes no non-ASCII str)
    ]
    assert [why for why, _ in refusals] == [
        "bad-token", "bad-token", "bad-token", "expired", "mechanism", "malformed", "malformed"
    ]  # fmt: skip


@pytest.mark.parametrize(
    "name, torch_opt",
    [
        ("sgd", lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.01)),
        ("momentum", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01)),
        ("adam", lambda p: torch.optim.Adam(p, lr=0.1, weight_decay=0.01)),
        ("adamw", lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.01)),
        ("adagrad", lambda p: torch.optim.Adagrad(p, lr=0.1, weight_decay=0.01)),
    ],
)
def test_server_optimizers_match_torch(name, torch_opt):
    torch.manual_seed(0)
    init = torch.randn(3, 5)
    ref = torch.nn.Parameter(init.clone())
    opt = torch_opt([ref])
    ours = init.clone()
    server = ServerOptimizer(OptimConfig(name=name, lr=0.1, weight_decay=0.01), total_steps=10)
    state = server.new_state(3, 5)
    for step in range(6):
        grad = torch.randn(3, 5)
        ref.grad = grad.clone()
        opt.step()
        server.apply(ours, grad, state, step)
    torch.testing.assert_close(ours, ref.detach(), rtol=1e-5, atol=1e-6)


def test_sparse_table_creates_rows_lazily_and_deterministically():
    opt = ServerOptimizer(OptimConfig(name="adagrad", lr=0.5), 10)
    a, b = SparseTable(4, 0.1, 7, opt), SparseTable(4, 0.1, 7, opt)
    ra = a.read(torch.tensor([5, 10**12, 3]))
    rb = b.read(torch.tensor([3, 5]))
    assert len(a) == 3 and len(b) == 2
    torch.testing.assert_close(ra[0], rb[1])  # row 5: same value whatever came first
    assert ra.abs().max() <= 0.1 * 3**0.5 and ra.std() > 0.01
    before = a.read(torch.tensor([3])).clone()
    a.apply(torch.tensor([5]), torch.ones(1, 4), step=0)
    assert torch.equal(a.read(torch.tensor([3])), before)  # untouched row unchanged
    assert a.state["sum"][a.slots(torch.tensor([3]))].abs().sum() == 0
    for i in range(2000):  # growth keeps rows
        a.read(torch.tensor([100 + i]))
    torch.testing.assert_close(a.read(torch.tensor([3])), before)


def test_hashed_uniform_range():
    u = hashed_uniform(torch.arange(10000), 8, 1)
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01


def test_sum_rows_adds_duplicates():
    ids, grads = sum_rows(
        [torch.tensor([3, 1]), torch.tensor([1])], [torch.ones(2, 2), 2 * torch.ones(1, 2)]
    )
    assert ids.tolist() == [1, 3] and grads.tolist() == [[3.0, 3.0], [1.0, 1.0]]


def test_steps_bound_reads_by_applied_steps():
    bsp = Steps("bsp", 5, 2)
    assert bsp.can_read(0) and not bsp.can_read(1)
    assert not bsp.received(0, 1)
    assert not bsp.can_read(1) and not bsp.is_new(0, 1) and bsp.is_new(0, 0)
    assert bsp.received(0, 0)
    bsp.applied(0)
    assert bsp.can_read(1) and not bsp.is_new(0, 0) and bsp.applied_through == 0
    ssp = Steps("ssp", 2, 1)
    for step in (0, 2, 1):  # out of order: applied_through waits for step 1
        ssp.received(step, 0)
        ssp.applied(step)
        assert ssp.applied_through == (0 if step != 1 else 2)
    assert ssp.can_read(5) and not ssp.can_read(6)
    assert Steps("asp", 0, 2).can_read(100)


def test_task_queue_hands_out_in_order_bounded_and_requeues_lost_tasks():
    q = TaskQueue(total_steps=3, parts=2, mode="ssp", staleness=0)
    assert [q.take(0), q.take(1)] == [(0, 0), (0, 1)]
    assert q.take(0) is None  # step 1 may not read before step 0 is finished
    assert q.finish(0, (0, 0)) and q.take(0) is None
    assert q.lose(1) == [(0, 1)]
    assert q.take(0) == (0, 1)  # a lost task comes back first
    assert q.finish(0, (0, 1)) and q.finished_through == 0
    assert not q.finish(1, (0, 1))  # a zombie's report of the same task counts once
    assert not q.finish(0, (2, 0))  # never handed out
    assert [q.take(0), q.take(0)] == [(1, 0), (1, 1)]
    for part in (1, 0):
        assert q.finish(0, (1, part))
    assert [q.take(1), q.take(1), q.take(1)] == [(2, 0), (2, 1), None]
    assert q.finish(1, (2, 0)) and q.finish(1, (2, 1)) and q.done
    asp = TaskQueue(total_steps=10, parts=1, mode="asp", staleness=0)
    assert [asp.take(0) for _ in range(3)] == [(0, 0), (1, 0), (2, 0)]  # no bound


def test_task_queue_holds_at_a_checkpoint_and_rolls_back_to_it():
    q = TaskQueue(total_steps=6, parts=2, mode="asp", staleness=0)
    q.hold_at = 2
    got = [q.take(0) for _ in range(5)]
    assert got == [(0, 0), (0, 1), (1, 0), (1, 1), None]  # nothing of step 2 yet
    for task in got[:4]:
        q.finish(0, task)
    assert q.finished_through == 1  # every step before the checkpoint: shards are at it
    q.hold_at = None
    assert [q.take(1), q.take(1)] == [(2, 0), (2, 1)]
    assert q.finish(1, (2, 0)) and q.finish(1, (2, 1)) and q.finished_through == 2
    q.rollback(2)  # a shard died: back to the checkpoint of step 2
    assert q.finished_through == 1 and not q.held
    assert [q.take(0), q.take(0)] == [(2, 0), (2, 1)]  # step 2 is done again
    q.paused = True
    assert q.take(0) is None


@pytest.mark.timeout(30)
def test_server_checkpoint_and_restore_refuse_the_voided_work(tmp_path):
    srv = Server(0, b"k" * 32, OptimConfig(lr=0.1), "asp", 0, run_dir=tmp_path)
    thread = threading.Thread(target=srv.serve, daemon=True)
    thread.start()
    ctx = zmq.Context.instance()
    try:
        peer = Peer(ctx, srv.address, b"k" * 32, "w", CommCounter(), 5, target=srv.target)
        peer.call(
            {"op": "init", "parts": 1, "total_steps": 10, "tables": []},
            [torch.zeros(4), wire.strings_tensor(["w@0"])],
        )

        def push(step: int, gen: int = 0) -> None:
            peer.call({"op": "push", "step": step, "part": 0, "gen": gen}, [torch.ones(4)])

        def values(gen: int = 0) -> torch.Tensor:
            return peer.call({"op": "pull", "step": 0, "tables": [], "gen": gen})[1][0]

        push(0)
        with pytest.raises(PeerError, match="applied through 0"):
            peer.call({"op": "checkpoint", "step": 3})  # not at a step boundary
        peer.call({"op": "checkpoint", "step": 1})
        push(1)
        torch.testing.assert_close(values(), torch.full((4,), -0.2))
        peer.call({"op": "restore", "step": 1, "generation": 1})
        with pytest.raises(PeerError, match="stale"):
            push(1)  # handed out before the restore: void
        torch.testing.assert_close(values(gen=1), torch.full((4,), -0.1))  # step 1 undone
        push(1, gen=1)  # done again, applied once
        torch.testing.assert_close(values(gen=1), torch.full((4,), -0.2))
        # the peer is left to the collector, not closed: the next test's peers must still
        # reach their server (see gate.monitor_address)
    finally:
        srv.running = False
        thread.join(timeout=5)


@pytest.fixture
def server():
    srv = Server(0, b"k" * 32, OptimConfig(lr=0.1), "bsp", 0, max_message_bytes=1 << 16)
    thread = threading.Thread(target=srv.serve, daemon=True)
    thread.start()
    yield srv
    srv.running = False
    thread.join(timeout=5)


@pytest.mark.timeout(30)
def test_server_bsp_round_and_refusals(server):
    ctx = zmq.Context.instance()
    peers = [
        Peer(
            ctx,
            server.address,
            b"k" * 32,
            f"w{i}",
            CommCounter(),
            timeout_s=5,
            target=server.target,
        )
        for i in range(2)
    ]
    init = {"op": "init", "parts": 2, "total_steps": 10, "tables": []}
    for p in peers:
        p.call(init, [torch.zeros(4), wire.strings_tensor(["w@0"])])
    rid = peers[0].send(
        {"op": "push", "step": 0, "part": 0, "read_through": -1, "tables": []}, [torch.ones(4)]
    )
    peers[0].recv(rid)
    parked = peers[0].send({"op": "pull", "step": 1, "tables": []})
    assert not peers[0].sock.poll(300)  # BSP: waits for part 1 of step 0
    peers[1].call(
        {"op": "push", "step": 0, "part": 1, "read_through": -1, "tables": []}, [3 * torch.ones(4)]
    )
    _, (values,) = peers[0].recv(parked)
    torch.testing.assert_close(values, torch.full((4,), -0.2))  # mean gradient 2, lr 0.1
    with pytest.raises(PeerError, match="oversized"):
        peers[0].call({"op": "push", "step": 1, "part": 0, "tables": []}, [torch.zeros(20000)])
    assert peers[0].call({"op": "ping"})[0]["op"] == "pong"  # still served
    stranger = ctx.socket(zmq.DEALER)  # no credentials: its messages never reach the shard
    stranger.connect(server.address)
    stranger.send_multipart(wire.encode({"op": "pull", "step": 0, "tables": []}))
    assert not stranger.poll(1000)
    stranger.close(0)
    stats, _ = peers[0].call({"op": "stats"})
    assert stats["stats"]["rejected"] == {"oversized": 1}
    assert stats["stats"]["refused_at_door"] == {"handshake": 1}


@pytest.mark.timeout(30)
def test_server_survives_hostile_and_inconsistent_requests(server):
    ctx = zmq.Context.instance()
    peer = Peer(
        ctx, server.address, b"k" * 32, "w0", CommCounter(), timeout_s=5, target=server.target
    )
    init = {"op": "init", "parts": 2, "total_steps": 10}
    init["tables"] = [{"name": "t", "dim": 2, "init_std": 0.0, "seed": 0}]
    peer.call(init, [torch.zeros(4), wire.strings_tensor(["w@0"])])
    bad = [
        ({"op": "pull", "step": 0, "tables": ["nope"]}, [torch.tensor([1])]),  # no such table
        ({"op": "pull", "step": 0.5, "tables": []}, []),  # step not an integer
        ({"op": "pull", "tables": []}, []),  # no step
        ({"op": "push", "step": 0, "part": 7, "tables": []}, [torch.zeros(4)]),  # no such part
        ({"op": "push", "step": 0, "part": 0, "tables": []}, [torch.zeros(1)]),  # wrong size
        (
            {"op": "push", "step": 0, "part": 0, "tables": ["t"]},
            [torch.zeros(4), torch.tensor([1]), torch.ones(1, 3)],
        ),
    ]
    for header, tensors in bad:
        with pytest.raises(PeerError, match="malformed"):
            peer.call(header, tensors)
    peer.sock.send_multipart([b"[" * 60000])  # deep nesting: RecursionError in a JSON parser
    assert peer.sock.poll(3000)
    peer.sock.recv_multipart()
    # a table used twice in one push: both parts count (bsp: parts 0 and 1 of step 0)
    push = {"op": "push", "step": 0, "part": 0, "read_through": -1, "tables": ["t", "t"]}
    rows = [torch.tensor([1]), torch.ones(1, 2), torch.tensor([2]), torch.ones(1, 2)]
    peer.call(push, [torch.zeros(4), *rows])
    peer.call(push, [torch.zeros(4), *rows])  # the same task twice: counted once
    peer.call({**push, "part": 1}, [torch.zeros(4), *rows])
    _, (values,) = peer.call(
        {"op": "pull", "step": 1, "dense": False, "tables": ["t"]}, [torch.tensor([1, 2])]
    )
    torch.testing.assert_close(values, torch.full((2, 2), -0.1))  # both rows moved: lr 0.1 x grad 1
    assert peer.call({"op": "ping"})[0]["op"] == "pong"
    assert peer.call({"op": "stats"})[0]["stats"]["duplicates"] == 1


def test_remote_tables_are_never_allocated_and_rows_match_the_servers():
    torch.manual_seed(7)
    with remote_tables():
        remote = SparseEmbedding(10**12, 4, init_std=0.1)  # would be 16 TB if allocated
    assert remote.weight is None and count_parameters(remote) == 4 * 10**12
    torch.manual_seed(7)
    local = SparseEmbedding(1000, 4, init_std=0.1)
    shard = SparseTable(4, 0.1, local.seed, ServerOptimizer(OptimConfig(), 1))
    ids = torch.tensor([3, 999, 17])
    torch.testing.assert_close(shard.read(ids), local.weight[ids].detach())  # same rows
    stored = StoredRows(torch.tensor([17, 3]), torch.ones(2, 4))
    out = stored(remote, torch.tensor([[3, 5]]))
    assert out.shape == (1, 2, 4) and out[0, 0].eq(1).all()
    torch.testing.assert_close(out[0, 1], init_rows(torch.tensor([5]), 4, 0.1, remote.seed)[0])
    dense = stored.dense(local)
    assert dense[17].eq(1).all() and torch.equal(dense[999], local.weight[999].detach())


@pytest.mark.timeout(30)
def test_coordinator_answers_a_parked_task_request_when_another_worker_finishes_a_step(tmp_path):
    """Worker A waits for step 1; worker B's report (sent without waiting) must release it."""
    job = JobConfig()
    job.output.out = str(tmp_path)
    job.output.progress = False
    job.strategy.name = "ps"
    resolve(job)  # [strategy.ps] at its defaults: bsp
    assert job.strategy.options.mode == "bsp"
    coordinator = Coordinator(job, b"k" * 32, "tcp://127.0.0.1:0", 1, 3, 3)
    coordinator.start()
    ctx = zmq.Context.instance()
    node, a, b = (
        Peer(ctx, coordinator.address, b"k" * 32, who, CommCounter(), timeout_s=5)
        for who in ("node0", "a", "b")
    )
    try:
        node.call({"op": "node", "node_rank": 0, "workers": 2, "servers": 1})

        def ask(peer, worker, done=(), wait=True):
            header = {"op": "task", "worker": worker, "take": 1, "wait": wait}
            header["done"] = [{"task": list(t), "lr": 0.1} for t in done]
            return peer.send(header, [Window(samples=1).to_tensor() for _ in done])

        assert a.recv(ask(a, 0))[0]["tasks"] == [[0, 0]]
        assert b.recv(ask(b, 1))[0]["tasks"] == [[0, 1]]
        parked = ask(a, 0, done=[(0, 0)])
        assert not a.sock.poll(300)  # bsp: step 1 waits for step 0's other part
        assert b.recv(ask(b, 1, done=[(0, 1)], wait=False))[0]["tasks"] == [[1, 1]]
        assert a.recv(parked)[0]["tasks"] == [[1, 0]]  # released by B's report, served first
    finally:
        for peer in (node, a, b):
            peer.close()
        coordinator.stopped.set()
        coordinator.join(timeout=5)


def test_a_push_after_its_pull_reuses_the_lookup_and_changes_nothing():
    """The last lookup is reused for the same ids (a push after its pull); the rows and
    optimizer state equal a table that searched every time."""
    opt = ServerOptimizer(OptimConfig(name="adagrad", lr=0.1), 100)
    fast, slow = SparseTable(4, 0.01, 0, opt), SparseTable(4, 0.01, 0, opt)
    gen = torch.Generator().manual_seed(0)
    for step in range(6):
        ids = torch.unique(torch.randint(0, 60, (25,), generator=gen))  # ascending, unique
        grads = torch.randn(len(ids), 4, generator=gen)
        assert torch.equal(fast.read(ids), slow.read(ids))
        assert fast._last is not None
        fast.apply(*sum_rows([ids], [grads]), step)
        slow._last = None  # forces the search
        slow.apply(*sum_rows([ids.flip(0)], [grads.flip(0)]), step)  # the summing path
    everything = torch.arange(60)
    assert torch.equal(fast.read(everything), slow.read(everything))
    assert torch.equal(fast.state["sum"][: len(fast)], slow.state["sum"][: len(slow)])


def test_new_ids_wait_in_a_small_index_and_every_id_keeps_its_slot(monkeypatch):
    """Ids first seen go to a small sorted index, merged into the main one from time to
    time: through several merges every id keeps one slot (its row), found from either
    index, and what a checkpoint lists (keys, slots) is every id, sorted."""
    storage = importlib.import_module("shoal.strategies.ps.storage")

    monkeypatch.setattr(storage, "MERGE_AT", 50)
    table = SparseTable(2, 0.1, 3, ServerOptimizer(OptimConfig(), 10))
    gen, slot_of = torch.Generator().manual_seed(1), {}
    for _ in range(40):
        ids = torch.unique(torch.randint(0, 5000, (40,), generator=gen))
        rows = table.read(ids)
        for i, slot in zip(ids.tolist(), table.slots(ids).tolist()):
            assert slot_of.setdefault(i, slot) == slot
        assert torch.equal(rows, table.rows[table.slots(ids)])
    assert len(table._new_keys) < len(table) and len(table._keys) > 0  # both in use
    keys, slots = table.ids()
    assert keys.tolist() == sorted(slot_of) and len(table._new_keys) == 0  # (merged)
    assert dict(zip(keys.tolist(), slots.tolist())) == slot_of


def test_sum_rows_adds_duplicates_and_passes_ascending_rows_through():
    ids, grads = torch.tensor([3, 1, 3]), torch.ones(3, 2)
    unique, summed = sum_rows([ids], [grads])
    assert unique.tolist() == [1, 3] and summed.tolist() == [[1, 1], [2, 2]]
    ascending = torch.tensor([1, 4, 9])
    assert sum_rows([ascending], [grads])[0] is ascending


def test_hashed_rows_on_the_cpu_are_the_same_values_as_torch_computes_them():
    """The shard's numpy arithmetic for a new row's initial values is bit for bit the
    torch expression (a worker's local table, any device): wrapping products and
    arithmetic shifts on int64, for small and huge ids and any seed."""
    from shoal.models import sparse

    def in_torch(ids, dim, seed):
        x = ids.unsqueeze(1) * 0x9E3779B1 + torch.arange(dim, dtype=torch.int64) * 0x85EBCA77
        x = x + seed
        for mult, shift in sparse._ROUNDS:
            x = (x ^ (x >> shift)) * mult
        x = x ^ (x >> 31)
        return (x & ((1 << 24) - 1)).to(torch.float32) / float(1 << 24)

    gen = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.arange(3000), torch.randint(0, 2**62, (3000,), generator=gen)])
    for seed in (0, 7, 2**31 - 1):
        assert torch.equal(sparse.hashed_uniform(ids, 16, seed), in_torch(ids, 16, seed))
