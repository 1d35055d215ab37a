"""Vertical training between party processes over shoal's authenticated wire.

The label party listens (:class:`~shoal.strategies.vertical.label.LabelParty`, a
:class:`~shoal.net.gate.Listener`);
every other party connects (:class:`Party`, a :class:`~shoal.net.peer.Peer`) and
speaks in requests it sends and replies it waits for:

1. **Alignment** (``--align psi``): ``psi-count`` (how many ids the label party
   has), ``psi-setup`` (the party's blinded ids; the reply is the label party's
   blinded ids), ``psi-answer`` (the label party's ids blinded again). Once every
   party has answered, each is told the common ids, in ascending order: ids it
   holds already. ``--align exact`` skips the protocol: the parties' ids are
   declared equal, and the label party checks a digest of them.
   Each split (``train``, ``test``) is aligned on its own.
2. **Where to start** (``resume``): every party lists the steps of its checkpoints;
   the reply is the newest step all of them (the label party too) hold, or -1.
3. **Training**: per step, ``forward`` carries the party's bottom output for the
   step's samples; the reply, once every party's output is in and the label
   party has stepped its top, is ``backward`` with the gradient for that output.
4. **Evaluation** (``evaluate``): the party's output for the held-out common ids;
   the reply comes once the label party has scored them.
5. **The end** (``done``): the party's totals (bytes, seconds); the reply carries
   the run's result (final loss, held-out metrics).

The sample order is the same at every party: a keyed Feistel permutation of the
common ids' positions (:func:`~shoal.strategies.vertical.order.batch_rows`), so no
row numbers cross the wire.
Only blinded ids, outputs and gradients cross; bytes are counted per party.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import zmq

from shoal import psi
from shoal.data.order import digest
from shoal.metrics import CommCounter
from shoal.net import wire
from shoal.net.peer import Peer
from shoal.strategies.vertical.order import batch_rows, part_of, rows_of
from shoal.strategies.vertical.split import Bottom, Stash

LABEL = "label"
"""The label party's name at the door."""


def bytes_tensor(b: bytes) -> torch.Tensor:
    """PSI's bytes as a tensor for the wire."""
    return torch.frombuffer(bytearray(b), dtype=torch.uint8) if b else torch.empty(0, torch.uint8)


def tensor_bytes(t: torch.Tensor) -> bytes:
    """A received PSI tensor's bytes (a 1-d uint8 tensor, else a wire error)."""
    if t.dtype != torch.uint8 or t.dim() != 1:
        raise wire.WireError("malformed", "PSI bytes must be a 1-d uint8 tensor")
    return t.numpy().tobytes()


class Party:
    """A party holding columns (no labels): connects to the label party, aligns, and
    trains its bottom model with the gradients it gets back. ``bottom`` may be given
    once the ids are aligned (a linear bottom's width is the label party's word)."""

    def __init__(
        self, secret: bytes, name: str, address: str, ids: np.ndarray,
        bottom: Bottom | None = None, timeout_s: float = 60.0,
    ) -> None:  # fmt: skip
        self.name, self.ids, self.bottom = name, ids, bottom
        self.comm = CommCounter()
        self.peer = Peer(
            zmq.Context.instance(), address, secret, name, self.comm,
            timeout_s=timeout_s, target=LABEL,
        )  # fmt: skip
        self.common: np.ndarray | None = None
        self.outputs = 1
        """The label party's word on what the bottom's output feeds (a linear one's width)."""
        self.compute_s = 0.0
        """Seconds spent computing so far (forward and backward)."""
        self.stop: tuple[str, float] | None = None
        """A signal to stop this party got (its name, when): told the label party."""
        self.stopped_at: int | None = None
        """The steps done when the label party said every party stops (preemption)."""
        self.part = (0, 1)
        """Which slice of each batch this process trains: (index, processes)."""

    def align(
        self, mode: str = "psi", split: str = "train", ids: np.ndarray | None = None
    ) -> np.ndarray:
        """The common ids (ascending) of ``split`` (its ids: ``ids``, the constructor's for
        the training split), by PSI with the label party (or declared equal)."""
        ids = self.ids if ids is None else ids
        if mode == "exact":
            check = torch.tensor(digest(np.sort(ids)), dtype=torch.int64)
            reply, (common,) = self.peer.call({"op": "exact", "split": split}, [check])
        else:
            reply, _ = self.peer.call({"op": "psi-count", "split": split})
            holder = psi.Holder(ids.tolist())
            setup = bytes_tensor(holder.setup(int(reply["count"])))
            _, (request,) = self.peer.call({"op": "psi-setup", "split": split}, [setup])
            answer = bytes_tensor(holder.answer(tensor_bytes(request)))
            reply, (common,) = self.peer.call({"op": "psi-answer", "split": split}, [answer])
        self.outputs = int(reply.get("outputs", 1))
        return self.adopt(split, common.numpy().copy(), self.outputs, ids)

    def adopt(
        self, split: str, common: np.ndarray, outputs: int, ids: np.ndarray | None = None
    ) -> np.ndarray:
        """Take ``common`` as the common ids of ``split`` (aligned by :meth:`align`, or
        by this party's first process) and ``outputs`` as the label party's word."""
        rows = rows_of(self.ids if ids is None else ids, common)  # (only ids it holds)
        self.outputs = outputs
        if split == "train":
            self.common, self.rows = common, rows
        return common

    def agree(self, steps: Sequence[int], plan: dict[str, Any] | None = None) -> int:
        """The newest step whose checkpoint every party holds (``steps``: this party's),
        or -1 (see :meth:`LabelParty.agree`); ``plan``: the job as this party sees it."""
        head = {"op": "resume", "steps": [int(s) for s in steps], "plan": plan or {}}
        reply, _ = self.peer.call(head)
        return int(reply["step"])

    def evaluate(self, step: int, outputs: torch.Tensor) -> None:
        """Send this party's outputs for the held-out common ids after ``step``; returns
        once the label party scored them."""
        self.peer.call({"op": "evaluate", "step": step}, [outputs])

    def finish(self, totals: dict[str, Any]) -> dict[str, Any]:
        """Say this party is done (its ``totals``); the run's result."""
        reply, _ = self.peer.call({"op": "done", "totals": totals})
        return dict(reply.get("result", {}))

    def train(
        self, features: torch.Tensor, steps: int, batch: int, seed: int, staleness: int = 0,
        start: int = 0, after_step: Any = None,
    ) -> None:  # fmt: skip
        """Steps ``start`` .. ``steps`` of split training on this party's columns
        (``features``, one row per id of :attr:`ids`), then ``after_step(step)`` after
        each optimizer step. With ``staleness`` 1 the output of step t+1 is computed and
        sent before step t's gradient is back (on the parameters of step t-1), so this
        party computes while the label party does; the last step of the range is
        waited for (so a checkpoint after it is exact). 0: the one model's arithmetic,
        exactly."""
        assert self.common is not None and self.bottom is not None
        bottom, clock = self.bottom, time.perf_counter

        def batch_of(step: int) -> torch.Tensor:
            rows = part_of(batch_rows(len(self.common), step, batch, seed), self.part)
            return features[torch.from_numpy(self.rows[rows])]

        def header(step: int) -> dict[str, Any]:
            head = {"op": "forward", "step": step, "compute_s": self.compute_s}
            if self.stop is not None:
                head["stop"] = list(self.stop)
            return head

        if staleness not in (0, 1):
            raise ValueError("staleness must be 0 or 1")
        if staleness == 0:
            for step in range(start, steps):
                began = clock()
                out = bottom.forward(batch_of(step))
                self.compute_s += clock() - began
                reply, (grad,) = self.peer.call(header(step), [out])
                began = clock()
                bottom.backward(grad)
                self.compute_s += clock() - began
                if after_step is not None:
                    after_step(step)
                if reply.get("stop"):
                    self.stopped_at = step + 1
                    return
            return
        pending: tuple[int, int, Stash] | None = None
        for step in range(start, steps + 1):
            sent = None
            if step < steps:
                began = clock()
                out, stash = bottom.forward_ahead(batch_of(step))
                self.compute_s += clock() - began
                sent = (self.peer.send(header(step), [out]), step, stash)
            if pending is not None:
                reply, (grad,) = self.peer.recv(pending[0])
                began = clock()
                bottom.backward_ahead(pending[2], grad)
                self.compute_s += clock() - began
                if after_step is not None:
                    after_step(pending[1])
                if reply.get("stop"):  # (the batch sent ahead is never trained)
                    self.stopped_at = pending[1] + 1
                    return
            pending = sent

    def close(self) -> None:
        self.peer.close()
