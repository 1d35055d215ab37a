"""Secure aggregation: the server learns the sum of a round's updates, nothing else.

The protocol of Bonawitz et al. 2017 ("Practical Secure Aggregation for
Privacy-Preserving Machine Learning") for an honest-but-curious server, with
the neighbourhoods of Bell et al. 2020 (SecAgg+) when a round is large:

1. **Advertise keys.** Each client makes two X25519 key pairs, ``c`` (to
   encrypt what it sends its peers through the server) and ``s`` (to agree
   masks with them), and sends the public halves.
2. **Share keys.** Each client draws a self-mask seed ``b``, cuts ``b`` and
   its secret key ``s_sk`` into Shamir shares (threshold ``t``) for its
   neighbours, and sends each neighbour its two shares encrypted with AES-GCM
   under a key agreed from ``c`` (the server routes what it cannot read).
3. **Masked input.** Each client sends its update in fixed point, modulo
   2**64, plus the stream ``PRG(b)`` and, for each neighbour ``v``, plus or
   minus ``PRG(s_uv)`` (``s_uv`` agreed from the ``s`` keys: ``+`` where
   ``u < v``). Pairwise masks cancel in the sum; every single input looks
   uniformly random.
4. **Unmask.** The clients still there send, for each neighbour that sent an
   input, its share of ``b``; for each neighbour that dropped before sending
   one, its share of ``s_sk``. The server rebuilds each ``b`` and removes
   ``PRG(b)``, and rebuilds each dropped ``s_sk`` and removes the pairwise
   masks it left in its neighbours' inputs. A client that sends its input and
   then drops is still counted: its ``b`` comes back from its neighbours.

What each client checks of the server, so that a server that deviates learns
no single update (the paper's conditions, section 4 and 6):

- every public key it is given is a valid X25519 point (no small-order point,
  which would make an all-zero agreed key), and no key appears twice;
- its masking peers are exactly the ones the round's public graph gives
  (:func:`neighbours`), so the server cannot shrink its share holders;
- at least ``t`` of its holders (:func:`threshold`, a majority) remain at each
  step: shares received before it sends a masked input, inputs received
  before it helps unmask; and at least :data:`MIN_INPUTS` inputs: the sum of
  one client is that client's update;
- it answers the unmasking once a round, for the list of inputs it is given
  then, which must name itself (it knows it sent its input): a peer's
  self-mask share and its key share never both leave it, so asking twice, or
  telling different clients different lists, leaves the server with fewer
  than ``t`` shares of one kind. With ``t`` a majority, two disjoint groups of
  ``t`` answers cannot exist.

A refusal is a :class:`SecAggError`; the client drops out of the round.

PRG: AES-256 in counter mode keyed by the 32-byte seed. Shamir: over the prime
field of 2**521 - 1. Fixed point: :data:`FRACTION_BITS` binary places, in
two's complement modulo 2**64.
"""

from __future__ import annotations

import functools
import math
import os
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

FRACTION_BITS = 24
"""Binary places of the fixed-point encoding: steps of 6e-8; sums below 2**39 in size."""
PRIME = (1 << 521) - 1
"""The Shamir field (a Mersenne prime, larger than any 32-byte secret)."""
COMPLETE_UP_TO = 32
"""Rounds of at most this many clients use the complete graph (every pair masks)."""
RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw


MIN_INPUTS = 2
"""The fewest masked inputs a client helps unmask: one input's sum is its update."""


class SecAggError(Exception):
    """A round that cannot be unmasked (too few shares came back), a forged share, or a
    client refusing what the server asked of it."""


def check_key(key: bytes) -> bytes:
    """``key`` if it is a usable X25519 public key (32 bytes, not of small order: an
    exchange with it gives a shared secret); else a :class:`SecAggError`."""
    if not isinstance(key, bytes) or len(key) != 32:
        raise SecAggError("a public key must be 32 bytes")
    if not _usable(key):
        raise SecAggError("a public key is not a valid X25519 point (small order)")
    return key


@functools.lru_cache(maxsize=1 << 14)
def _usable(key: bytes) -> bool:
    """Whether an exchange with ``key`` agrees a secret (once per key in a process: every
    client of a round checks every other's keys, n**2 exchanges otherwise)."""
    try:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(key))
    except ValueError:
        return False
    return True


# --- fixed point ------------------------------------------------------------------------


RANGE = float(1 << (63 - FRACTION_BITS))
"""Fixed point holds values (and sums) of magnitude below 2**39."""


def encode(x: np.ndarray, summands: int = 1) -> np.ndarray:
    """``x`` (floats) in fixed point modulo 2**64. A :class:`ValueError` for a value that
    is not finite or so large that a sum of ``summands`` such inputs could wrap around
    (each must stay below :data:`RANGE` / ``summands``): the sum would be silently wrong."""
    x = np.asarray(x, dtype=np.float64)
    bound = RANGE / max(1, summands)
    if not np.all(np.isfinite(x)):
        raise ValueError("the update is not finite (NaN or inf): it cannot be aggregated")
    if x.size and float(np.abs(x).max()) >= bound:
        raise ValueError(f"the update has a value of {float(np.abs(x).max()):.3g}, beyond "
                         f"the {bound:.3g} that fixed point sums of {summands} hold")  # fmt: skip
    return np.rint(x * (1 << FRACTION_BITS)).astype(np.int64).view(np.uint64)


def decode(y: np.ndarray) -> np.ndarray:
    """The floats a (summed) fixed-point vector stands for."""
    return y.view(np.int64).astype(np.float64) / (1 << FRACTION_BITS)


def prg(seed: bytes, length: int) -> np.ndarray:
    """``length`` pseudo-random words modulo 2**64 from a 32-byte ``seed``."""
    stream = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    return np.frombuffer(stream.update(bytes(8 * length)), dtype=np.uint64)


# --- Shamir's secret sharing ------------------------------------------------------------


def share(secret: bytes, holders: Sequence[int], threshold: int) -> dict[int, int]:
    """Shares of ``secret`` for each of ``holders`` (ids; a share is the polynomial at
    ``id + 1``); any ``threshold`` of them rebuild it."""
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in
                                                  range(threshold - 1)]  # fmt: skip
    out = {}
    for h in holders:
        x, y = h + 1, 0
        for c in reversed(coeffs):
            y = (y * x + c) % PRIME
        out[h] = y
    return out


def _at(points: list[tuple[int, int]], x: int) -> int:
    """The polynomial through ``points`` (holder id, share) at ``x`` (Lagrange)."""
    value = 0
    for i, (hi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (hj, _) in enumerate(points):
            if i != j:
                num = num * (x - hj - 1) % PRIME
                den = den * (hi - hj) % PRIME
        value = (value + yi * num * pow(den, -1, PRIME)) % PRIME
    return value


def rebuild(shares: dict[int, int], threshold: int, size: int = 32) -> bytes:
    """The secret of ``threshold`` or more shares (by holder id). Shares beyond the
    threshold must lie on the same polynomial: a forged or mixed-up one is refused."""
    if len(shares) < threshold:
        raise SecAggError(f"{len(shares)} shares came back, {threshold} are needed")
    points = sorted(shares.items())
    basis = points[:threshold]
    if any(_at(basis, h + 1) != y for h, y in points[threshold:]):
        raise SecAggError("the shares do not lie on one polynomial (forged or mixed up)")
    secret = _at(basis, 0)
    if secret >= 1 << (8 * size):
        raise SecAggError("the shares do not rebuild a secret (forged or mixed up)")
    return secret.to_bytes(size, "big")


# --- who masks with whom ------------------------------------------------------------------


def neighbours(clients: Sequence[int], seed: int) -> dict[int, list[int]]:
    """Each client's masking peers: everyone in a round of up to :data:`COMPLETE_UP_TO`,
    else (SecAgg+) ``k`` neighbours on a cycle in a public, seeded random order, with
    ``k`` about ``2 log2(n)`` on each side."""
    ids = sorted(clients)
    n = len(ids)
    if n <= COMPLETE_UP_TO:
        return {u: [v for v in ids if v != u] for u in ids}
    half = math.ceil(2 * math.log2(n))
    order = [ids[i] for i in np.random.default_rng([seed, 0x5EC]).permutation(n)]
    where = {u: i for i, u in enumerate(order)}
    out = {}
    for u in ids:
        i = where[u]
        out[u] = sorted({order[(i + d) % n] for d in range(-half, half + 1) if d})
    return out


def graph_seed(job_seed: int, round_: int) -> int:
    """The public seed of round ``round_``'s graph (:func:`neighbours`): the server and
    every client compute it, so a client can check the peers it is given."""
    return (job_seed << 20) ^ round_


def threshold(holders: int) -> int:
    """Shares needed to rebuild a secret shared among ``holders`` (a client's
    neighbours and itself): a majority."""
    return holders // 2 + 1


# --- the client -----------------------------------------------------------------------------


def _kdf(shared: bytes, label: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=None, info=b"shoal secagg " + label).derive(shared)


@dataclass
class Keys:
    """A client's public keys: ``c`` for its channel, ``s`` for its masks."""

    c: bytes
    s: bytes


class Client:
    """One client's side of one round."""

    def __init__(self, cid: int) -> None:
        self.id = cid
        self._c, self._s = X25519PrivateKey.generate(), X25519PrivateKey.generate()
        self._b = os.urandom(32)
        self.peers: list[int] = []
        self.keys: dict[int, Keys] = {}
        self.held: dict[int, tuple[int, int]] = {}  # peer -> (share of its s_sk, of its b)
        self.t = 1  # shares needed of this client's secrets (set in step 2)
        self.masked_with: set[int] | None = None  # the peers in its masked input (step 3)
        self.answered = False  # step 4 answered (once a round)
        self.rejected: set[int] = set()  # peers whose shares did not open or fit

    def advertise(self) -> Keys:
        """Step 1: the public keys."""
        return Keys(
            self._c.public_key().public_bytes(*RAW), self._s.public_key().public_bytes(*RAW)
        )

    def share_keys(
        self, keys: dict[int, Keys], peers: Sequence[int], graph_seed: int | None = None
    ) -> dict[int, bytes]:
        """Step 2: for each peer (ids in ``keys``), its shares of this client's secrets,
        encrypted for it. ``graph_seed``: the round's public seed of :func:`neighbours`,
        to check ``peers`` against (the complete graph is checked without it)."""
        if self.peers or self.held:
            raise SecAggError(f"client {self.id} was asked to share its keys twice")
        mine = keys.get(self.id)
        if mine is None or mine != self.advertise():
            raise SecAggError(f"client {self.id}'s own keys are not among the round's")
        seen: set[bytes] = set()
        for u, k in keys.items():
            for key in (k.c, k.s):
                check_key(key)
                if key in seen:
                    raise SecAggError(f"a public key appears twice in the round (client {u})")
                seen.add(key)
        ids = sorted(keys)
        if len(ids) <= COMPLETE_UP_TO or graph_seed is not None:
            want = neighbours(ids, graph_seed or 0)[self.id]
            if sorted(set(peers)) != want:
                raise SecAggError(f"client {self.id} was given peers that are not its "
                                  "neighbours in the round's graph")  # fmt: skip
        self.peers, self.keys = [p for p in peers if p in keys and p != self.id], keys
        if not self.peers:
            raise SecAggError(f"client {self.id} has no peer to mask with: its input would "
                              "be its update")  # fmt: skip
        holders = [*self.peers, self.id]  # (it keeps a share of its own)
        t = self.t = threshold(len(holders))
        s_sk = self._s.private_bytes(serialization.Encoding.Raw,
                                     serialization.PrivateFormat.Raw,
                                     serialization.NoEncryption())  # fmt: skip
        s_shares, b_shares = share(s_sk, holders, t), share(self._b, holders, t)
        self.held[self.id] = (s_shares[self.id], b_shares[self.id])
        out = {}
        for v in self.peers:
            plain = b"".join(x.to_bytes(66, "big") for x in (self.id, v, s_shares[v], b_shares[v]))
            nonce = os.urandom(12)
            out[v] = nonce + AESGCM(self._channel(v)).encrypt(nonce, plain, None)
        return out

    def _channel(self, v: int) -> bytes:
        shared = self._c.exchange(X25519PublicKey.from_public_bytes(self.keys[v].c))
        return _kdf(shared, b"channel")

    def receive(self, inbox: dict[int, bytes]) -> None:
        """Step 2, received: the shares each peer sent this client."""
        for u, blob in inbox.items():
            if u not in self.peers or len(blob) <= 12:
                continue
            try:  # a blob that does not open is that peer's fault: it is left out alone
                plain = AESGCM(self._channel(u)).decrypt(blob[:12], blob[12:], None)
            except InvalidTag:
                self.rejected.add(u)
                continue
            src, dst, s_part, b_part = (int.from_bytes(plain[i : i + 66], "big")
                                        for i in range(0, 264, 66))  # fmt: skip
            if (src, dst) != (u, self.id) or len(plain) != 264:
                self.rejected.add(u)
                continue
            self.held[u] = (s_part, b_part)

    def masked_input(self, x: np.ndarray) -> np.ndarray:
        """Step 3: ``x`` (fixed point, uint64) masked, with a pairwise mask for every peer
        of the round's graph, whether or not its shares came: the server decides what
        reaches the inbox, and masking only with the peers it let through would let it
        pick which masks an input carries (withhold one peer's shares, call another
        dropped, and the rest comes off). A peer that dropped before sharing its keys
        therefore costs the round. Refused where fewer than ``t`` of its holders sent
        shares (it could not help unmask)."""
        if self.masked_with is not None:
            raise SecAggError(f"client {self.id} was asked for its masked input twice")
        if not self.peers:
            raise SecAggError(f"client {self.id} was asked for an input before sharing keys")
        remaining = [v for v in self.peers if v in self.held]
        if len(remaining) + 1 < self.t:
            raise SecAggError(f"client {self.id} got shares from {len(remaining)} of its "
                              f"{len(self.peers)} peers; {self.t - 1} are needed")  # fmt: skip
        self.masked_with = set(self.peers)
        y = x.astype(np.uint64, copy=True)
        y += prg(self._b, len(y))
        for v in self.peers:
            mask = prg(pair_seed(self._s, self.keys[v].s), len(y))
            if self.id < v:
                y += mask
            else:
                y -= mask
        return y

    def unmask(self, sent_input: Iterable[int]) -> dict[int, tuple[str, int]]:
        """Step 4: for each peer this client holds shares of, the share the server may
        have: of ``b`` where the peer sent its input, of ``s_sk`` where it did not."""
        sent = set(sent_input)
        if self.answered:
            raise SecAggError(f"client {self.id} was asked to unmask twice in one round")
        self.answered = True  # (even if refused below: no second try with another list)
        if self.masked_with is None or self.id not in sent:
            raise SecAggError(f"client {self.id} sent its masked input, and the server says "
                              "it did not")  # fmt: skip
        near = len(sent & {*self.peers, self.id})  # inputs among its share holders
        least = max(self.t, MIN_INPUTS)
        if near < least:
            raise SecAggError(f"client {self.id} refuses to unmask {near} input(s) of its "
                              f"neighbourhood: at least {least} are needed")  # fmt: skip
        return {u: ("b", b) if u in sent else ("s", s) for u, (s, b) in self.held.items()}


def pair_seed(mine: X25519PrivateKey, theirs: bytes) -> bytes:
    """The mask seed two clients agree from their ``s`` keys."""
    return _kdf(mine.exchange(X25519PublicKey.from_public_bytes(theirs)), b"mask")


# --- the server ----------------------------------------------------------------------------


def unmask_sum(
    masked: dict[int, np.ndarray],
    keys: dict[int, Keys],
    peers: dict[int, list[int]],
    shared: set[int],
    answers: dict[int, dict[int, tuple[str, int]]],
) -> np.ndarray:
    """The sum of the inputs in ``masked`` (by client id). ``peers``: each client's
    masking peers; ``shared``: clients whose shares reached their peers (step 2);
    ``answers``: step 4's shares, by the client that sent them."""
    lost = sorted(u for u in keys if u not in shared and any(v in masked for v in peers[u]))
    if lost:  # (every input carries a mask with each of its graph peers)
        raise SecAggError(f"client(s) {lost} dropped before sharing their keys: the masks "
                          "their peers' inputs carry for them cannot be taken out")  # fmt: skip
    total = np.zeros(len(next(iter(masked.values()))), dtype=np.uint64)
    for y in masked.values():
        total += y
    for u in shared:
        want = "b" if u in masked else "s"
        got = {v: a[u][1] for v, a in answers.items() if u in a and a[u][0] == want}
        secret = rebuild(got, threshold(len([p for p in peers[u] if p in keys]) + 1))
        if u in masked:  # its self mask
            total -= prg(secret, len(total))
            continue
        s_sk = X25519PrivateKey.from_private_bytes(secret)  # dropped: its pairwise masks
        for v in peers[u]:
            if v in masked and u in peers[v]:
                mask = prg(pair_seed(s_sk, keys[v].s), len(total))
                if v < u:  # v added it
                    total -= mask
                else:
                    total += mask
    return total
