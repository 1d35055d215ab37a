"""Vertical training between party processes over shoal's authenticated wire.

The label party listens (:class:`LabelParty`, a :class:`~shoal.net.gate.Listener`);
every other party connects (:class:`Party`, a :class:`~shoal.net.peer.Peer`) and
speaks in requests it sends and replies it waits for:

1. **Alignment** (``--align psi``): ``psi-count`` (how many ids the label party
   has), ``psi-setup`` (the party's blinded ids; the reply is the label party's
   blinded ids), ``psi-answer`` (the label party's ids blinded again). Once every
   party has answered, each is told the common ids, in ascending order: ids it
   holds already. ``--align exact`` skips the protocol: the parties' ids are
   declared equal, and the label party checks a digest of them.
2. **Training**: per step, ``forward`` carries the party's bottom output for the
   step's samples; the reply, once every party's output is in and the label
   party has stepped its top, is ``backward`` with the gradient for that output.

The sample order is the same at every party: a keyed Feistel permutation of the
common ids' positions (:func:`batch_rows`), so no row numbers cross the wire.
Only blinded ids, outputs and gradients cross; bytes are counted per party.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import zmq

from shoal import privacy, psi
from shoal.data.order import FeistelPermutation, digest
from shoal.metrics import CommCounter
from shoal.net import gate, wire
from shoal.net.peer import Peer
from shoal.strategies.vertical.split import Bottom, Stash, Top

LABEL = "label"
"""The label party's name at the door."""


def batch_rows(common: int, step: int, batch: int, seed: int) -> np.ndarray:
    """Positions (in the ascending common ids) of the samples of ``step``: epochs of a
    keyed permutation of the common ids, cut into batches (the last one of an epoch
    shorter); the same at every party."""
    per_epoch = -(-common // batch)
    epoch, k = divmod(step, per_epoch)
    perm = FeistelPermutation(common, seed * 1_000_003 + epoch)
    return perm(np.arange(k * batch, min((k + 1) * batch, common)))


def _bytes_tensor(b: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.uint8) if b else torch.empty(0, torch.uint8)


def _tensor_bytes(t: torch.Tensor) -> bytes:
    if t.dtype != torch.uint8 or t.dim() != 1:
        raise wire.WireError("malformed", "PSI bytes must be a 1-d uint8 tensor")
    return t.numpy().tobytes()


def private_labels(labels: torch.Tensor, classes: int, epsilon: float) -> torch.Tensor:
    """``labels`` through randomized response at ``epsilon`` (label DP,
    :func:`shoal.privacy.randomized_response`), drawn once from a secret generator;
    binary float labels (0./1.) stay float."""
    rng = np.random.default_rng(secrets.randbits(128))
    out = privacy.randomized_response(labels.long().numpy(), classes, epsilon, rng)
    return torch.from_numpy(out).to(labels.dtype).reshape(labels.shape)


def rows_of(ids: np.ndarray, common: np.ndarray) -> np.ndarray:
    """Each common id's row in a party's own table (``ids``, its id column)."""
    order = np.argsort(ids, kind="stable")
    at = np.searchsorted(ids, common, sorter=order)
    if (at >= len(ids)).any() or (ids[order[np.minimum(at, len(ids) - 1)]] != common).any():
        raise ValueError("a common id this party does not hold")
    return order[at]


@dataclass
class _Step:
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    waiting: dict[str, tuple[bytes, int | None]] = field(default_factory=dict)


class LabelParty:
    """The party holding the labels (and maybe columns of its own): listens, aligns
    the ids, runs the top model, and returns every party its gradient."""

    def __init__(
        self,
        secret: bytes,
        parties: Sequence[str],
        ids: np.ndarray,
        top: Top,
        bottom: Bottom | None = None,
        bind: str = "tcp://127.0.0.1:0",
        align: str = "psi",
        label_dp: tuple[float, int] | None = None,
    ) -> None:
        self.parties, self.ids, self.top, self.bottom = list(parties), ids, top, bottom
        self.label_dp = label_dp  # (epsilon, classes): randomized response on the labels
        self.align_mode = align
        self.ctx = zmq.Context.instance()
        self.listener = gate.Listener(self.ctx, bind, secret, LABEL, 64)
        self.address = self.listener.address
        self.buffers = wire.Buffers()
        self.comm: dict[str, CommCounter] = {p: CommCounter() for p in self.parties}
        self.seeker: psi.Seeker | None = None
        self.setups: dict[str, bytes] = {}  # (a party's PSI setup, until its answer)
        self.plan: tuple[int, int] | None = None  # (batch, seed) once training
        self.served = 0
        self.found: dict[str, set[int]] = {}
        self.told: list[tuple[bytes, int | None, str]] = []
        self.common: np.ndarray | None = None
        self.steps: dict[int, _Step] = {}
        self.labels: torch.Tensor | None = None
        self.features: torch.Tensor | None = None
        self.losses: list[float] = []

    # --- one request ----------------------------------------------------------------

    def serve_until(self, done: Any, timeout_ms: int = 60_000) -> None:
        """Answer requests until ``done()``."""
        poller = zmq.Poller()
        poller.register(self.listener.sock, zmq.POLLIN)
        while not done():
            if not poller.poll(timeout_ms):
                raise TimeoutError("no party spoke for a minute")
            self._handle()

    def _handle(self) -> None:
        try:
            ident, size, header, tensors = wire.receive(
                self.listener.sock, 1 << 31, self.buffers, routed=True
            )
        except wire.WireError as e:
            ident, _, head = e.received  # type: ignore[misc]
            self._send(ident.bytes, {"op": "error", "id": wire.request_id([head] if head else [])})
            return
        peer, rid = ident.bytes, wire.header_id(header)
        name = self.listener.user(ident).split("|")[0]
        if name not in self.comm:
            self._send(peer, {"op": "error", "id": rid, "error": f"no party {name[:40]!r}"})
            return
        self.comm[name].add(received=size)
        op = header["op"]
        try:
            if op == "hello":
                welcome = self.listener.welcome(self.listener.user(ident), header)
                self._send(peer, {**welcome, "id": rid}, name=name)
            elif op in ("psi-count", "psi-setup", "psi-answer", "exact"):
                self._align(peer, rid, name, op, tensors)
            elif op == "forward":
                self._forward(peer, rid, name, int(header["step"]), tensors)
            else:
                raise ValueError(f"unknown op {op[:40]!r}")
        except (ValueError, IndexError, KeyError, wire.WireError) as e:  # the party's fault
            self._send(peer, {"op": "error", "id": rid, "error": str(e)[:200]}, name=name)

    def _send(
        self,
        peer: bytes,
        header: dict[str, Any],
        tensors: Sequence[torch.Tensor] = (),
        name: str = "",
    ) -> None:
        frames = wire.encode(header, list(tensors))
        if name in self.comm:
            self.comm[name].add(sent=wire.message_bytes(frames))
        self.listener.sock.send_multipart([peer, *frames], copy=False)

    # --- alignment ------------------------------------------------------------------

    def _align(self, peer: bytes, rid: int | None, name: str, op: str, tensors: list) -> None:
        if op == "psi-count":
            self.seeker = self.seeker or psi.Seeker(self.ids.tolist())
            self._send(peer, {"op": "psi-count", "id": rid, "count": len(self.ids)}, name=name)
            return
        if op == "psi-setup":
            if self.seeker is None:
                raise ValueError("psi-setup before psi-count")
            self.setups[name] = _tensor_bytes(tensors[0])
            request = self.seeker.request()
            self._send(peer, {"op": "psi-request", "id": rid}, [_bytes_tensor(request)], name)
            return
        if op == "psi-answer":
            if self.seeker is None or name not in self.setups:
                raise ValueError("psi-answer before psi-setup")
            found = self.seeker.intersection(self.setups.pop(name), _tensor_bytes(tensors[0]))
            self.found[name] = set(found)
        else:  # exact: the party's ids are declared to be the label party's
            if int(tensors[0].item()) != digest(np.sort(self.ids)):
                self._send(peer, {"op": "error", "id": rid, "error": "--align exact: ids differ"})
                return
            self.found[name] = set(range(len(self.ids)))
        self.told.append((peer, rid, name))
        if len(self.found) == len(self.parties):
            keep = sorted(set.intersection(*self.found.values()))
            self.common = np.sort(self.ids[keep])
            for p, r, who in self.told:
                self._send(p, {"op": "common", "id": r}, [torch.from_numpy(self.common)], who)

    def align(self, labels: torch.Tensor, features: torch.Tensor | None = None) -> np.ndarray:
        """Run the alignment with every party; keep this party's labels (and columns) of
        the common ids, in their order. Returns the common ids."""
        self.serve_until(lambda: self.common is not None)
        assert self.common is not None
        rows = torch.from_numpy(rows_of(self.ids, self.common))
        self.labels = labels[rows]
        if self.label_dp is not None:
            epsilon, classes = self.label_dp
            self.labels = private_labels(self.labels, classes, epsilon)
        self.features = features[rows] if features is not None else None
        return self.common

    # --- training -------------------------------------------------------------------

    def train(self, steps: int, batch: int, seed: int) -> None:
        """Serve ``steps`` steps of split training."""
        self.plan = (batch, seed)
        self.served = 0
        self.serve_until(lambda: self.served >= steps)

    def _forward(self, peer: bytes, rid: int | None, name: str, step: int, tensors: list) -> None:
        if self.common is None or self.plan is None:
            raise ValueError("forward before the ids are aligned and training started")
        want = len(batch_rows(len(self.common), step, *self.plan))
        if (
            step < self.served
            or len(tensors) != 1
            or tensors[0].dtype != torch.float32
            or tensors[0].dim() != 2
            or len(tensors[0]) != want
            or name in self.steps.get(step, _Step()).outputs
        ):
            raise ValueError(f"forward: not an output of step {step}'s {want} samples")
        state = self.steps.setdefault(step, _Step())
        state.outputs[name], state.waiting[name] = tensors[0].clone(), (peer, rid)
        if len(state.outputs) < len(self.parties):
            return
        assert self.labels is not None
        batch, seed = self.plan
        rows = torch.from_numpy(batch_rows(len(self.common), step, batch, seed))
        outputs = []
        if self.bottom is not None:
            assert self.features is not None
            outputs.append(self.bottom.forward(self.features[rows]))
        outputs += [state.outputs[p] for p in self.parties]
        loss, grads = self.top.step(outputs, self.labels[rows])
        self.losses.append(float(loss))
        if self.bottom is not None:
            self.bottom.backward(grads.pop(0))
        for p, g in zip(self.parties, grads):
            who, r = state.waiting[p]
            self._send(who, {"op": "backward", "id": r, "step": step}, [g], p)
        del self.steps[step]
        self.served += 1

    def close(self) -> None:
        self.listener.close(linger_ms=1000)


class Party:
    """A party holding columns (no labels): connects to the label party, aligns, and
    trains its bottom model with the gradients it gets back."""

    def __init__(
        self, secret: bytes, name: str, address: str, ids: np.ndarray, bottom: Bottom,
        timeout_s: float = 60.0,
    ) -> None:  # fmt: skip
        self.name, self.ids, self.bottom = name, ids, bottom
        self.comm = CommCounter()
        self.peer = Peer(
            zmq.Context.instance(), address, secret, name, self.comm,
            timeout_s=timeout_s, target=LABEL,
        )  # fmt: skip
        self.common: np.ndarray | None = None

    def align(self, mode: str = "psi") -> np.ndarray:
        """The common ids (ascending), by PSI with the label party (or declared equal)."""
        if mode == "exact":
            check = torch.tensor(digest(np.sort(self.ids)), dtype=torch.int64)
            _, (common,) = self.peer.call({"op": "exact"}, [check])
        else:
            reply, _ = self.peer.call({"op": "psi-count"})
            holder = psi.Holder(self.ids.tolist())
            setup = _bytes_tensor(holder.setup(int(reply["count"])))
            _, (request,) = self.peer.call({"op": "psi-setup"}, [setup])
            answer = _bytes_tensor(holder.answer(_tensor_bytes(request)))
            _, (common,) = self.peer.call({"op": "psi-answer"}, [answer])
        self.common = common.numpy().copy()
        self.rows = rows_of(self.ids, self.common)  # also checks: only ids this party holds
        return self.common

    def train(
        self, features: torch.Tensor, steps: int, batch: int, seed: int, staleness: int = 0
    ) -> None:
        """``steps`` steps of split training on this party's columns (``features``, one
        row per id of :attr:`ids`). With ``staleness`` 1 the output of step t+1 is
        computed and sent before step t's gradient is back (on the parameters of step
        t-1), so this party computes while the label party does; 0: the one model's
        arithmetic, exactly."""
        assert self.common is not None

        def batch_of(step: int) -> torch.Tensor:
            rows = self.rows[batch_rows(len(self.common), step, batch, seed)]
            return features[torch.from_numpy(rows)]

        if staleness == 0:
            for step in range(steps):
                out = self.bottom.forward(batch_of(step))
                _, (grad,) = self.peer.call({"op": "forward", "step": step}, [out])
                self.bottom.backward(grad)
            return
        if staleness != 1:
            raise ValueError("staleness must be 0 or 1")
        pending: tuple[int, Stash] | None = None
        for step in range(steps + 1):
            sent = None
            if step < steps:
                out, stash = self.bottom.forward_ahead(batch_of(step))
                sent = (self.peer.send({"op": "forward", "step": step}, [out]), stash)
            if pending is not None:
                _, (grad,) = self.peer.recv(pending[0])
                self.bottom.backward_ahead(pending[1], grad)
            pending = sent

    def close(self) -> None:
        self.peer.close()
