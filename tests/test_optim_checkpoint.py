"""Learning-rate schedule, optimizers, atomic verified checkpoints."""

from __future__ import annotations

import math
import os

import pytest
import torch

from shoal import checkpoint
from shoal.config import OptimConfig
from shoal.optim import build_optimizer, build_scheduler, lr_factor


def test_warmup_then_cosine():
    cfg = OptimConfig(warmup_steps=10, schedule="cosine")
    assert lr_factor(0, 110, cfg) == pytest.approx(0.1)
    assert lr_factor(9, 110, cfg) == pytest.approx(1.0)
    assert lr_factor(60, 110, cfg) == pytest.approx(0.5)
    assert lr_factor(110, 110, cfg) == pytest.approx(0.0, abs=1e-12)


def test_linear_and_constant():
    assert lr_factor(50, 100, OptimConfig(schedule="linear")) == pytest.approx(0.5)
    assert lr_factor(99, 100, OptimConfig()) == 1.0


def test_scheduler_drives_the_torch_optimizer():
    p = torch.nn.Parameter(torch.zeros(2))
    cfg = OptimConfig(name="adamw", lr=0.1, schedule="cosine")
    opt = build_optimizer([p], cfg)
    assert isinstance(opt, torch.optim.AdamW)
    sched = build_scheduler(opt, cfg, total_steps=4)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.1 * 0.5 * (1 + math.cos(math.pi * t / 4)) for t in range(4)])


@pytest.mark.parametrize(
    "name, cls",
    [
        ("sgd", torch.optim.SGD),
        ("momentum", torch.optim.SGD),
        ("adam", torch.optim.Adam),
        ("adagrad", torch.optim.Adagrad),
    ],
)
def test_optimizer_names(name, cls):
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], OptimConfig(name=name))
    assert type(opt) is cls
    assert opt.param_groups[0].get("momentum", 0) == (0.9 if name == "momentum" else 0)


def test_checkpoint_round_trip_and_retention(tmp_path):
    for step in (10, 20, 30, 40):
        checkpoint.save(tmp_path, step, {"step": step, "w": torch.full((3,), float(step))}, keep=2)
    names = [p.name for p in checkpoint.list_checkpoints(tmp_path)]
    assert names == ["step-00000030", "step-00000040"]
    path, state = checkpoint.load_latest(tmp_path)
    assert path.name == "step-00000040" and torch.equal(state["w"], torch.full((3,), 40.0))
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


def test_corrupt_newest_falls_back_to_previous(tmp_path, capsys):
    checkpoint.save(tmp_path, 1, {"v": torch.ones(4)})
    newest = checkpoint.save(tmp_path, 2, {"v": torch.zeros(4)})
    raw = (newest / checkpoint.STATE_FILE).read_bytes()
    (newest / checkpoint.STATE_FILE).write_bytes(raw[: len(raw) // 2])  # truncated
    path, state = checkpoint.load_latest(tmp_path)
    assert path.name == "step-00000001" and torch.equal(state["v"], torch.ones(4))
    assert "checksum mismatch" in capsys.readouterr().err
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.load(newest)


def test_no_checkpoint(tmp_path):
    assert checkpoint.load_latest(tmp_path) is None


def test_saving_after_a_fallback_drops_the_stale_future(tmp_path):
    for step in (100, 200):
        checkpoint.save(tmp_path, step, {"v": torch.ones(1) * step}, keep=1 if step == 200 else 3)
    # pretend step-200 was corrupt and the run resumed from 100: its next save is 150
    checkpoint.save(tmp_path, 150, {"v": torch.zeros(1)}, keep=1)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-00000150"]


def test_saving_the_same_step_twice_replaces_it(tmp_path):
    checkpoint.save(tmp_path, 5, {"v": torch.ones(1)})
    checkpoint.save(tmp_path, 5, {"v": torch.zeros(1)})
    path, state = checkpoint.load_latest(tmp_path)
    assert path.name == "step-00000005" and state["v"].item() == 0
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000005"]


def test_background_save_keeps_the_state_of_its_moment(tmp_path):
    """Training goes on changing its tensors while the thread writes: the copy is taken first."""
    w = torch.zeros(1 << 20)
    nested = {"model": {"w": w}, "optim": [{"m": w * 2}], "step": 7}
    saver = checkpoint.AsyncSaver(tmp_path, keep=2)
    saver.save(7, nested)
    w.add_(1.0)  # the next optimizer step, while the write may still be running
    saver.save(8, nested)
    saver.wait()
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == [
        "step-00000007",
        "step-00000008",
    ]
    old = checkpoint.load(checkpoint.checkpoint_dir(tmp_path) / "step-00000007")
    new = checkpoint.load(checkpoint.checkpoint_dir(tmp_path) / "step-00000008")
    assert old["model"]["w"].max() == 0 and new["model"]["w"].min() == 1 and old["step"] == 7
    assert saver.saves == 2 and saver.stall_s > 0


def test_later_saves_copy_into_the_last_ones_memory_and_keep_their_own_moment(tmp_path):
    """From the second save on, the copy goes into the memory of the one before (written
    by then); each checkpoint still holds its own step's values, and a tensor whose shape
    changed gets memory of its own."""
    w, grown = torch.zeros(1 << 16), torch.zeros(3)
    state = {"model": {"w": w}, "optim": [{"m": grown}], "step": 1}
    saver = checkpoint.AsyncSaver(tmp_path, keep=3)
    saver.save(1, state)
    first = saver._staged["model"]["w"].data_ptr()
    for step in (2, 3):
        w.add_(1.0)
        state["optim"][0]["m"] = grown = torch.zeros(step + 3)
        saver.save(step, {**state, "step": step})
        assert saver._staged["model"]["w"].data_ptr() == first  # the same memory again
    saver.wait()
    for step in (1, 2, 3):
        got = checkpoint.load(checkpoint.checkpoint_dir(tmp_path) / f"step-{step:08d}")
        assert got["step"] == step and torch.equal(
            got["model"]["w"], torch.full((1 << 16,), step - 1.0)
        )
        assert got["optim"][0]["m"].shape == (3 if step == 1 else step + 3,)


def test_a_write_the_disk_refuses_is_said_once_and_a_bug_is_raised(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    saver = checkpoint.AsyncSaver(blocker)
    saver.save(1, {"v": torch.ones(1)})  # returns: the failure happens in the thread
    saver.wait()
    saver.wait()  # reported once
    assert saver.failed == 1
    assert capsys.readouterr().err.count("the checkpoint of step 1 was not written") == 1
    saver = checkpoint.AsyncSaver(tmp_path / "run")
    saver.save(2, {"v": lambda: 0})  # not serializable: a bug, not the disk
    with pytest.raises(Exception, match="pickle"):
        saver.wait()


def test_replacing_a_checkpoint_of_the_same_step_swaps_it_in_whole(tmp_path):
    checkpoint.save(tmp_path, 4, {"v": torch.zeros(1)})
    checkpoint.save(tmp_path, 4, {"v": torch.ones(1)})
    names = [p.name for p in checkpoint.checkpoint_dir(tmp_path).iterdir()]
    assert names == ["step-00000004"]  # nothing beside it: the old copy went with the swap
    assert checkpoint.load_latest(tmp_path)[1]["v"].item() == 1


def test_leftovers_of_a_killed_writer_are_swept(tmp_path):
    root = checkpoint.checkpoint_dir(tmp_path)
    dead = root / ".tmp-step-00000005-4194303"  # above pid_max: nobody's
    dead.mkdir(parents=True)
    (dead / checkpoint.STATE_FILE).write_bytes(b"half a checkpoint")
    mine = root / f".tmp-step-00000006-{os.getpid()}"  # a writer that is alive: left alone
    mine.mkdir()
    checkpoint.save(tmp_path, 7, {"v": torch.ones(1)})
    assert not dead.exists() and mine.exists()
