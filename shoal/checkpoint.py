"""Atomic, verified checkpoints in ``RUN_DIR/checkpoints/step-NNNNNNNN/``.

A checkpoint is written into a hidden temporary directory and renamed into
place only when complete, so a crash never leaves a half-written one under a
real name. :class:`AsyncSaver` does the writing in a background thread, so
training stops only to copy its state. ``meta.json`` records the SHA-256 of
the state file; loading checks it, and :func:`load_latest` falls back to an
older checkpoint (with a warning) when the newest is truncated or corrupt.
Files and directories are fsynced before and after the rename; a checkpoint that
replaces one of the same step is swapped in atomically (``RENAME_EXCHANGE``). A
write the disk refuses (full) removes its partial files and is reported in one
line; training goes on. State is loaded with ``weights_only``, and a sharded
checkpoint's DCP metadata through an allow-list, so that a run directory from
someone else cannot run code (:func:`read_dcp_metadata`).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import io
import json
import os
import pickle
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from shoal.errors import UserError
from shoal.layout import CHECKPOINTS_DIR

STATE_FILE = "state.pt"
META_FILE = "meta.json"
SHARDS_DIR = "model"
"""In checkpoints of sharded strategies: the model and optimizer, as a DCP directory."""


class CheckpointError(Exception):
    """A checkpoint is missing, truncated or does not match its checksum."""


def snapshot(state: Any, into: Any = None) -> Any:
    """A copy of ``state`` whose tensors own their memory (on the CPU): what training may
    change next cannot reach it. Containers are copied; other values are shared. Tensors
    are copied into the matching tensors of ``into`` (an earlier snapshot of the same
    shapes, no longer used) where there are any: filling memory already touched costs a
    fraction of filling fresh memory, whose pages are faulted in and zeroed first."""
    if isinstance(state, torch.Tensor):
        t = state.detach()
        if (
            isinstance(into, torch.Tensor)
            and into.shape == t.shape
            and into.dtype == t.dtype
            and into.device.type == "cpu"
            and into.is_contiguous()
        ):
            return into.copy_(t)
        return t.to("cpu", copy=True)
    if isinstance(state, dict):
        old = into if isinstance(into, dict) else {}
        return {k: snapshot(v, old.get(k)) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        old = into if isinstance(into, (list, tuple)) and len(into) == len(state) else ()
        return type(state)(snapshot(v, old[i] if old else None) for i, v in enumerate(state))
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
        self._error_step = -1
        self.stall_s = 0.0
        """Seconds the caller was blocked, over all saves."""
        self.saves = 0
        self.failed = 0
        """Saves that could not be written (a full disk, say): each said so in one line."""
        self._staged: Any = None
        """The last save's snapshot, written already: the next one is copied into it."""

    def save(self, step: int, state: dict[str, Any]) -> None:
        start = time.perf_counter()
        self.wait()
        if not self.background:  # the same work in the caller's thread, for comparison
            self._write(step, state)
            self.wait()
            self.stall_s += time.perf_counter() - start
            self.saves += 1
            return
        copy = self._staged = snapshot(state, self._staged)
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
        try:  # a failure reaches every rank: DCP gathers each rank's outcome
            write_shards(shards)
            if writer:
                save(self.run_dir, step, state, keep=self.keep, shards=shards)
        except Exception as e:
            if not _write_failure(e):
                raise
            if writer:
                shutil.rmtree(shards, ignore_errors=True)
                self._failed(step, e)
        self.stall_s += time.perf_counter() - start
        self.saves += 1

    def _write(self, step: int, state: dict[str, Any]) -> None:
        try:
            save(self.run_dir, step, state, keep=self.keep)
        except BaseException as e:  # handed to the training thread by wait()
            self._error = e
            self._error_step = step

    def _failed(self, step: int, error: BaseException) -> None:
        why = getattr(error, "strerror", None) or str(error).splitlines()[0][:200]
        print(
            f"shoal: warning: the checkpoint of step {step} was not written ({why}); "
            "training goes on and the next checkpoint is tried as usual",
            file=sys.stderr,
            flush=True,
        )
        self.failed += 1

    def wait(self) -> None:
        """Block until the write in flight is on disk. A write the disk refused (full,
        read-only) is reported in one line and training goes on; other errors are raised."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            if not _write_failure(error):
                raise error
            self._failed(self._error_step, error)

    def settle(self) -> None:
        """Finish the write in flight while another error is on its way up: the checkpoint
        is kept if it completes, and its own failure is said in one line, not raised."""
        try:
            self.wait()
        except Exception as e:
            self._failed(self._error_step, e)


def _write_failure(error: BaseException) -> bool:
    """Whether ``error`` is the filesystem refusing a write (also as DCP reports it)."""
    if isinstance(error, OSError):
        return True
    text = str(error)
    return any(s in text for s in ("No space left", "Disk quota", "Read-only file system"))


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


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
    try:
        tmp.mkdir()
        _write_synced(tmp / STATE_FILE, raw)
        meta: dict[str, Any] = {"step": step, "sha256": _sha256(raw), "bytes": len(raw)}
        if shards is not None:
            os.rename(shards, tmp / SHARDS_DIR)
            meta["files"] = {
                str(f.relative_to(tmp)): _sha256(f.read_bytes())
                for f in sorted((tmp / SHARDS_DIR).rglob("*"))
                if f.is_file()
            }
        _write_synced(tmp / META_FILE, json.dumps(meta).encode())
        _fsync_dir(tmp)
    except BaseException:  # a full disk, say: no partial checkpoint stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        if not final.exists():
            os.rename(tmp, final)
        elif _exchange(tmp, final):  # one atomic swap: a complete copy has the name throughout
            shutil.rmtree(tmp, ignore_errors=True)
        else:  # no renameat2 here: the old copy steps aside for an instant
            trash = root / f".old-step-{step:08d}-{os.getpid()}"
            os.rename(final, trash)
            os.rename(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(root)
    prune(run_dir, step, keep)
    return final


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directory entries atomically (Linux ``renameat2(RENAME_EXCHANGE)``);
    ``False`` where the system or filesystem does not offer it."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


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
    if (path / SHARDS_DIR / ".metadata").is_file():  # before anyone hands it to DCP
        read_dcp_metadata(path / SHARDS_DIR / ".metadata")
    return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)


# --- sharded checkpoints read without running code -------------------------------------

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
SAFE_GLOBALS = {
    _DCP_METADATA: {
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath"},
    "collections": {"OrderedDict"},
}
"""What DCP's ``.metadata`` pickle may name: its own dataclasses and torch's plain types."""


class UnsafeCheckpoint(UserError):
    """A checkpoint whose files would run code when loaded: refused, never loaded."""


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata; any other class or function is refused before it exists."""

    def find_class(self, module: str, name: str) -> Any:
        if name in SAFE_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise _Refused(f"{module}.{name}"[:120])


class _Refused(pickle.UnpicklingError):
    """A name outside :data:`SAFE_GLOBALS`."""


def read_dcp_metadata(path: Path) -> Any:
    """DCP's ``.metadata`` of the sharded checkpoint in ``path``, read with an allow-list
    (:data:`SAFE_GLOBALS`); a file that names anything else raises
    :class:`UnsafeCheckpoint`."""
    try:
        with path.open("rb") as fh:
            metadata = _MetadataUnpickler(fh).load()
    except _Refused as e:
        raise UnsafeCheckpoint(
            f"{path}: names {e}, which no checkpoint of shoal holds; refusing to load it "
            "(was the run directory written by someone else?)"
        ) from None
    except Exception as e:  # a corrupt pickle, or one that builds nonsense: not a checkpoint
        raise CheckpointError(f"{path}: unreadable DCP metadata ({type(e).__name__})") from None
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        where = Path(str(getattr(info, "relative_path", "")))
        if where.is_absolute() or ".." in where.parts:
            raise UnsafeCheckpoint(
                f"{path}: points at {where}, outside the checkpoint; refusing to load it"
            )
    return metadata


def _safe_dcp() -> tuple[Any, Any]:
    """DCP's file reader and load planner, without their two pickle loads: metadata
    through :func:`read_dcp_metadata`, non-tensor values with ``weights_only``."""
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            metadata = read_dcp_metadata(Path(self._get_metadata_path(kwargs.get("rank"))))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            loaded = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._traverse import set_element

                mapping = self.mappings[read_item.dest_index.fqn]
                set_element(self.original_state_dict, mapping, loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return Reader, Planner


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
    reader, planner = _safe_dcp()
    dcp.load(state, storage_reader=reader(str(directory)), planner=planner())
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
