"""shoal's wire, spoken by the parameter server and by a federation's server and
clients: ZeroMQ multipart messages, never pickle.

A message is ``[header, frame, frame, ...]``. The header is a UTF-8 JSON
object with an ``op`` and a ``t`` list describing each tensor that follows as
``[dtype, shape]``; a tensor's raw bytes follow in frames of at most
:data:`FRAME_BYTES` (one frame for small tensors, sent and received without a
copy; larger ones are cut on sending without a copy and joined by one copy on
receipt). Listeners accept no larger frame, which is what bounds what a peer
that has not authenticated can make them hold (see
:mod:`~shoal.net.gate`). :func:`decode` checks everything a hostile
or broken peer could get wrong (size of the header before it is parsed, JSON
shape, dtypes, declared vs actual byte counts, total size before anything is
allocated) and raises :class:`WireError` naming the kind of fault, which the
receiver counts and answers without dying.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import warnings
from typing import Any

import numpy as np
import torch

FRAME_BYTES = 64 * 1024
"""The largest frame on the wire (``ZMQ_MAXMSGSIZE`` of every socket)."""
MAX_HEADER_BYTES = FRAME_BYTES
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
    "int8": torch.int8,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FAULTS = ("malformed", "truncated", "oversized", "stale")
"""Why a message is refused. ``stale``: work handed out before a restore."""

# Received buffers are read-only; tensors made on them are only ever read.
warnings.filterwarnings("ignore", message="The given buffer is not writable")


class WireError(Exception):
    """A message that must be refused; ``kind`` is one of :data:`FAULTS`."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


def encode(header: dict[str, Any], tensors: list[torch.Tensor] = ()) -> list[Any]:
    """Frames for ``header`` plus ``tensors`` (CPU tensors; their bytes are sent as
    views, never copied, in frames of at most :data:`FRAME_BYTES`)."""
    frames: list[Any] = [b""]
    spec = []
    for t in tensors:
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        spec.append([DTYPE_NAMES[t.dtype], list(t.shape)])
        raw = memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else b""
        frames.extend(raw[i : i + FRAME_BYTES] for i in range(0, len(raw), FRAME_BYTES))
        if not raw:
            frames.append(b"")
    frames[0] = json.dumps({**header, "t": spec}, separators=(",", ":")).encode()
    if len(frames[0]) > MAX_HEADER_BYTES:  # no socket would take it: say so here
        raise ValueError(
            f"a {header.get('op')!r} header of {len(frames[0])} bytes is over the "
            f"{MAX_HEADER_BYTES}-byte frame limit (send long lists as tensors)"
        )
    return frames


def strings_tensor(items: list[str]) -> torch.Tensor:
    """Strings as one uint8 tensor (for lists too long for a header)."""
    raw = bytearray("\n".join(items).encode())
    return torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)


def tensor_strings(t: torch.Tensor) -> list[str]:
    """The strings of :func:`strings_tensor`."""
    if t.dtype != torch.uint8 or t.dim() != 1:
        raise WireError("malformed", "strings must be a 1-d uint8 tensor")
    try:
        text = t.numpy().tobytes().decode()
    except UnicodeDecodeError:
        raise WireError("malformed", "strings are not UTF-8") from None
    return text.split("\n") if text else []


def num_frames(nbytes: int) -> int:
    """Frames a tensor of ``nbytes`` bytes travels in."""
    return max(1, -(-nbytes // FRAME_BYTES))


def _view(frame: Any) -> memoryview:
    return memoryview(frame.buffer if hasattr(frame, "buffer") else frame)


def parse_header(frames: list[Any]) -> dict[str, Any]:
    """The first frame as a JSON object with an ``op``; its size is checked first."""
    if not frames:
        raise WireError("malformed", "empty message")
    head = _view(frames[0])
    if head.nbytes > MAX_HEADER_BYTES:
        raise WireError("oversized", f"header of {head.nbytes} bytes")
    try:
        header = json.loads(bytes(head))
    except Exception:  # not JSON, or hostile JSON (deep nesting: RecursionError)
        raise WireError("malformed", "header is not JSON") from None
    if not isinstance(header, dict) or not isinstance(header.get("op"), str):
        raise WireError("malformed", "header is not an object with an op")
    return header


def decode(frames: list[Any], max_bytes: int) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """Parse and check a received message; raise :class:`WireError` if it is bad."""
    header = parse_header(frames)
    for key in ("step", "part", "worker", "read_through"):
        if key in header and not (
            isinstance(header[key], int) and not isinstance(header[key], bool)
        ):
            raise WireError("malformed", f"{key} must be an integer")
    spec = header.get("t", [])
    if not isinstance(spec, list):  # (its length is bounded by the header's size)
        raise WireError("malformed", "t must be a list")
    layout, total = [], 0
    for item in spec:  # every size is checked before anything is allocated
        dtype, shape = _check_spec(item)
        want = math.prod(shape) * dtype.itemsize
        total += want
        if total > max_bytes:
            raise WireError("oversized", f"message over the {max_bytes}-byte limit")
        layout.append((dtype, shape, want))
    if sum(num_frames(want) for _, _, want in layout) != len(frames) - 1:
        raise WireError("truncated", f"{len(frames) - 1} frames do not make the declared tensors")
    tensors, i = [], 1
    for dtype, shape, want in layout:
        n = num_frames(want)
        parts = [_view(f) for f in frames[i : i + n]]
        i += n
        sizes = [p.nbytes for p in parts]
        if sizes != [min(FRAME_BYTES, want - k * FRAME_BYTES) for k in range(n)]:
            raise WireError("truncated", f"frames of {sum(sizes)} bytes, header says {want}")
        if not want:
            tensors.append(torch.empty(shape, dtype=dtype))
        elif n == 1:  # no copy
            tensors.append(torch.frombuffer(parts[0], dtype=dtype).reshape(shape))
        else:  # one copy, into memory of its own
            out = torch.empty(want, dtype=torch.uint8)
            flat = out.numpy()
            for k, p in enumerate(parts):
                flat[k * FRAME_BYTES : k * FRAME_BYTES + p.nbytes] = np.frombuffer(p, np.uint8)
            tensors.append(out.view(dtype).reshape(shape))
    return header, tensors


def request_id(frames: list[Any]) -> int | None:
    """The ``id`` of a request whose header parses, so even a refusal reaches its caller."""
    try:
        header = parse_header(frames)
    except WireError:
        return None
    rid = header.get("id")
    return rid if isinstance(rid, int) and not isinstance(rid, bool) else None


def _check_spec(item: Any) -> tuple[torch.dtype, list[int]]:
    if not (
        isinstance(item, list)
        and len(item) == 2
        and item[0] in DTYPES
        and isinstance(item[1], list)
    ):
        raise WireError("malformed", f"bad buffer description {str(item)[:80]}")
    shape = item[1]
    if len(shape) > 8 or not all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape
    ):
        raise WireError("malformed", f"bad shape {str(shape)[:80]}")
    return DTYPES[item[0]], shape


def message_bytes(frames: list[Any]) -> int:
    """Bytes a message puts on the wire (payload of every frame)."""
    total = 0
    for f in frames:
        if hasattr(f, "buffer"):
            total += memoryview(f.buffer).nbytes
        elif hasattr(f, "nbytes"):
            total += f.nbytes
        else:
            total += len(f)
    return total


# --- the job's secret ---------------------------------------------------------------

SECRET_ENV = "SHOAL_SECRET"
"""The job's shared secret (hex), which every peer proves it knows (see
:mod:`shoal.net.gate`); set by the launcher, or by the user for machines it does not
start (``shoal federate`` clients)."""
OLD_SECRET_ENV = "SHOAL_PS_SECRET"
"""The name it had when only the parameter server spoke this wire: still read."""


def secret_hex() -> str:
    """The secret as set in this process's environment, under either name ("" if none)."""
    return os.environ.get(SECRET_ENV, "") or os.environ.get(OLD_SECRET_ENV, "")


def load_secret() -> bytes:
    """The job's shared secret: ``SHOAL_SECRET`` (hex), at least 16 bytes."""
    try:
        secret = bytes.fromhex(secret_hex())
    except ValueError:
        secret = b""
    if len(secret) < 16:
        raise RuntimeError(f"{SECRET_ENV} must hold at least 16 bytes as hex")
    return secret


def new_secret() -> str:
    return secrets.token_hex(32)
