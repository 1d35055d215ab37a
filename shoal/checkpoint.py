"""Atomic, verified checkpoints in ``RUN_DIR/checkpoints/step-NNNNNNNN/``.

A checkpoint is written into a hidden temporary directory and renamed into
place only when complete, so a crash never leaves a half-written one under a
real name. :class:`AsyncSaver` does the writing in a background thread, so
training stops only to copy its state. ``meta.json`` records the SHA-256 of
the state file; loading checks it, and :func:`load_latest` falls back to an
older checkpoint (with a warning) when the newest is truncated or corrupt.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.pt"
META_FILE = "meta.json"
SHARDS_DIR = "model"
"""In checkpoints of sharded strategies: the model and optimizer, as a DCP directory."""


class CheckpointError(Exception):
    """A checkpoint is missing, truncated or does not match its checksum."""


def snapshot(state: Any) -> Any:
    """A copy of ``state`` whose tensors own their memory (on the CPU): what training may
    change next cannot reach it. Containers are copied; other values are shared."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: snapshot(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(snapshot(v) for v in state)
    return state


class AsyncSaver:
    """Checkpoints written in a background thread; training waits only for the copy.

    :meth:`save` snapshots the state (the stall), then serializes, checksums,
    fsyncs and renames it into place in a thread, as :func:`save` does. At most
    one write is in flight: a second :meth:`save` first waits for the one
    before. :meth:`wait` (also before the run ends) re-raises a failed write.
    ``background=False`` writes in the caller's thread instead.
    """

    def __init__(self, run_dir: str | os.PathLike, keep: int = 3, background: bool = True) -> None:
        self.run_dir, self.keep, self.background = run_dir, keep, background
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.stall_s = 0.0
        """Seconds the caller was blocked, over all saves."""
        self.saves = 0

    def save(self, step: int, state: dict[str, Any]) -> None:
        start = time.perf_counter()
        self.wait()
        if not self.background:  # the same work in the caller's thread, for comparison
            save(self.run_dir, step, state, keep=self.keep)
            self.stall_s += time.perf_counter() - start
            self.saves += 1
            return
        copy = snapshot(state)
        self._thread = threading.Thread(
            target=self._write, args=(step, copy), name="shoal-checkpoint", daemon=True
        )
        self._thread.start()
        self.stall_s += time.perf_counter() - start
        self.saves += 1

    def save_sharded(
        self,
        step: int,
        state: dict[str, Any],
        write_shards: Callable[[Path], None],
        writer: bool,
    ) -> None:
        """A checkpoint whose model every rank writes its part of (``write_shards``, a
        collective DCP save into a hidden directory), then the writer adds ``state``,
        checksums every file and renames the whole into place. Synchronous."""
        import torch.distributed as dist

        start = time.perf_counter()
        self.wait()
        root = checkpoint_dir(self.run_dir)
        shards = root / f".tmp-shards-{step:08d}"
        if writer:  # what an interrupted save left
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(".tmp-shards-*"):
                shutil.rmtree(stale, ignore_errors=True)
        if dist.is_initialized():
            dist.barrier()
        write_shards(shards)
        if writer:
            save(self.run_dir, step, state, keep=self.keep, shards=shards)
        self.stall_s += time.perf_counter() - start
        self.saves += 1

    def _write(self, step: int, state: dict[str, Any]) -> None:
        try:
            save(self.run_dir, step, state, keep=self.keep)
        except BaseException as e:  # handed to the training thread by wait()
            self._error = e

    def wait(self) -> None:
        """Block until the write in flight is on disk; raise its error if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def step_path(run_dir: str | os.PathLike, step: int) -> Path:
    """The directory of the checkpoint of ``step``."""
    return checkpoint_dir(run_dir) / f"step-{step:08d}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save(
    run_dir: str | os.PathLike,
    step: int,
    state: dict[str, Any],
    keep: int = 3,
    shards: Path | None = None,
) -> Path:
    """Write ``state`` as the checkpoint of ``step``; keep the newest ``keep``.
    ``shards``, a finished DCP directory, moves into it as ``model/``."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    raw = buf.getvalue()
    _sweep(root)
    final = step_path(run_dir, step)
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    with (tmp / STATE_FILE).open("wb") as fh:
        fh.write(raw)
        fh.flush()
        os.fsync(fh.fileno())
    meta: dict[str, Any] = {"step": step, "sha256": _sha256(raw), "bytes": len(raw)}
    if shards is not None:
        os.rename(shards, tmp / SHARDS_DIR)
        meta["files"] = {
            str(f.relative_to(tmp)): _sha256(f.read_bytes())
            for f in sorted((tmp / SHARDS_DIR).rglob("*"))
            if f.is_file()
        }
    (tmp / META_FILE).write_text(json.dumps(meta))
    if final.exists():  # swap by renames: at every instant one complete copy has the real name
        trash = root / f".old-step-{step:08d}-{os.getpid()}"
        os.rename(final, trash)
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(root)
    prune(run_dir, step, keep)
    return final


def _sweep(root: Path) -> None:
    """Remove what writers killed mid-way left (``.tmp-``/``.old-`` of a dead pid)."""
    for path in root.iterdir():
        if path.name.startswith((".tmp-step-", ".old-step-")):
            pid = path.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                shutil.rmtree(path, ignore_errors=True)


def step_of(path: Path) -> int:
    return int(path.name.removeprefix("step-"))


def prune(run_dir: str | os.PathLike, step: int, keep: int) -> None:
    """After saving ``step``: drop checkpoints from beyond it (left over from before a
    resume that fell back), then all but the newest ``keep``."""
    existing = list_checkpoints(run_dir)
    for path in existing:
        if step_of(path) > step:
            shutil.rmtree(path, ignore_errors=True)
    kept = [p for p in existing if step_of(p) <= step]
    for old in kept[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def load(path: Path) -> dict[str, Any]:
    """Load and verify one checkpoint directory."""
    try:
        meta = json.loads((path / META_FILE).read_text())
        raw = (path / STATE_FILE).read_bytes()
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None
    if _sha256(raw) != meta.get("sha256"):
        raise CheckpointError(f"{path}: checksum mismatch (truncated or corrupt)")
    for name, digest in meta.get("files", {}).items():
        try:
            if _sha256((path / name).read_bytes()) != digest:
                raise CheckpointError(f"{path / name}: checksum mismatch (truncated or corrupt)")
        except OSError as e:
            raise CheckpointError(f"{path / name}: unreadable ({e})") from None
    return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)


def _flat_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # optimizer state keyed per parameter name ("state.block0.attn.wq.weight.exp_avg"),
    # not by position in a parameter group: groups differ between pipeline stages
    return StateDictOptions(flatten_optimizer_state_dict=True)


def write_shards(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The model and optimizer state as DCP, keyed by parameter name (whatever the
    layout: whole, FSDP or tensor shards, a pipeline stage's part). Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer, options=_flat_options())
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(directory))


def read_shards(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load what :func:`write_shards` wrote, under any layout, into this one. Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer, options=_flat_options())
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=_flat_options(),
    )


def load_latest(run_dir: str | os.PathLike) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that verifies, or ``None`` if there is none."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return path, load(path)
        except CheckpointError as e:
            print(f"shoal: warning: skipping checkpoint {e}", file=sys.stderr)
    return None
