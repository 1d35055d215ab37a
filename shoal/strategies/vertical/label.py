"""The label party's end of a vertical job's wire (see :mod:`~shoal.strategies.vertical.link`
for the protocol): it listens behind shoal's gate, aligns the ids with every party,
agrees where to resume, runs the top model, returns each party its gradient,
scores the held-out outputs, and ends the run."""

from __future__ import annotations

import secrets
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import zmq

from shoal import privacy, psi
from shoal.data.order import digest
from shoal.errors import UserError
from shoal.metrics import CommCounter
from shoal.net import gate, wire
from shoal.strategies.vertical.link import LABEL, bytes_tensor, tensor_bytes
from shoal.strategies.vertical.order import batch_rows, part_of, rows_of
from shoal.strategies.vertical.split import Bottom, Top


def private_labels(
    labels: torch.Tensor, classes: int, epsilon: float, seed: int | None = None
) -> torch.Tensor:
    """``labels`` through randomized response at ``epsilon`` (label DP,
    :func:`shoal.privacy.randomized_response`), drawn once from a secret generator
    (``seed``: a secret the label party keeps, so that a resumed run draws the same,
    rather than a second, noisy copy of each label); binary float labels stay float."""
    rng = np.random.default_rng(secrets.randbits(128) if seed is None else seed)
    out = privacy.randomized_response(labels.long().numpy(), classes, epsilon, rng)
    return torch.from_numpy(out).to(labels.dtype).reshape(labels.shape)


@dataclass
class _Step:
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    waiting: dict[str, tuple[bytes, int | None]] = field(default_factory=dict)


SPLITS = ("train", "test")


@dataclass
class _Round:
    """Something every party must say once before any of them gets its answer (where
    to resume, the end): what each said, and where to answer it."""

    said: dict[str, Any] = field(default_factory=dict)
    waiting: list[tuple[bytes, int | None, str]] = field(default_factory=list)
    mine: Any = None
    """The label party's own word (``None`` until it is ready to answer)."""
    answer: Any = None


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
        self.split_ids: dict[str, np.ndarray] = {}
        self.seekers: dict[str, psi.Seeker] = {}
        self.requests: dict[str, Future[bytes]] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="shoal-psi")
        self.add_split("train", ids)
        self.setups: dict[tuple[str, str], bytes] = {}  # (a party's PSI setup, until its answer)
        self.plan: tuple[int, int] | None = None  # (batch, seed) once training
        self.served = 0
        self.found: dict[str, dict[str, set[int]]] = {k: {} for k in SPLITS}
        self.told: dict[str, list[tuple[bytes, int | None, str]]] = {k: [] for k in SPLITS}
        self.commons: dict[str, np.ndarray] = {}
        self.steps: dict[int, _Step] = {}
        self.labels: torch.Tensor | None = None
        self.features: torch.Tensor | None = None
        self.losses: deque[float] = deque(maxlen=100_000)
        """The latest steps' losses (the run's records hold them all)."""
        self.outputs = 1
        """What each party's output feeds (told with the common ids: a linear bottom's
        width)."""
        self.after_step: Any = None
        """Called as ``after_step(step, loss_sum, rows)`` once the top stepped on a step
        (``rows``: this process's positions among the common ids; ``loss_sum``: their
        losses summed)."""
        self.stop: tuple[str, float] | None = None
        """A signal to stop (its name, when it came) this party or another got: the step
        under way is the last, every party checkpoints it (preemption)."""
        self.stop_after: int | None = None
        """Once stopping: the steps done when every party stops."""
        self.stop_agreed: bool | None = None
        """A data-parallel label party's processes' agreement on :attr:`stop` (set with
        each step's gradients by the top's ``reduce``); ``None``: one process."""
        self.part = (0, 1)
        """Which slice of each batch this process trains: (index, processes)."""
        self.greeted: set[str] = set()
        self.ahead = -1
        """The step whose output this party's own bottom computed already."""
        self.compute_mine = 0.0
        """Seconds this party computed so far (its top and its own bottom)."""
        self.compute_s: dict[str, float] = dict.fromkeys(self.parties, 0.0)
        """Seconds each party says it computed so far (forward and backward)."""
        self.rounds: dict[str, _Round] = {}
        self.evaluations: dict[int, _Step] = {}
        self.scorer: Any = None
        """Called as ``scorer(step, outputs)`` with every party's held-out outputs."""
        self.result: dict[str, Any] = {}
        """What ``done`` answers (the run's result), set before the end."""
        self.rr_seed = secrets.randbits(128)
        """The secret seed of the labels' randomized response (kept in checkpoints)."""
        self.plan_check: dict[str, Any] = {}
        """The job as the label party sees it: a party whose plan differs is refused."""

    @property
    def common(self) -> np.ndarray | None:
        """The training split's common ids, once aligned."""
        return self.commons.get("train")

    def add_split(self, split: str, ids: np.ndarray) -> None:
        """The ids of ``split`` to align; with PSI, this party's blinded request for them
        is computed now, in the background, while the parties compute their setups."""
        self.split_ids[split] = ids
        if self.align_mode == "psi":
            seeker = self.seekers[split] = psi.Seeker(ids.tolist())
            self.requests[split] = self._pool.submit(seeker.request)

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
                self.listener.sock,
                1 << 31,
                self.buffers,
                routed=True,
                frame_cap=self.listener.frame_bytes,
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
                self.greeted.add(name)
            elif op in ("psi-count", "psi-setup", "psi-answer", "exact"):
                split = str(header.get("split", "train"))
                if split not in self.split_ids:
                    raise ValueError(f"no split {split[:20]!r} to align")
                self._align(peer, rid, name, op, tensors, split)
            elif op == "forward":
                self._stopping(header.get("stop"))
                self._forward(peer, rid, name, int(header["step"]), tensors)
                self.compute_s[name] = float(header.get("compute_s", 0.0))
            elif op == "evaluate":
                self._evaluate(peer, rid, name, int(header["step"]), tensors)
            elif op in ("resume", "done"):
                self._round(peer, rid, name, op, header)
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
        frames = wire.encode(header, list(tensors), self.listener.frame_bytes)
        if name in self.comm:
            self.comm[name].add(sent=wire.message_bytes(frames))
        self.listener.sock.send_multipart([peer, *frames], copy=False)

    # --- alignment ------------------------------------------------------------------

    def _align(
        self, peer: bytes, rid: int | None, name: str, op: str, tensors: list, split: str
    ) -> None:
        ids = self.split_ids[split]
        if op == "psi-count":
            if split not in self.seekers:
                self.seekers[split] = psi.Seeker(ids.tolist())
                self.requests[split] = self._pool.submit(self.seekers[split].request)
            self._send(peer, {"op": "psi-count", "id": rid, "count": len(ids)}, name=name)
            return
        seeker = self.seekers.get(split)
        if op == "psi-setup":
            if seeker is None:
                raise ValueError("psi-setup before psi-count")
            self.setups[name, split] = tensor_bytes(tensors[0])
            request = self.requests[split].result()  # (one request serves every party)
            self._send(peer, {"op": "psi-request", "id": rid}, [bytes_tensor(request)], name)
            return
        found = self.found[split]
        if op == "psi-answer":
            if seeker is None or (name, split) not in self.setups:
                raise ValueError("psi-answer before psi-setup")
            hits = seeker.intersection(self.setups.pop((name, split)), tensor_bytes(tensors[0]))
            found[name] = set(hits)
        else:  # exact: the party's ids are declared to be the label party's
            if int(tensors[0].item()) != digest(np.sort(ids)):
                self._send(peer, {"op": "error", "id": rid, "error": "--align exact: ids differ"})
                return
            found[name] = set(range(len(ids)))
        self.told[split].append((peer, rid, name))
        if len(found) == len(self.parties):
            keep = sorted(set.intersection(*found.values()))
            common = self.commons[split] = np.sort(ids[keep])
            for p, r, who in self.told[split]:
                head = {"op": "common", "id": r, "outputs": self.outputs}
                self._send(p, head, [torch.from_numpy(common)], who)

    def align(
        self, labels: torch.Tensor, features: torch.Tensor | None = None, split: str = "train"
    ) -> np.ndarray:
        """Run the alignment of ``split`` with every party (the training split's ids are
        the constructor's; another's are :attr:`split_ids` ``[split]``); for the training
        split, keep this party's labels (and columns) of the common ids, in their order.
        Returns the common ids."""
        self.serve_until(lambda: split in self.commons)
        return self.adopt(split, self.commons[split], labels, features)

    def greet(self) -> None:
        """Wait until every party said hello (a data-parallel party's other processes:
        before they wait for their first process's alignment)."""
        self.serve_until(lambda: self.greeted >= set(self.parties))

    def adopt(
        self, split: str, common: np.ndarray, labels: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
    ) -> np.ndarray:  # fmt: skip
        """Take ``common`` as the common ids of ``split`` (aligned by :meth:`align`, or by
        this party's first process); for the training split, keep this party's labels
        (through randomized response, drawn from :attr:`rr_seed`) and columns of them."""
        self.commons[split] = common
        if split != "train":
            return common
        assert labels is not None
        rows = torch.from_numpy(rows_of(self.ids, common))
        self.labels = labels[rows]
        if self.label_dp is not None:
            epsilon, classes = self.label_dp
            self.labels = private_labels(self.labels, classes, epsilon, self.rr_seed)
        self.features = features[rows] if features is not None else None
        return common

    # --- rounds: where to resume, the end -------------------------------------------

    def _round(self, peer: bytes, rid: int | None, name: str, op: str, header: dict) -> None:
        state = self.rounds.setdefault(op, _Round())
        if name in state.said:
            raise ValueError(f"{op} twice")
        if op == "resume":
            steps = header.get("steps")
            if not isinstance(steps, list) or not all(isinstance(s, int) for s in steps):
                raise ValueError("resume: steps must be a list of integers")
            theirs = header.get("plan") or {}
            differ = [k for k in self.plan_check if theirs.get(k) != self.plan_check[k]]
            if differ:
                k = differ[0]
                why = (
                    f"party {name} runs another job: its {k} is {theirs.get(k)!r}, the label "
                    f"party's {self.plan_check[k]!r} (give every party the same flags)"
                )
                self._send(peer, {"op": "error", "id": rid, "error": why}, name=name)
                raise UserError(why)
            state.said[name] = set(steps)
        else:
            state.said[name] = header.get("totals", {})
        state.waiting.append((peer, rid, name))
        self._answer_round(op)

    def _answer_round(self, op: str) -> None:
        state = self.rounds.get(op)
        if state is None or state.mine is None or len(state.said) < len(self.parties):
            return
        if op == "resume":
            state.answer = max(set.intersection(state.mine, *state.said.values()), default=-1)
            reply: dict[str, Any] = {"step": state.answer}
        else:
            state.answer = reply = {"result": self.result}
        for p, r, who in state.waiting:
            self._send(p, {"op": op, "id": r, **reply}, name=who)
        state.waiting.clear()

    def agree(self, steps: Sequence[int]) -> int:
        """The newest step whose checkpoint every party holds (``steps``: this party's),
        or -1: where every party resumes."""
        state = self.rounds.setdefault("resume", _Round())
        state.mine = set(steps)
        self._answer_round("resume")
        self.serve_until(lambda: state.answer is not None)
        return int(state.answer)

    def finish(self, result: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Answer every party's ``done`` with ``result``; returns their totals."""
        self.result = result
        state = self.rounds.setdefault("done", _Round())
        state.mine = {}
        self._answer_round("done")
        self.serve_until(lambda: state.answer is not None)
        return dict(state.said)

    # --- training -------------------------------------------------------------------

    def train(self, steps: int, batch: int, seed: int, start: int = 0) -> None:
        """Serve split training from step ``start`` up to step ``steps``, or until a stop
        (:attr:`stop_after`)."""
        self.plan = (batch, seed)
        self.served = max(self.served, start)
        self.serve_until(lambda: self.served >= steps or self.stop_after is not None)

    # --- evaluation -----------------------------------------------------------------

    def _evaluate(self, peer: bytes, rid: int | None, name: str, step: int, tensors: list) -> None:
        common = self.commons.get("test")
        if common is None or self.scorer is None:
            raise ValueError("evaluate before the held-out ids are aligned")
        state = self.evaluations.setdefault(step, _Step())
        if (
            len(tensors) != 1
            or tensors[0].dtype != torch.float32
            or tensors[0].dim() != 2
            or len(tensors[0]) != len(common)
            or name in state.outputs
        ):
            raise ValueError(f"evaluate: not an output of the {len(common)} held-out samples")
        state.outputs[name], state.waiting[name] = tensors[0].clone(), (peer, rid)
        self._score(step)

    def _score(self, step: int) -> None:
        state = self.evaluations.get(step)
        if state is None or len(state.outputs) < len(self.parties) or "mine" not in state.waiting:
            return
        self.scorer(step, [state.outputs[p] for p in self.parties])
        for p in self.parties:
            who, r = state.waiting[p]
            self._send(who, {"op": "evaluated", "id": r, "step": step}, name=p)
        state.waiting.clear()
        state.outputs.clear()

    def evaluate(self, step: int) -> None:
        """Score the held-out split once every party sent its outputs for ``step``
        (:attr:`scorer` does)."""
        state = self.evaluations.setdefault(step, _Step())
        state.waiting["mine"] = (b"", None)
        self._score(step)
        self.serve_until(lambda: not state.waiting)
        del self.evaluations[step]

    def _stopping(self, told: Any) -> None:
        """A party says it got a signal to stop (``[name, when]``): the earliest counts."""
        if told is None:
            return
        if not (isinstance(told, list) and len(told) == 2 and isinstance(told[0], str)):
            raise ValueError("stop: must be [signal name, time]")
        name, when = told[0][:16], float(told[1])
        if self.stop is None or when < self.stop[1]:
            self.stop = (name, when)

    def _forward(self, peer: bytes, rid: int | None, name: str, step: int, tensors: list) -> None:
        if self.stop_after is not None and step >= self.stop_after:
            return  # (sent ahead, before the party heard of the stop: never trained)
        if self.common is None or self.plan is None:
            raise ValueError("forward before the ids are aligned and training started")
        want = len(part_of(batch_rows(len(self.common), step, *self.plan), self.part))
        assert self.common is not None
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
        whole = batch_rows(len(self.common), step, batch, seed)
        rows = torch.from_numpy(part_of(whole, self.part))
        began = time.perf_counter()
        outputs = []
        if self.bottom is not None:
            if self.ahead != step:  # (else computed while the parties computed theirs)
                assert self.features is not None
                self.bottom.forward(self.features[rows])
            assert self.bottom.out is not None
            outputs.append(self.bottom.out.detach())
        outputs += [state.outputs[p] for p in self.parties]
        loss, grads = self.top.step(outputs, self.labels[rows], len(whole))
        mine = grads.pop(0) if self.bottom is not None else None
        if self.stop is not None if self.stop_agreed is None else self.stop_agreed:
            self.stop_after = step + 1
        for p, g in zip(self.parties, grads):  # (first: the parties go on meanwhile)
            who, r = state.waiting[p]
            head = {"op": "backward", "id": r, "step": step, "stop": self.stop_after is not None}
            self._send(who, head, [g], p)
        del self.steps[step]
        self.served += 1
        self.losses.append(float(loss))
        if self.bottom is not None:
            assert self.features is not None and mine is not None
            self.bottom.backward(mine)
            # the next step's own output, while the parties compute theirs
            self.ahead = step + 1
            ahead = batch_rows(len(self.common), step + 1, batch, seed)
            ahead = torch.from_numpy(part_of(ahead, self.part))
            self.bottom.forward(self.features[ahead])
        self.compute_mine += time.perf_counter() - began
        if self.after_step is not None:  # (the slice's loss summed over its samples)
            self.after_step(step, float(loss) * len(whole), rows.numpy())

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.listener.close(linger_ms=1000)
