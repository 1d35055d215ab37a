"""What the federation server takes from a client, checked field by field.

A client process authenticated with the job's secret may still be broken or
hostile. Every message the server of :mod:`~.remote` receives is parsed here
into a typed value before anything in it is used; whatever does not fit raises
:class:`Refused`, which the server counts (by kind) and answers with an error,
and the round goes on. The checks are those that need nothing but the message
(and the size of the model): exact fields, types, hex, sizes, finite numbers,
tensors' dtype and shape, valid X25519 points. Whether a client's message fits
the round (its client was handed to that connection, the ids are the round's
clients, the step is under way) is the server's to check.

Each message has exactly its fields (``id``, the request id, is an integer;
``t``, the wire's tensor list, is read by :func:`shoal.net.wire.decode`;
fields in brackets may be left out: ``holds``, the client whose own rows a process
brings, and ``examples``, a client's count of its rows, both integers):

==========  ========================================  ==================================
op          fields                                    tensors
==========  ========================================  ==================================
hello       nonce (a string of 1 to 64 characters)    none
join                                                  none
work        [holds]                                   none
update      round, client, loss_sum, [examples]       the change: float64, [numel]
update      ..., keys (secure aggregation)            none
shares      round, client, mail                       none
masked      round, client                             the masked input: int64, [numel + 3]
answers     round, client, answers                    none
(a step)    round, client, refused (a reason)         none
==========  ========================================  ==================================

A client whose own checks refuse a step of secure aggregation (see
:mod:`shoal.secagg`) answers it with its reason instead (``shares``, ``masked`` or
``answers`` with ``refused``): it drops out of the round.

Hex is ASCII hex digits only (no ``0x``, sign, ``_`` or white space; Python's
``int(x, 16)`` takes all of those, and other scripts' digits). Byte strings are
hex of even length and their exact size; a share is hex of at most
:data:`SHARE_DIGITS` digits below the Shamir prime. Client ids in JSON keys are
decimal without leading zeros.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from shoal import secagg

KEY_BYTES = 32
"""An X25519 public key, raw."""
SHARE_BYTES = 66
"""One number of a shares blob's plaintext (see :meth:`shoal.secagg.Client.share_keys`)."""
BLOB_BYTES = 12 + 4 * SHARE_BYTES + 16
"""A shares blob: AES-GCM nonce, plaintext (from, to, two shares), tag."""
SHARE_DIGITS = 2 * SHARE_BYTES
"""The most hex digits of a share sent to be unmasked (a value below 2**521 - 1)."""
MAX_LOSS_SUM = 1e300
"""The largest loss sum a client may report: the round's sum of them stays finite."""
MAX_ID = 2**62
"""Round numbers and client ids are below this."""
MAX_NONCE = 64
MAX_REASON = 200
"""The longest reason a client gives for refusing a step."""

_HEX = re.compile(r"[0-9a-fA-F]+")
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,17}")
_BASE = frozenset({"op", "id", "t"})
FIELDS: dict[str, frozenset[str]] = {
    "hello": _BASE | {"nonce"},
    "join": _BASE,
    "work": _BASE | {"holds"},
    "update": _BASE | {"round", "client", "loss_sum", "examples"},
    "shares": _BASE | {"round", "client", "mail"},
    "masked": _BASE | {"round", "client"},
    "answers": _BASE | {"round", "client", "answers"},
}
"""Each request's fields (an ``update`` under secure aggregation adds ``keys``)."""
STEP_REPLIES = ("shares", "masked", "answers")
OPTIONAL = frozenset({"t", "holds", "examples"})


class Refused(Exception):
    """A message the server must not take; ``kind`` is what ``refused()`` counts it as."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


@dataclass(frozen=True)
class Message:
    """A request that passed its checks. ``round``/``client`` are -1 where it has none."""

    op: str
    id: int
    round: int = -1
    client: int = -1
    nonce: str = ""
    holds: int | None = None
    loss_sum: float = 0.0
    examples: int | None = None
    change: torch.Tensor | None = None
    keys: tuple[bytes, bytes] | None = None
    mail: dict[int, bytes] | None = None
    masked: np.ndarray | None = None
    answers: dict[int, tuple[str, int]] | None = None
    declined: str = ""


def parse(header: dict[str, Any], tensors: list[torch.Tensor], numel: int, secure: bool) -> Message:
    """``header`` and ``tensors`` (as :func:`~shoal.net.wire.decode` gave them)
    as a :class:`Message`; raises :class:`Refused` (kind ``malformed``) where a field is
    missing, extra or wrong. ``numel``: the model's size; ``secure``: whether the
    federation runs secure aggregation."""
    for key in ("round", "client"):  # first: ids are integers (a list would not even hash)
        if key in header:
            integer(header[key], key)
    op = header["op"]
    fields = FIELDS.get(op)
    if fields is None or (op in STEP_REPLIES and not secure):
        raise Refused("malformed", f"unknown op {op[:32]!r}")
    if op == "update" and secure:
        fields = fields | {"keys"}
    if op in STEP_REPLIES and "refused" in header:
        fields = _BASE | {"round", "client", "refused"}
    extra, missing = set(header) - fields, fields - OPTIONAL - set(header)
    if extra or missing:
        what = f"unknown fields {sorted(extra)[:4]}" if extra else f"missing {sorted(missing)}"
        raise Refused("malformed", f"{op}: {what}"[:200])
    rid = integer(header["id"], "id", 2**63)
    if op == "hello":
        nonce = header["nonce"]
        if not isinstance(nonce, str) or not 0 < len(nonce) <= MAX_NONCE:
            raise Refused("malformed", f"nonce must be a string of 1 to {MAX_NONCE} characters")
        return Message(op, rid, nonce=nonce, **_no_tensors(op, tensors))
    if op in ("join", "work"):
        holds = integer(header["holds"], "holds") if "holds" in header else None
        return Message(op, rid, holds=holds, **_no_tensors(op, tensors))
    at = {"round": integer(header["round"], "round"), "client": integer(header["client"], "client")}
    if op == "update":
        loss = number(header["loss_sum"], "loss_sum", MAX_LOSS_SUM)
        if "examples" in header:
            at["examples"] = integer(header["examples"], "examples")
        if secure:
            keys = header["keys"]
            if not (isinstance(keys, list) and len(keys) == 2):
                raise Refused("malformed", "keys must be a list of two public keys")
            pair = (hex_bytes(keys[0], KEY_BYTES, "keys"), hex_bytes(keys[1], KEY_BYTES, "keys"))
            return Message(op, rid, **at, loss_sum=loss, keys=pair, **_no_tensors(op, tensors))
        change = tensor(tensors, torch.float64, numel, "the change")
        if not bool(torch.isfinite(change).all()):
            raise Refused("malformed", "the change is not finite")
        return Message(op, rid, **at, loss_sum=loss, change=change)
    if "refused" in header:
        why = header["refused"]
        if not isinstance(why, str) or not 0 < len(why) <= MAX_REASON:
            raise Refused("malformed", f"refused must be a reason of 1 to {MAX_REASON} characters")
        return Message(op, rid, **at, declined=why, **_no_tensors(op, tensors))
    if op == "masked":
        masked = tensor(tensors, torch.int64, numel + 3, "the masked input")
        return Message(op, rid, **at, masked=masked.numpy().view(np.uint64).copy())
    if op == "shares":
        mail = ids_dict(header["mail"], "mail")
        return Message(op, rid, **at, mail={v: hex_bytes(b, BLOB_BYTES, "mail")
                                            for v, b in mail.items()},
                       **_no_tensors(op, tensors))  # fmt: skip
    answers = ids_dict(header["answers"], "answers")
    return Message(op, rid, **at, answers={u: share(a) for u, a in answers.items()},
                   **_no_tensors(op, tensors))  # fmt: skip


def _no_tensors(op: str, tensors: list[torch.Tensor]) -> dict:
    if tensors:
        raise Refused("malformed", f"{op} carries no tensors")
    return {}


def integer(value: Any, what: str, bound: int = MAX_ID) -> int:
    """``value`` if it is an integer (not a bool) in ``[0, bound)``."""
    if type(value) is not int or not 0 <= value < bound:
        raise Refused("malformed", f"{what} must be an integer")
    return value


def number(value: Any, what: str, bound: float) -> float:
    """``value`` as a float, if it is a finite number (not a bool) of at most ``bound``
    in size. (JSON's ``1e400`` parses to inf, and ``10**400`` to an int no float holds.)"""
    if type(value) not in (int, float) or not abs(value) <= bound:  # (NaN is never <=)
        raise Refused("malformed", f"{what} must be a finite number of at most {bound:g}")
    return float(value)


def hex_bytes(value: Any, size: int, what: str) -> bytes:
    """``value``, hex of exactly ``size`` bytes, as bytes."""
    if not (isinstance(value, str) and len(value) == 2 * size and _HEX.fullmatch(value)):
        raise Refused("malformed", f"{what} must be {size} bytes as hex")
    return bytes.fromhex(value)


def client_id(key: Any, what: str) -> int:
    """A JSON object's key as a client id (decimal, no sign, no leading zero)."""
    if not (isinstance(key, str) and _DECIMAL.fullmatch(key)):
        raise Refused("malformed", f"{what}: keys must be client ids")
    return int(key)


def ids_dict(value: Any, what: str) -> dict[int, Any]:
    """A JSON object keyed by client ids, with its keys as ints."""
    if not isinstance(value, dict):
        raise Refused("malformed", f"{what} must be an object keyed by client ids")
    return {client_id(k, what): v for k, v in value.items()}


def share(value: Any) -> tuple[str, int]:
    """An answer of the unmask step: ``["b" | "s", hex]``, the share below the prime."""
    if not (isinstance(value, list) and len(value) == 2 and value[0] in ("b", "s")):
        raise Refused("malformed", 'answers must be ["b" or "s", a share as hex]')
    digits = value[1]
    if not (isinstance(digits, str) and len(digits) <= SHARE_DIGITS and _HEX.fullmatch(digits)):
        raise Refused("malformed", f"a share must be hex of at most {SHARE_DIGITS} digits")
    y = int(digits, 16)
    if y >= secagg.PRIME:
        raise Refused("malformed", "a share must be below the field's prime")
    return value[0], y


def tensor(tensors: list[torch.Tensor], dtype: torch.dtype, numel: int, what: str) -> torch.Tensor:
    """The one tensor a message carries: ``dtype``, one dimension of ``numel``."""
    if len(tensors) != 1:
        raise Refused("malformed", f"{what}: one tensor, not {len(tensors)}")
    t = tensors[0]
    if t.dtype != dtype or tuple(t.shape) != (numel,):
        raise Refused("malformed", f"{what} must be {dtype} of shape [{numel}]")
    return t


def valid_point(raw: bytes) -> bool:
    """Whether ``raw`` is an X25519 public key that agrees a secret: not a point of
    small order, whose shared secret with any key is zero (RFC 7748, section 6.1): the
    clients' own check, :func:`shoal.secagg.check_key`."""
    try:
        secagg.check_key(raw)
    except secagg.SecAggError:
        return False
    return True
