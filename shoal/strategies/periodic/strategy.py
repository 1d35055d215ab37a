"""Periodic data parallel: local SGD (model averaging) and DiLoCo.

Each worker trains its own replica on its slice of every global step, with its
own optimizer, and talks only every ``--sync-every H`` steps (and after the
last step, so the final model is one model):

- ``local-sgd``: the replicas' parameters are averaged (Stich 2019; Lin et al.
  2020). What travels is each replica's change since the last average, so a
  codec compresses the update, with error feedback, not the weights.
- ``diloco``: the replicas' average change is a pseudo-gradient for an outer
  optimizer, Nesterov momentum SGD (``--outer-lr``, ``--outer-momentum``), on
  the shared parameters; the inner optimizer is the job's ``--optimizer``
  (AdamW unless told otherwise, as in Douillard et al. 2023).

With no compression one average moves every parameter once in a ring
all-reduce: 1/H of what ``allreduce`` moves in the same steps.

Streaming (Douillard et al. 2025, "Streaming DiLoCo"): ``--fragments F`` cuts
the parameters, in order, into F fragments of about equal bytes; fragment f
meets every H steps, after the steps ``(f + 1) H / F (mod H)``, so one
fragment's worth travels every H/F steps instead of the whole model every H
(the peak bandwidth falls F-fold). ``--overlap T`` runs each exchange in the
background (a thread, on a process group of its own) while the next T inner
steps train; after the T-th the result is merged: the fragment takes its new
shared value plus the change this replica made to it in those T steps, so no
step is lost. The schedule depends on the step alone, so every replica merges
the same exchange after the same step, however long the wire took. ``--compress
int8`` / ``int4`` quantize what travels with scales agreed by every replica and
integers summed exactly (:mod:`shoal.strategies.collectives`).

The replicas meet in full (every fragment, uncompressed, each codec's residual
included) after the last step and at checkpoints, so a checkpoint holds one
model and nothing of any codec; with streaming these are also the only points a
preemption can stop at or an in-place job go back to. ``--meet-every M`` adds
meetings that save nothing: an in-place job's points of return (kept in memory)
can then come more often than its checkpoints (written to disk).
"""

from __future__ import annotations

import contextlib
import copy
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from shoal import balance
from shoal.checkpoint import snapshot
from shoal.compress import COMPRESS_HELP, Codec, NoCompression, parse_codec
from shoal.config import option
from shoal.dist import DistEnv
from shoal.errors import UserError
from shoal.memory import ActivationMeter
from shoal.metrics import CommCounter, PhaseTimer
from shoal.optim import build_optimizer, build_scheduler
from shoal.strategies.base import Batch, LossFn, Strategy
from shoal.strategies.collectives import average


@dataclass
class LocalSGDConfig:
    """[strategy.local-sgd]"""

    sync_every: int = option(8, "local steps between synchronizations (H)", low=1, high=1 << 30)
    compress: str = option("none", COMPRESS_HELP)
    fragments: int = option(
        1,
        "cut the parameters into F fragments of about equal bytes, each synchronized "
        "every H steps on a staggered schedule, one every H/F steps (streaming DiLoCo)",
        low=1,
        high=1 << 16,
    )
    overlap: int = option(
        0,
        "inner steps a synchronization runs in the background while training goes on; "
        "its result is merged that many steps later (0: workers wait for it)",
        low=0,
        high=1 << 30,
    )
    meet_every: int = option(
        0,
        "streaming: steps between the points where the replicas meet in full (every "
        "fragment, uncompressed), which an in-place job goes back to after a loss and "
        "takes newcomers at, besides --checkpoint-every's (0: at checkpoints only)",
        low=0,
        high=1 << 30,
    )


@dataclass
class DiLoCoConfig(LocalSGDConfig):
    """[strategy.diloco]"""

    outer_lr: float = option(0.7, "learning rate of the outer Nesterov SGD", above=0, high=1e4)
    outer_momentum: float = option(0.9, "momentum of the outer Nesterov SGD", low=0, below=1)


def cut_fragments(sizes: list[int], count: int) -> list[list[int]]:
    """Indices of consecutive tensors (by ``sizes`` in bytes) in ``count`` fragments of
    about equal bytes: fragment ``f`` takes the tensors that start before ``(f + 1) / count``
    of the bytes (at least one each)."""
    if count > len(sizes):
        raise UserError(f"--fragments {count}: the model has only {len(sizes)} parameter tensors")
    total, out, at, start = sum(sizes), [], 0, 0
    for f in range(count):
        end = start + 1
        bound = total * (f + 1) / count
        while end < len(sizes) - (count - 1 - f) and at + sizes[end - 1] + sizes[end] / 2 <= bound:
            at += sizes[end - 1]
            end += 1
        at += sizes[end - 1] if end > start else 0
        out.append(list(range(start, end)))
        start = end
    out[-1].extend(range(start, len(sizes)))
    return out


def offsets(sync_every: int, fragments: int) -> list[int]:
    """The schedule: fragment ``f`` meets after the steps ``s`` with ``s % H`` equal to
    its offset, ``(f + 1) H / F (mod H)`` (the last one at multiples of H, as the whole
    model does with one fragment)."""
    stride = sync_every // fragments
    return [((f + 1) * stride) % sync_every for f in range(fragments)]


@dataclass
class _Exchange:
    """One synchronization of some fragments: what this replica sent, and its result."""

    fragments: list[int]
    step: int  # the step after which it started
    due: int  # the step after which it is merged
    deltas: list[torch.Tensor]  # this replica's change, as computed at ``step``
    result: Future | None = None  # (means, bytes, seconds) from the background
    done: tuple[list[torch.Tensor], CommCounter, float] | None = None
    full: bool = False  # every fragment, uncompressed: the replicas become one model


def _flushed(codec: Codec, key: str, delta: torch.Tensor) -> torch.Tensor:
    """``delta`` with what ``codec`` still holds back for ``key`` (its residual) added;
    the residual is dropped from the codec."""
    residual = codec.residuals.pop(key, None)
    return delta if residual is None else delta + residual.reshape(delta.shape)


class LocalSGD(Strategy):
    """Local steps, parameters averaged every H steps (whole, or a fragment at a time)."""

    options: LocalSGDConfig

    def setup(
        self, model: nn.Module, total_steps: int, example: Batch, activations: ActivationMeter
    ) -> None:
        self.model = model
        self.total_steps = total_steps
        self.sync_every = self.options.sync_every
        self.optimizer = build_optimizer(model.parameters(), self.job.optim)
        self.scheduler = build_scheduler(self.optimizer, self.job.optim, total_steps)
        self.codec = parse_codec(self.options.compress, seed=self.job.train.seed + self.env.rank)
        self.exact = NoCompression()
        # the replicas start equal: every worker builds the model from the same seed
        self.params = dict(model.named_parameters())
        self.names = list(self.params)
        self.anchor = {n: p.detach().clone() for n, p in self.params.items()}
        sizes = [p.numel() * p.element_size() for p in self.params.values()]
        cut = cut_fragments(sizes, self.options.fragments)
        self.fragments = [[self.names[i] for i in idx] for idx in cut]
        self.fragment_bytes = [sum(sizes[i] for i in idx) for idx in cut]
        self.overlap = self.options.overlap
        self.streaming = len(self.fragments) > 1 or self.overlap > 0
        self.offsets = offsets(self.sync_every, len(self.fragments))
        self.steps = 0
        # uneven slices (--balance): each replica steps on its slice's mean, and the
        # average weighs each replica's change by the samples it trained on
        self.weighted = balance.parse(self.job.train.balance).mode != "equal"
        self.samples = [0] * len(self.fragments)  # this replica's, since each fragment met
        self.synced: dict[str, Any] = {}  # what rollback() goes back to (in-place jobs)
        self.lent: list[Any] = []  # sends of the kept copies to a newcomer, on their way
        self.pending: _Exchange | None = None
        self.pool = ThreadPoolExecutor(1, "shoal-sync") if self.overlap else None
        self.group: Any = None  # made at the first background exchange (see _start)
        # this rank's scheduled exchanges (full meetings apart): how many, seconds from
        # start to result, seconds waited for them, and bytes sent by fragment
        self.syncs, self.sync_seconds, self.sync_waited = 0, 0.0, 0.0
        self.meetings = 0  # full meetings this process took part in (the last step's too)
        self.fragment_sent = [0] * len(self.fragments)
        self.fragment_syncs = [0] * len(self.fragments)
        self._mark()

    def regroup(self, env: DistEnv) -> None:
        self.env = env
        self.group = None  # (a new one at the next background exchange)

    def release(self) -> None:
        self._settle_lent()
        self.pending = None
        self.group = None
        if self.pool is not None:  # a background exchange on the old group fails, unread,
            self.pool.shutdown(wait=False, cancel_futures=True)  # and holds nothing up
            self.pool = ThreadPoolExecutor(1, "shoal-sync")

    def _mark(self) -> None:
        """Keep this replica's inner optimizer at a point where the replicas are one model
        (in-place jobs: the model is the anchor then), for :meth:`rollback`."""
        if self.in_place:  # (into the tensors kept last time: no fresh memory each meeting)
            self._settle_lent()  # (they may be on their way to a newcomer)
            kept = self.synced
            self.synced = {
                "optimizer": snapshot(self.optimizer.state_dict(), kept.get("optimizer")),
                "scheduler": self.scheduler.state_dict(),
                "steps": self.steps,
                "model": snapshot(self.anchor, kept.get("model")),
                "outer": snapshot(self._outer_state(), kept.get("outer")),
                "codec": copy.deepcopy(self.codec),
            }

    def _outer_state(self) -> Any:
        """The outer optimizers' state, as live references (:meth:`_mark` copies it)."""
        return None

    def lent_state(self) -> dict[str, Any] | None:
        """At the kept point (no step since: a newcomer is taken in at a full meeting),
        the state from the copies kept for :meth:`rollback`, which change only at the
        next mark."""
        kept = self.synced
        if not self.in_place or kept.get("steps") != self.steps:
            return None
        state = self.state_dict()
        model = kept["model"]
        state["model"] = {k: model[k] if k in model else v.clone()  # (buffers: copied)
                          for k, v in state["model"].items()}  # fmt: skip
        state["optimizer"], state["anchor"] = kept["optimizer"], model
        state["scheduler"] = copy.deepcopy(kept["scheduler"])
        return state

    def lend(self, posted: Any) -> None:
        self.lent.append(posted)

    def _settle_lent(self) -> None:
        """The kept copies are about to change, or the group to end: the sends of them
        finish first (one that failed, to a newcomer lost meanwhile, is that loss: the
        next regroup sees it)."""
        lent, self.lent = self.lent, []
        for posted in lent:
            with contextlib.suppress(Exception):
                posted.wait()

    def _load_outer_state(self, state: Any) -> None:
        pass

    @torch.no_grad()
    def rollback(self) -> None:
        """Back to the last point where the replicas were one model: that model, and this
        replica's inner optimizer as it was then."""
        self.pending = None
        self.samples = [0] * len(self.fragments)
        if self.steps == self.synced["steps"]:
            return  # (no step since: nothing moved; the exchange in flight, if any, is dropped)
        for n, p in self.params.items():
            p.copy_(self.synced["model"][n])
            self.anchor[n].copy_(p)
        # (copied into the live tensors: load_state_dict keeps tensors of the right dtype
        # and device as they are, so given the kept ones it would make them live, and a
        # second rollback would see them moved)
        self.optimizer.load_state_dict(
            snapshot(self.synced["optimizer"], self.optimizer.state_dict())
        )
        self.scheduler.load_state_dict(self.synced["scheduler"])
        self._load_outer_state(snapshot(self.synced["outer"], self._outer_state()))
        self.codec = copy.deepcopy(self.synced["codec"])
        self.steps = self.synced["steps"]

    def train_step(
        self, batch: Batch, loss_fn: LossFn, loss_scale: float, timer: PhaseTimer
    ) -> torch.Tensor:
        # loss_scale W/B: the mean over this replica's slice of the step (B/W samples)
        if self.weighted:
            loss_scale = 1.0 / len(batch[1])
            self.samples = [n + len(batch[1]) for n in self.samples]
        loss_sum = self.optimizer_step(self.model, batch, loss_fn, loss_scale, timer)
        self.steps += 1
        before = timer.totals["comm"]
        with timer.phase("comm"):
            self._after_step(self.steps)
        self.wait_time += timer.totals["comm"] - before
        return loss_sum

    def _full_sync_at(self, step: int) -> bool:
        """Whether the replicas meet in full after ``step``: after the last step, and
        (streaming) at checkpoints, so that a checkpoint holds one model, and every
        ``--meet-every`` steps."""
        every, meet = self.job.train.checkpoint_every, self.options.meet_every
        return (
            step == self.total_steps
            or (every > 0 and step % every == 0)
            or (meet > 0 and step % meet == 0)
        )

    def _after_step(self, step: int) -> None:
        """Merge what is due, start what is due: the schedule is a function of the step
        alone, so every replica merges the same exchange after the same step."""
        if self.pending is not None and (self.pending.due == step or self._full_sync_at(step)):
            self._merge(self.pending)
            self.pending = None
        if self._full_sync_at(step):
            self._merge(self._start(list(range(len(self.fragments))), step, full=True))
            return
        due = [f for f, off in enumerate(self.offsets) if step % self.sync_every == off]
        if due:
            exchange = self._start(due, step)
            if self.pool is None:
                self._merge(exchange)
            else:
                self.pending = exchange

    @torch.no_grad()
    def _start(self, fragments: list[int], step: int, full: bool = False) -> _Exchange:
        names = [n for f in fragments for n in self.fragments[f]]
        deltas = [self.params[n].detach() - self.anchor[n] for n in names]
        samples = self.samples[fragments[0]]
        for f in fragments:
            self.samples[f] = 0
        # a full meeting flushes the codec: the residuals travel too, in float32
        codec = self.codec
        if full and not isinstance(self.codec, NoCompression):
            codec = self.exact
            deltas = [_flushed(self.codec, n, d) for n, d in zip(names, deltas)]
        items = list(zip(names, deltas))
        blocking = full or self.pool is None
        due = step if blocking else step + self.overlap
        exchange = _Exchange(fragments, step, due, deltas, full=full)
        if not blocking and self.group is None and self.env.world_size > 1:
            # background exchanges get a process group of their own: they never queue
            # behind, or interleave with, the trainer's collectives (made here, at the same
            # step on every replica, since an in-place job forms its group after setup)
            self.group = dist.new_group(backend=dist.get_backend())
        group = None if blocking else self.group
        job = (items, codec, samples, group)
        if blocking:
            exchange.done = self._average(*job)
        else:
            exchange.result = self.pool.submit(self._average, *job)  # type: ignore[union-attr]
        return exchange

    def _average(
        self, items: list[tuple[str, torch.Tensor]], codec: Codec, samples: int, group: Any
    ) -> tuple[list[torch.Tensor], CommCounter, float]:
        """The replicas' mean change (weighted by samples with --balance); runs in the
        background with --overlap, so it touches nothing the training step does."""
        t0 = time.perf_counter()
        comm = CommCounter()
        if self.weighted:
            total = torch.tensor([float(samples)], device=self.env.device)
            dist.all_reduce(total, group=group)
            weight = self.env.world_size * samples / float(total)
            items = [(n, d * weight) for n, d in items]
        with torch.no_grad():
            means = average(items, codec, self.env.world_size, comm, group)
        return means, comm, time.perf_counter() - t0

    @torch.no_grad()
    def _merge(self, exchange: _Exchange) -> None:
        t0 = time.perf_counter()
        if exchange.done is None:
            exchange.done = exchange.result.result()  # type: ignore[union-attr]
        means, comm, seconds = exchange.done
        waited = time.perf_counter() - t0
        self.comm.add(sent=comm.sent, received=comm.received)
        names = [n for f in exchange.fragments for n in self.fragments[f]]
        fresh = self._new_globals(exchange.fragments, names, means)
        late = exchange.step != self.steps
        for n, new, sent in zip(names, fresh, exchange.deltas):
            p = self.params[n]
            if late:  # keep the steps taken while the exchange was away
                p.add_(new - self.anchor[n] - sent)
            else:
                p.copy_(new)
            self.anchor[n].copy_(new)
        if not exchange.full:
            self.syncs += 1
            self.sync_seconds += seconds
            self.sync_waited += waited if late else seconds
            for f in exchange.fragments:  # (one: offsets differ)
                self.fragment_sent[f] += comm.sent
                self.fragment_syncs[f] += 1
        else:
            self.meetings += 1
        if exchange.full or not self.streaming:
            self._mark()

    def _new_globals(
        self, fragments: list[int], names: list[str], means: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """The shared value of each named parameter after a synchronization."""
        return [self.anchor[n] + m.reshape(self.anchor[n].shape) for n, m in zip(names, means)]

    def consistent_after(self, step: int) -> bool:
        if self.streaming:
            return step == 0 or self._full_sync_at(step)
        return step % self.sync_every == 0 or step == self.total_steps

    def eval_model(self) -> nn.Module:
        """Between meetings, the shared model: each fragment as it was last agreed."""
        if self.consistent_after(self.steps):
            return self.model
        shared = copy.deepcopy(self.model)
        with torch.no_grad():
            for n, p in shared.named_parameters():
                p.copy_(self.anchor[n])
        return shared

    def totals(self) -> dict[str, float]:
        return {"sync_seconds": self.sync_seconds, "sync_waited": self.sync_waited}

    def summarize(self, totals: list[Any]) -> dict[str, Any]:
        own = [t.own for t in totals]
        sent = zip(self.fragment_sent, self.fragment_syncs)
        return {
            "synchronization": {
                "fragments": len(self.fragments),
                "overlap": self.overlap,
                "codec": self.codec.spec,
                "syncs": self.syncs,
                "meetings": self.meetings,
                "meet_every": self.options.meet_every,
                "fragment_bytes": self.fragment_bytes,
                "bytes_per_sync": [round(b / n) if n else None for b, n in sent],
                "sync_seconds": [round(o["sync_seconds"], 3) for o in own],
                "hidden_seconds": [
                    round(max(0.0, o["sync_seconds"] - o["sync_waited"]), 3) for o in own
                ],
                # forward and backward over the wall of the training steps, logging and
                # waits included (evaluations and checkpoints not: see the trainer)
                "compute_utilisation": [
                    round(t.time["stepping_compute"] / t.time["stepping"], 4)
                    if t.time.get("stepping")
                    else None
                    for t in totals
                ],
            }
        }

    def metrics(self) -> dict[str, float]:
        """Rank 0's scheduled exchanges so far: how many, the bytes it sent in them and
        the seconds of them it trained through."""
        return {
            "syncs": float(self.syncs),
            "sync_bytes": float(sum(self.fragment_sent)),
            "sync_hidden_s": max(0.0, self.sync_seconds - self.sync_waited),
        }

    def state_dict(self) -> dict[str, Any]:
        """The model (one model: checkpoints fall where the replicas meet in full, see the
        plugin's check) and rank 0's inner optimizer state, which every replica resumes
        with."""
        return {
            **super().state_dict(),
            "anchor": dict(self.anchor),  # (live: a checkpoint snapshots what it saves)
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for n, t in state["anchor"].items():
            self.anchor[n].copy_(t)
        self.steps = int(state["steps"])
        self._load_more(state)
        self._mark()

    def _load_more(self, state: dict[str, Any]) -> None:
        """What a subclass keeps in :meth:`state_dict` besides this class's (before the
        mark)."""

    def close(self) -> None:
        self._settle_lent()
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


class DiLoCo(LocalSGD):
    """Inner optimizer for H steps; outer Nesterov momentum on the averaged pseudo-gradient
    (one outer optimizer per fragment)."""

    options: DiLoCoConfig

    def setup(
        self, model: nn.Module, total_steps: int, example: Batch, activations: ActivationMeter
    ) -> None:
        self.outer_params: list[nn.Parameter] = []
        self.outers: list[torch.optim.SGD] = []
        super().setup(model, total_steps, example, activations)
        self.outer_params = [
            nn.Parameter(t.clone(), requires_grad=False) for t in self.anchor.values()
        ]
        self.outer_of = dict(zip(self.names, self.outer_params))
        s = self.options
        self.outers = [
            torch.optim.SGD(
                [self.outer_of[n] for n in names],
                lr=s.outer_lr,
                momentum=s.outer_momentum,
                nesterov=s.outer_momentum > 0,  # torch refuses Nesterov without momentum
            )
            for names in self.fragments
        ]
        self._mark()

    def _new_globals(
        self, fragments: list[int], names: list[str], means: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Outer step: the pseudo-gradient is minus the replicas' mean change."""
        for n, m in zip(names, means):
            outer = self.outer_of[n]
            outer.grad = -m.reshape(outer.shape)
        for f in fragments:
            self.outers[f].step()
        return [self.outer_of[n].detach() for n in names]

    def _outer_state(self) -> Any:
        if not self.outers:
            return None
        return {
            "params": [p.detach() for p in self.outer_params],
            "optimizers": [o.state_dict() for o in self.outers],
        }

    def _load_outer_state(self, state: Any) -> None:
        if state is None:
            return
        with torch.no_grad():
            for p, t in zip(self.outer_params, state["params"]):
                p.copy_(t)
        for o, sd in zip(self.outers, state["optimizers"]):
            o.load_state_dict(sd)

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "outer_params": [p.detach() for p in self.outer_params],
            "outer": [o.state_dict() for o in self.outers],
        }

    def lent_state(self) -> dict[str, Any] | None:
        state = super().lent_state()
        if state is not None and self.synced["outer"] is not None:
            outer = self.synced["outer"]
            state["outer_params"], state["outer"] = outer["params"], outer["optimizers"]
        return state

    def _load_more(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for p, t in zip(self.outer_params, state["outer_params"]):
                p.copy_(t)
        for o, sd in zip(self.outers, state["outer"]):
            o.load_state_dict(sd)
