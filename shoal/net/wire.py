"""shoal's wire, spoken by the parameter server and by a federation's server and
clients: ZeroMQ multipart messages, never pickle.

A message is ``[header, frame, frame, ...]``. The header is a UTF-8 JSON
object with an ``op`` and a ``t`` list describing each tensor that follows as
``[dtype, shape]``; a tensor's raw bytes follow in frames of at most
:data:`FRAME_BYTES` (one frame for small tensors, sent and received without a
copy; larger ones are cut on sending without a copy and received frame by frame
into one buffer that the receiver reuses: :func:`receive`, :class:`Buffers`).
Listeners accept no larger frame, which is what bounds what a peer that has not
authenticated can make them hold (see :mod:`~shoal.net.gate`). :func:`decode`
and :func:`receive` check everything a hostile or broken peer could get wrong
(size of the header before it is parsed, JSON shape, dtypes, declared vs actual
byte counts, total size before anything is allocated) and raise
:class:`WireError` naming the kind of fault, which the receiver counts and
answers without dying.
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
"""The frame size every listener takes (``ZMQ_MAXMSGSIZE``), and the one a message uses
unless its header says otherwise (``f``)."""
LARGE_FRAME_BYTES = 1024 * 1024
"""The largest frame anyone takes: a client's connection (one per listener it talks to),
and a listener whose connections are few enough (:func:`shoal.net.gate.frame_bytes`)."""
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
        self.received: tuple[Any, int, Any] | None = None
        """(:func:`receive`) the first frame, the bytes received, the header frame."""


def _use_count(t: torch.Tensor) -> int:
    """References to ``t``'s storage (-1 where this torch cannot tell: never reused)."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    return count(t.untyped_storage()._cdata) if count is not None else -1


_ALONE = _use_count(torch.empty(1))
"""A buffer's storage use count when nothing but the buffer itself holds it."""


class Buffers:
    """Memory a receiver joins multi-frame tensors into, reused from one message to the
    next. Joining into fresh memory costs more than the copy itself (every page is
    faulted in and zeroed: about half of a 100 MB round trip on loopback); a buffer is
    taken again only once nothing refers to it any more (no tensor or view made on it
    is alive), so whatever a receiver keeps stays as it was received."""

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self.held: list[torch.Tensor] = []

    def take(self, nbytes: int) -> torch.Tensor:
        """``nbytes`` bytes (uint8) that nothing else refers to."""
        for b in self.held:
            if b.numel() == nbytes and _ALONE > 0 and _use_count(b) == _ALONE:
                return b
        b = torch.empty(nbytes, dtype=torch.uint8)
        self.held.append(b)
        if len(self.held) > self.keep:  # the oldest goes (its holder, if any, keeps it)
            del self.held[0]
        return b


def encode(
    header: dict[str, Any], tensors: list[torch.Tensor] = (), frame_bytes: int = FRAME_BYTES
) -> list[Any]:
    """Frames for ``header`` plus ``tensors`` (CPU tensors; their bytes are sent as
    views, never copied, in frames of at most ``frame_bytes``: more than
    :data:`FRAME_BYTES` only to a receiver that takes them, and then said in the
    header's ``f``)."""
    spec, raws = [], []
    for t in tensors:
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        spec.append([DTYPE_NAMES[t.dtype], list(t.shape)])
        raws.append(memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else b"")
    if frame_bytes != FRAME_BYTES and any(len(raw) > FRAME_BYTES for raw in raws):
        header = {**header, "f": frame_bytes}
    else:  # (no tensor needs more: the message says nothing of frames)
        frame_bytes = FRAME_BYTES
    frames: list[Any] = [b""]
    for raw in raws:
        frames.extend(raw[i : i + frame_bytes] for i in range(0, len(raw), frame_bytes))
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


def num_frames(nbytes: int, frame_bytes: int = FRAME_BYTES) -> int:
    """Frames a tensor of ``nbytes`` bytes travels in."""
    return max(1, -(-nbytes // frame_bytes))


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


def decode(
    frames: list[Any],
    max_bytes: int,
    buffers: Buffers | None = None,
    frame_cap: int = FRAME_BYTES,
) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """Parse and check a received message; raise :class:`WireError` if it is bad.
    Tensors of several frames are joined into memory from ``buffers`` (else fresh).
    ``frame_cap``: the largest frame size a message may say it uses (``f``)."""
    return _decode(_Frames(frames), max_bytes, buffers, frame_cap)


def receive(
    sock: Any,
    max_bytes: int,
    buffers: Buffers | None = None,
    routed: bool = False,
    frame_cap: int = FRAME_BYTES,
) -> tuple[Any, int, dict[str, Any], list[torch.Tensor]]:
    """Receive one message from ``sock`` frame by frame, each tensor of several frames
    straight into its buffer (no frame objects kept, no second copy): ``(first frame,
    bytes received, header, tensors)``, the first frame being a ROUTER's peer identity
    when ``routed`` (else the header). A bad message is read to its end (the socket
    stays in step) and raises :class:`WireError`, with :attr:`WireError.received` set.
    ``frame_cap`` is the socket's own (its ``MAXMSGSIZE``)."""
    source = _Socket(sock)
    first = sock.recv(copy=False)
    source.received = _view(first).nbytes
    try:
        if routed:
            source.head = sock.recv(copy=False) if first.more else None
            source.received += _view(source.head).nbytes if source.head is not None else 0
        else:
            source.head = first
        source.more = source.head is not None and source.head.more
        header, tensors = _decode(source, max_bytes, buffers, frame_cap)
    except WireError as e:
        source.drain()
        e.received = (first, source.received, source.head)
        raise
    return first, source.received, header, tensors


class _Frames:
    """The frames of a message already received, one after another."""

    def __init__(self, frames: list[Any]) -> None:
        self.frames, self.i = frames, 1

    def header(self) -> dict[str, Any]:
        return parse_header(self.frames)

    def left(self) -> bool:
        return self.i < len(self.frames)

    def next(self) -> memoryview:
        self.i += 1
        return _view(self.frames[self.i - 1])

    def into(self, out: np.ndarray) -> int:
        frame = self.next()
        if frame.nbytes == len(out):
            out[:] = np.frombuffer(frame, np.uint8)
        return frame.nbytes


class _Socket:
    """The frames of a message as they are received from a socket."""

    head: Any = None
    more = False
    received = 0

    def __init__(self, sock: Any) -> None:
        self.sock = sock

    def header(self) -> dict[str, Any]:
        return parse_header([self.head] if self.head is not None else [])

    def left(self) -> bool:
        return self.more

    def next(self) -> memoryview:
        frame = self.sock.recv(copy=False)
        self.more = frame.more
        view = _view(frame)
        self.received += view.nbytes
        return view

    def into(self, out: np.ndarray) -> int:
        n = self.sock.recv_into(out)  # (a longer frame is cut, and its length returned)
        self.more = bool(self.sock.rcvmore)
        self.received += n
        return n

    def drain(self) -> None:
        while self.more:
            self.next()


def _decode(
    source: _Frames | _Socket, max_bytes: int, buffers: Buffers | None, frame_cap: int
) -> tuple[dict[str, Any], list[torch.Tensor]]:
    header = source.header()
    size = header.get("f", FRAME_BYTES)  # the frame size this message's tensors are cut in
    if not (isinstance(size, int) and not isinstance(size, bool)):
        raise WireError("malformed", "f must be an integer")
    if not FRAME_BYTES <= size <= max(frame_cap, FRAME_BYTES):
        raise WireError("malformed", f"frames of {size} bytes: this receiver takes {frame_cap}")
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
    tensors = []
    for dtype, shape, want in layout:
        n = num_frames(want, size)
        if n == 1:  # no copy
            if not source.left():
                raise WireError("truncated", "fewer frames than the declared tensors")
            frame = source.next()
            if frame.nbytes != want:
                raise WireError("truncated", f"a frame of {frame.nbytes} bytes, header says {want}")
            tensors.append(
                torch.frombuffer(frame, dtype=dtype).reshape(shape)
                if want
                else torch.empty(shape, dtype=dtype)
            )
            continue
        out = buffers.take(want) if buffers is not None else torch.empty(want, dtype=torch.uint8)
        flat = out.numpy()
        for k in range(n):  # one copy, into memory of its own
            if not source.left():
                raise WireError("truncated", "fewer frames than the declared tensors")
            part = flat[k * size : (k + 1) * size]
            got = source.into(part)
            if got != len(part):
                raise WireError("truncated", f"a frame of {got} bytes where {len(part)} belong")
        tensors.append(out.view(dtype).reshape(shape))
    if source.left():
        raise WireError("truncated", "more frames than the declared tensors")
    return header, tensors


def request_id(frames: list[Any]) -> int | None:
    """The ``id`` of a request whose header parses, so even a refusal reaches its caller."""
    try:
        return header_id(parse_header(frames))
    except WireError:
        return None


def header_id(header: dict[str, Any]) -> int | None:
    """The ``id`` a parsed header carries, if it is an integer."""
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
