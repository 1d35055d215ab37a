"""The parameter server's wire: ZeroMQ multipart messages, never pickle.

A message is ``[header, buffer, buffer, ...]``. The header is a UTF-8 JSON
object with an ``op`` and a ``t`` list describing each following buffer as
``[dtype, shape]``; buffers are raw tensor bytes, sent and received without a
copy. :func:`decode` checks everything a hostile or broken peer could get
wrong (size of the header, JSON shape, dtypes, declared vs actual byte counts,
total size) and raises :class:`WireError` naming the kind of fault, which the
receiver counts and answers without dying.

Authentication is a per-connection challenge/response on a shared secret
(:class:`Authenticator`): ``hello`` -> ``challenge{nonce}`` ->
``auth{mac=HMAC-SHA256(secret, nonce)}``. The secret itself never crosses the
wire, and once a connection is authenticated its messages carry no per-message
MAC, so 100 MB tensors cost nothing extra. It authenticates; it does not
encrypt.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import secrets
import warnings
from typing import Any

import torch

from shoal.config import JobConfig

MAX_HEADER_BYTES = 64 * 1024
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
FAULTS = ("malformed", "truncated", "oversized", "unauthenticated", "stale")
"""Why a message is refused. ``stale``: work handed out before a restore."""

# Received buffers are read-only; tensors made on them are only ever read.
warnings.filterwarnings("ignore", message="The given buffer is not writable")


class WireError(Exception):
    """A message that must be refused; ``kind`` is one of :data:`FAULTS`."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


def encode(header: dict[str, Any], tensors: list[torch.Tensor] = ()) -> list[Any]:
    """Frames for ``header`` plus ``tensors`` (contiguous CPU tensors, sent zero-copy)."""
    frames: list[Any] = [b""]
    spec = []
    for t in tensors:
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        spec.append([DTYPE_NAMES[t.dtype], list(t.shape)])
        frames.append(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")
    frames[0] = json.dumps({**header, "t": spec}, separators=(",", ":")).encode()
    return frames


def decode(frames: list[Any], max_bytes: int) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """Parse and check a received message; raise :class:`WireError` if it is bad."""
    if not frames:
        raise WireError("malformed", "empty message")
    head = memoryview(frames[0].buffer if hasattr(frames[0], "buffer") else frames[0])
    if head.nbytes > MAX_HEADER_BYTES:
        raise WireError("oversized", f"header of {head.nbytes} bytes")
    try:
        header = json.loads(bytes(head))
    except Exception:  # not JSON, or hostile JSON (deep nesting: RecursionError)
        raise WireError("malformed", "header is not JSON") from None
    if not isinstance(header, dict) or not isinstance(header.get("op"), str):
        raise WireError("malformed", "header is not an object with an op")
    for key in ("step", "part", "worker", "read_through"):
        if key in header and not (
            isinstance(header[key], int) and not isinstance(header[key], bool)
        ):
            raise WireError("malformed", f"{key} must be an integer")
    spec = header.get("t", [])
    if not isinstance(spec, list) or len(spec) != len(frames) - 1:
        raise WireError(
            "truncated",
            f"header declares {len(spec) if isinstance(spec, list) else '?'} buffers, "
            f"got {len(frames) - 1}",
        )
    tensors, total = [], 0
    for item, frame in zip(spec, frames[1:]):
        dtype, shape = _check_spec(item)
        want = math.prod(shape) * dtype.itemsize
        total += want
        if total > max_bytes:
            raise WireError("oversized", f"message over the {max_bytes}-byte limit")
        buf = memoryview(frame.buffer if hasattr(frame, "buffer") else frame)
        if buf.nbytes != want:
            raise WireError("truncated", f"buffer of {buf.nbytes} bytes, header says {want}")
        tensors.append(
            torch.frombuffer(buf, dtype=dtype).reshape(shape)
            if want
            else torch.empty(shape, dtype=dtype)
        )
    return header, tensors


def request_id(frames: list[Any]) -> int | None:
    """The ``id`` of a request whose header parses, so even a refusal reaches its caller."""
    try:
        head = frames[0]
        header = json.loads(bytes(head.buffer if hasattr(head, "buffer") else head))
    except Exception:
        return None
    rid = header.get("id") if isinstance(header, dict) else None
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


# --- authentication ---------------------------------------------------------------------

SECRET_ENV = "SHOAL_PS_SECRET"
COORDINATOR_ENV = "SHOAL_PS_COORDINATOR"
"""Where workers and servers find the coordinator (set by the launcher)."""
HOST_ENV = "SHOAL_PS_HOST"
"""The address this machine's servers listen on (set by the launcher)."""
BIND_ENV = "SHOAL_PS_BIND"
"""The exact address a restarted server binds: the one its predecessor had."""


def max_message_bytes(job: JobConfig) -> int:
    """The largest message a peer accepts, from ``--ps-max-message-mb``."""
    return int(job.strategy.ps_max_message_mb * 1024 * 1024)


def load_secret() -> bytes:
    """The job's shared secret: ``SHOAL_PS_SECRET`` (hex), set by the launcher."""
    value = os.environ.get(SECRET_ENV, "")
    try:
        secret = bytes.fromhex(value)
    except ValueError:
        secret = b""
    if len(secret) < 16:
        raise RuntimeError(f"{SECRET_ENV} must hold at least 16 bytes as hex")
    return secret


def new_secret() -> str:
    return secrets.token_hex(32)


def mac(secret: bytes, nonce: str) -> str:
    return hmac.new(secret, b"shoal-ps-auth|" + nonce.encode(), hashlib.sha256).hexdigest()


class Authenticator:
    """Server side of the handshake: which connections have proven the secret."""

    def __init__(self, secret: bytes) -> None:
        self.secret = secret
        self.nonces: dict[bytes, str] = {}
        self.peers: set[bytes] = set()

    def handle(self, peer: bytes, header: dict[str, Any]) -> dict[str, Any] | None:
        """Answer a handshake message, or ``None`` if ``header`` is not one."""
        op = header["op"]
        if op == "hello":
            if len(self.nonces) > 10_000:  # many half-open handshakes: forget the oldest
                self.nonces.pop(next(iter(self.nonces)))
            nonce = secrets.token_hex(16)
            self.nonces[peer] = nonce
            return {"op": "challenge", "nonce": nonce}
        if op == "auth":
            nonce = self.nonces.pop(peer, None)
            given = header.get("mac")
            if (
                nonce is None
                or not isinstance(given, str)
                or not hmac.compare_digest(given, mac(self.secret, nonce))
            ):
                raise WireError("unauthenticated", "bad handshake")
            self.peers.add(peer)
            return {"op": "ok"}
        return None

    def check(self, peer: bytes) -> None:
        if peer not in self.peers:
            raise WireError("unauthenticated", "request before the handshake")
