"""One party's process of a vertical job: its table, its part of the model, its loop.

Every party runs the same schedule, computed from the job alone: steps, the sample
order (:func:`~shoal.strategies.vertical.link.batch_rows`), and the steps where all
of them stop together (a checkpoint, an evaluation, the end). At those steps a party
one batch ahead (``--staleness 1``) has waited for its last gradient, so each party's
checkpoint of step k holds exactly its part of the one model after k steps, and a job
resumed from a step every party holds (the ``resume`` round) goes on as if it had not
stopped.

The label party also writes the run: ``metrics.jsonl``, TensorBoard, progress, the
held-out metrics, ``summary.json``; each party exports its own part of the model
(``model.safetensors`` in its directory). On one machine (one launcher for all
parties) the other parties' directories are ``OUT/parties/NAME``; with one
``shoal train --party NAME`` per machine, each party's is its own ``--out``.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shoal import checkpoint, preempt
from shoal.config import JobConfig
from shoal.data.order import MASK64, digest, range_digest
from shoal.errors import UserError
from shoal.layout import save_model
from shoal.memory import private_bytes, state_bytes
from shoal.metrics import PHASES
from shoal.models.tasks import per_sample_loss
from shoal.optim import build_optimizer, build_scheduler
from shoal.strategies.vertical.group import Group
from shoal.strategies.vertical.job import (
    ADDRESS_ENV,
    PARTY_ENV,
    address,
    boundaries,
    label_of,
    parse_parties,
    party_home,
    plan_of,
    secret,
    seeded,
    stored_label,
)
from shoal.strategies.vertical.label import LabelParty
from shoal.strategies.vertical.link import Party
from shoal.strategies.vertical.order import rows_of
from shoal.strategies.vertical.split import Bottom, Top, _noisy, build_bottom, build_top
from shoal.strategies.vertical.tables import PartyTable, read_party
from shoal.telemetry import Totals, Window


def run_party(job: JobConfig) -> None:
    """This process's party of ``job``, from start (or the agreed checkpoint) to the end."""
    opts = job.strategy.options
    parties = parse_parties(opts.parties)
    label = label_of(opts, parties)
    name = os.environ.get(PARTY_ENV) or opts.party
    group = Group(opts.party_workers)
    where = address(os.environ.get(ADDRESS_ENV, ""), opts.label_address, group.rank)
    label_column = ""
    if name == label:
        label_column = opts.label_column or stored_label(parties[name])
    table = read_party(name, parties[name], opts.id_column, label_column)
    home = party_home(job, name)
    home.mkdir(parents=True, exist_ok=True)
    kind = _LabelRun if name == label else _PartyRun
    run = kind(job, name, table, secret(), where, home, group)
    signals = _Signals(run.link)
    try:
        run.run()
    finally:
        signals.restore()
        run.close()
        group.close()


class _Signals:
    """A scheduler's SIGTERM, Slurm's SIGUSR1 or Ctrl-C: noted on the party's link, which
    tells the label party; the step under way is every party's last, and each
    checkpoints it (see :mod:`shoal.preempt`). A second Ctrl-C stops at once."""

    def __init__(self, link: Any) -> None:
        self.link = link
        self.previous = {s: signal.signal(s, self._on) for s in preempt.SIGNALS}

    def _on(self, signum: int, frame: Any) -> None:
        if self.link.stop is not None:
            if signum == signal.SIGINT and self.link.stop[0] == "SIGINT":
                self.restore()
                raise KeyboardInterrupt
            return
        self.link.stop = (signal.Signals(signum).name, time.time())

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class _Run:
    """What every party's process does alike."""

    def __init__(
        self, job: JobConfig, name: str, table: PartyTable, home: Path, group: Group
    ) -> None:
        self.job, self.name, self.table, self.home = job, name, table, home
        self.group = group
        self.opts = job.strategy.options
        self.parties = list(parse_parties(self.opts.parties))
        self.index = self.parties.index(name)
        self.saver = checkpoint.AsyncSaver(home, job.train.keep_checkpoints,
                                           background=job.train.checkpoint_async)  # fmt: skip
        self.noise_gen = torch.Generator().manual_seed(secrets.randbits(63))
        self.step = 0
        self.started = time.perf_counter()
        self.wall_offset = 0.0
        self.resumed_from: int | None = None

    def wall_time(self) -> float:
        return self.wall_offset + time.perf_counter() - self.started

    def held_steps(self) -> list[int]:
        """Steps of this party's checkpoints that verify (after ``--resume`` or a restart;
        a fresh run has none)."""
        out = []
        for path in checkpoint.list_checkpoints(self.home):
            try:
                checkpoint.load(path)
            except checkpoint.CheckpointError:
                continue
            out.append(checkpoint.step_of(path))
        return out

    def load(self, step: int) -> dict[str, Any]:
        state = checkpoint.load(checkpoint.step_path(self.home, step))
        self.step = self.resumed_from = int(state["step"])
        self.wall_offset = float(state["wall_time"])
        self.noise_gen.set_state(state["noise_gen"])
        return state

    def preempted(self, told: tuple[str, float] | None) -> None:
        """Every party stopped after :attr:`step` and this one checkpointed it: note it
        (its launcher says so) and leave as a preempted worker does."""
        self.saver.wait()
        name, received = told or ("SIGTERM", time.time())
        entry: dict[str, Any] = {}
        if self.group.first:
            entry = preempt.record(self.home, self.step, name, received,
                                   self.job.cluster.grace_period)  # fmt: skip
        raise preempt.Preempted(self.step, entry)

    def bottom_of(self, width: int, outputs: int, noise: float) -> Bottom:
        seeded(self.job.train.seed, self.index)
        o = self.opts
        module = build_bottom(o.split_model, width, outputs, o.bottom_hidden, o.tower_dim)
        opt = build_optimizer(module.parameters(), self.job.optim)
        reduce = self.group.reduce if self.group.size > 1 else None
        return Bottom(module, opt, noise, self.noise_gen, reduce)

    def save(self, state: dict[str, Any]) -> None:
        """This party's checkpoint of :attr:`step` (its first process writes it)."""
        if self.group.first:
            self.saver.save(self.step, state)

    def close(self) -> None:
        self.saver.wait()


class _PartyRun(_Run):
    """A party without the labels: connects, aligns, trains its bottom."""

    def __init__(self, job: JobConfig, name: str, table: PartyTable, secret: bytes,
                 address: str, home: Path, group: Group) -> None:  # fmt: skip
        super().__init__(job, name, table, home, group)
        wait = job.cluster.startup_timeout
        self.link = Party(secret, name, address, table.train.ids, timeout_s=wait)
        self.link.part = group.part

    def run(self) -> None:
        job, link, table, opts, g = self.job, self.link, self.table, self.opts, self.group
        shared = None
        if g.first:  # (once per party; its other processes take the answers)
            start = link.agree(self.held_steps(), plan_of(job))
            link.align(opts.align)
            test = None
            if table.test is not None:
                test = link.align(opts.align, "test", table.test.ids)
            shared = (start, link.common, test, link.outputs)
        start, common, test, outputs = g.broadcast(shared)
        if not g.first:  # (the first process aligned them itself)
            link.adopt("train", common, outputs)
        test_x = None
        if table.test is not None and g.first:
            test_x = table.test.features[torch.from_numpy(rows_of(table.test.ids, test))]
        total = job.train.total_steps(-(-len(link.common) // job.train.batch_size))
        bottom = link.bottom = self.bottom_of(table.width, link.outputs, opts.vertical_noise)
        scheduler = build_scheduler(bottom.optimizer, job.optim, total)
        if start >= 0:
            state = self.load(start)
            bottom.module.load_state_dict(state["bottom"])
            bottom.optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        evals = job.train.eval_every
        for mark in sorted(b for b in boundaries(job, total) if b > self.step):
            link.train(table.train.features, mark, job.train.batch_size, job.train.seed,
                       opts.staleness, start=self.step,
                       after_step=lambda s: scheduler.step())  # fmt: skip
            self.step = mark if link.stopped_at is None else link.stopped_at
            self.save_bottom(bottom, scheduler)
            if link.stopped_at is not None:
                self.preempted(link.stop)
            if test_x is not None and (mark == total or (evals and mark % evals == 0)):
                with torch.no_grad():
                    out = bottom.module(test_x)
                link.evaluate(mark, _noisy(out, opts.vertical_noise, self.noise_gen))
        self.saver.wait()
        if g.first:
            save_model(bottom.module, self.home)
        totals = Totals(self.index * g.size + g.rank, socket.gethostname(), link.comm.sent,
                        link.comm.received,
                        state_bytes(bottom.module.parameters(), bottom.optimizer),
                        {"forward_backward": link.compute_s}).to_dict()  # fmt: skip
        result = link.finish(totals)
        if opts.party and g.first:  # (its own run directory: its own summary)
            _party_summary(job, self.home, self.name, result, totals, self.wall_time())

    def save_bottom(self, bottom: Bottom, scheduler: Any) -> None:
        self.save({
            "step": self.step, "bottom": bottom.module.state_dict(),
            "optimizer": bottom.optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "noise_gen": self.noise_gen.get_state(), "wall_time": self.wall_time(),
        })  # fmt: skip

    def close(self) -> None:
        super().close()
        self.link.close()


def _party_summary(job: JobConfig, home: Path, name: str, result: dict[str, Any],
                   totals: dict[str, Any], wall: float) -> None:  # fmt: skip
    """A party on its own machine writes its own ``summary.json``: its figures and the
    run's result as the label party told it."""
    import json

    from shoal.layout import SUMMARY_FILE, write_atomic

    opts = job.strategy.options
    summary = {
        "strategy": job.strategy.name, "model": opts.split_model,
        "data": f"party {name}", "world_size": len(parse_parties(opts.parties)),
        "steps": int(result.get("steps", 0)), "global_batch_size": job.train.batch_size,
        "final_loss": float(result.get("final_loss", math.nan)),
        **{k: v for k, v in result.items() if k.startswith(("test_", "auc"))},
        "wall_time_s": wall, "samples_per_s": float(result.get("samples_per_s", 0.0)),
        "bytes_sent_total": totals["bytes_sent"],
        "bytes_received_total": totals["bytes_received"],
        "per_worker": [totals], "vertical": {**result.get("vertical", {}), "party": name},
    }  # fmt: skip
    write_atomic(home / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")


class _LabelRun(_Run):
    """The label party: listens, aligns, runs the top (and its own bottom), writes the run."""

    def __init__(self, job: JobConfig, name: str, table: PartyTable, secret: bytes,
                 address: str, home: Path, group: Group) -> None:  # fmt: skip
        super().__init__(job, name, table, home, group)
        o = self.opts
        self.others = [p for p in self.parties if p != name]
        parts = len(self.others) + (1 if table.width else 0)
        if o.split_model == "two-tower" and parts != 2:
            raise UserError(f"--split-model two-tower joins two towers; this job has {parts} "
                            "parties with columns (use two-tower-mlp, mlp or linear)")  # fmt: skip
        if o.label_dp and table.task == "regression":
            raise UserError("--label-dp is randomized response over classes: a regression "
                            "label has none")  # fmt: skip
        task = self.task = table.task
        seeded(job.train.seed, -1)
        module = build_top(o.split_model, parts, table.num_outputs, o.bottom_hidden, o.tower_dim)

        def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return per_sample_loss(task, out, y).mean()

        opt = build_optimizer(module.parameters(), job.optim)
        reduce = self._reduce_top if group.size > 1 else None
        self.top = Top(module, opt, loss, o.vertical_noise, self.noise_gen, reduce)
        self.bottom = self.bottom_of(table.width, table.num_outputs, 0.0) if table.width else None
        classes = 2 if task == "binary" else table.num_outputs
        self.link = LabelParty(
            secret, self.others, table.train.ids, self.top, self.bottom, bind=address,
            align=o.align if group.first else "exact",
            label_dp=(o.label_dp, classes) if o.label_dp else None,
        )  # fmt: skip
        self.link.part = group.part
        self.link.stop_agreed = False if group.size > 1 else None
        self.link.outputs = table.num_outputs
        self.link.plan_check = plan_of(job)
        if table.test is not None and group.first:
            self.link.add_split("test", table.test.ids)
        self.link.after_step = self._after_step
        self.link.scorer = self._score
        self.counts: dict[int, int] = {}  # (this process's, since it started)
        self.digests: dict[int, int] = {}
        self.prior: tuple[dict[int, int], dict[int, int]] = ({}, {})  # (from the checkpoint)
        self.window = _Window()
        self.compute_seen = dict.fromkeys(self.others, 0.0)
        self.writer: Any = None

    def _reduce_top(self, grads: list[torch.Tensor]) -> None:
        """The top's gradients summed over the label party's processes, and with them
        whether any of them (or of its parties) was told to stop: all stop at one step."""
        told = self.group.reduce(grads, 1.0 if self.link.stop is not None else 0.0)
        self.link.stop_agreed = told > 0

    # --- the loop -------------------------------------------------------------------

    def run(self) -> None:
        from shoal.writer import RunWriter

        job, link, table, g = self.job, self.link, self.table, self.group
        t = job.train
        began = time.perf_counter()
        if g.first:
            start = link.agree(self.held_steps())
        else:
            link.greet()  # (its parties' processes said hello: they wait for theirs too)
        start = g.broadcast(start if g.first else None)
        state = self.load(start) if start >= 0 else None
        if state is not None:
            link.rr_seed = int(state["rr_seed"])
        link.rr_seed = g.broadcast(link.rr_seed)  # (each label's noisy copy drawn once)
        features = table.train.features if table.width else None
        shared = None
        if g.first:
            common = link.align(table.train.labels, features)  # type: ignore[arg-type]
            test = None
            if table.test is not None:
                test = link.align(table.test.labels, split="test")  # type: ignore[arg-type]
            shared = (common, test)
        common, test = g.broadcast(shared)
        self.common = link.adopt("train", common, table.train.labels, features)
        self.test_rows = None
        if test is not None and g.first:
            self.test_rows = torch.from_numpy(rows_of(table.test.ids, test))  # type: ignore[union-attr]
        self.align_s = time.perf_counter() - began
        self.per_epoch = -(-len(self.common) // t.batch_size)
        total = self.total = t.total_steps(self.per_epoch)
        optimizers = [self.top.optimizer, *([self.bottom.optimizer] if self.bottom else [])]
        self.schedulers = [build_scheduler(o, job.optim, total) for o in optimizers]
        if state is not None:
            self.top.module.load_state_dict(state["top"])
            self.top.optimizer.load_state_dict(state["top_optimizer"])
            if self.bottom is not None:
                self.bottom.module.load_state_dict(state["bottom"])
                self.bottom.optimizer.load_state_dict(state["bottom_optimizer"])
            for s, saved in zip(self.schedulers, state["schedulers"]):
                s.load_state_dict(saved)
            self.prior = (
                {int(k): int(v) for k, v in state["counts"].items()},
                {int(k): int(v) for k, v in state["digests"].items()},
            )
            if g.first:
                print(f"shoal: vertical: every party resumes from step {start}",
                      file=sys.stderr)  # fmt: skip
        if g.first:
            self.writer = RunWriter(job, total, self.resumed_from, self.opts.split_model)
            self.writer.start(f"vertical x{len(self.parties)}", self.step)
        self.bytes_before = self._bytes()
        self.session_from = self.step
        self.window = _Window(mine=link.compute_mine)
        self.train_s = 0.0  # (seconds in training steps, evaluations and checkpoints left out)
        self.train_started = self.wall_time()
        bounds = boundaries(job, total)
        logs = set(range(t.log_every, total, t.log_every)) if t.log_every else set()
        try:
            for mark in sorted(b for b in bounds | logs if b > self.step):
                began = time.perf_counter()
                link.train(mark, t.batch_size, t.seed, start=self.step)
                self.train_s += time.perf_counter() - began
                if link.stop_after is not None:
                    self.step = link.stop_after
                    self._log()
                    self._save()
                    self.preempted(link.stop)
                self.step = mark
                if mark in logs or mark == total:
                    self._log()
                if mark in bounds:
                    self._save()
                    if self.test_rows is not None and (
                        mark == total or (t.eval_every and mark % t.eval_every == 0)
                    ):
                        link.evaluate(mark)
            self.saver.wait()
            self._finish()
        finally:
            if self.writer is not None:
                self.writer.close()

    def _after_step(self, step: int, loss_sum: float, positions: np.ndarray) -> None:
        for s in self.schedulers:
            s.step()
        epoch, samples = step // self.per_epoch, len(positions)
        self.counts[epoch] = self.counts.get(epoch, 0) + samples
        self.digests[epoch] = (self.digests.get(epoch, 0) + digest(positions)) & MASK64
        w = self.window
        w.loss_sum += loss_sum
        w.samples += samples
        w.steps += 1
        if self.writer is not None:
            self.writer.tick(step + 1)

    def _totals(self) -> tuple[dict[int, int], dict[int, int]]:
        """Samples and digests per epoch over every process of the label party (and the
        run before the checkpoint it resumed from). Collective."""
        counts, digests = dict(self.prior[0]), dict(self.prior[1])
        for c, d in self.group.gather((self.counts, self.digests)):
            for e, n in c.items():
                counts[e] = counts.get(e, 0) + n
            for e, x in d.items():
                digests[e] = (digests.get(e, 0) + x) & MASK64
        return counts, digests

    def _bytes(self) -> tuple[int, int]:
        c = self.link.comm.values()
        return sum(x.sent for x in c), sum(x.received for x in c)

    def _log(self) -> None:
        w, link = self.window, self.link
        elapsed = time.perf_counter() - w.start
        sent, received = self._bytes()
        theirs = [link.compute_s[p] - self.compute_seen[p] for p in self.others]
        self.compute_seen = dict(link.compute_s)
        sums = self.group.sum([w.loss_sum, w.samples, sent, received,
                               link.compute_mine - w.mine, *theirs,
                               *(link.comm[p].received for p in self.others),
                               *(link.comm[p].sent for p in self.others)])  # fmt: skip
        self.window = _Window(mine=link.compute_mine)
        if self.writer is None:
            return
        loss, samples, sent, received, mine = sums[:5]
        k = len(self.others)
        memory = {"params": float(self._state_bytes()), "private": float(private_bytes())}
        windows = {0: Window(loss, samples, sent, received, _phases(mine), memory)}
        for i in range(1, k + 1):
            windows[i] = Window(0.0, 0.0, sums[5 + k + i - 1], sums[5 + 2 * k + i - 1],
                                _phases(sums[5 + i - 1]))  # fmt: skip
        lr = self.schedulers[0].get_last_lr()[0]
        self.writer.window(
            windows, step=self.step, epoch=self.step / self.per_epoch, lr=lr, steps=w.steps,
            global_samples=int(samples), elapsed=elapsed, wall_time=self.wall_time(),
            shares=1,
        )  # fmt: skip

    def _state_bytes(self) -> int:
        parts = [self.top, *([self.bottom] if self.bottom is not None else [])]
        return sum(state_bytes(p.module.parameters(), p.optimizer)["params"] for p in parts)

    def _save(self) -> None:
        b = self.bottom
        counts, digests = self._totals()
        self.save({
            "step": self.step, "top": self.top.module.state_dict(),
            "top_optimizer": self.top.optimizer.state_dict(),
            **({"bottom": b.module.state_dict(), "bottom_optimizer": b.optimizer.state_dict()}
               if b is not None else {}),
            "schedulers": [s.state_dict() for s in self.schedulers],
            "counts": counts, "digests": digests,
            "rr_seed": self.link.rr_seed, "noise_gen": self.noise_gen.get_state(),
            "wall_time": self.wall_time(),
        })  # fmt: skip

    @torch.no_grad()
    def _score(self, step: int, outputs: list[torch.Tensor]) -> None:
        from sklearn.metrics import roc_auc_score

        test = self.table.test
        assert test is not None and self.test_rows is not None and test.labels is not None
        parts = list(outputs)
        if self.bottom is not None:
            parts.insert(0, self.bottom.module(test.features[self.test_rows]))
        logits = self.top.module(torch.cat(parts, 1))
        y = test.labels[self.test_rows]
        metrics = {"test_loss": float(per_sample_loss(self.task, logits, y).mean())}
        if self.task == "classification":
            metrics["test_accuracy"] = float((logits.argmax(-1) == y).float().mean())
        elif self.task == "binary":
            scores = logits.reshape(y.shape)
            metrics["test_accuracy"] = float(((scores > 0).float() == y).float().mean())
            if 0 < float(y.sum()) < len(y):
                metrics["auc"] = float(roc_auc_score(y.numpy(), scores.numpy()))
        self.writer.record_evaluation(metrics, step, self.wall_time())

    def _finish(self) -> None:
        from shoal.data.datasets import Dataset, TensorRows

        link, w, g = self.link, self.writer, self.group
        counts, digests = self._totals()
        sent, received = self._bytes()
        k = len(self.others)
        sums = g.sum([sent + received - sum(self.bytes_before), self.train_s,
                      *(link.comm[p].received for p in self.others),
                      *(link.comm[p].sent for p in self.others)])  # fmt: skip
        wall = self.wall_time()
        result = None
        if g.first:
            steps_here = max(1, self.step - self.session_from)
            session = sum(counts.values()) - sum(self.prior[0].values())
            vertical = {
                "parties": self.parties, "label_party": self.name, "align": self.opts.align,
                "processes_per_party": g.size, "common_ids": len(self.common),
                "test_common_ids": None if self.test_rows is None else len(self.test_rows),
                "split_model": self.opts.split_model, "staleness": self.opts.staleness,
                "noise": self.opts.vertical_noise,
                "label_dp_epsilon": self.opts.label_dp or None,
                "bytes_per_step": sums[0] / steps_here, "align_s": self.align_s,
                "train_started_s": self.train_started,
                "train_samples_per_s": session / max(sums[1] / g.size, 1e-9),
                "bytes_per_party": {p: {"sent": sums[2 + i], "received": sums[2 + k + i]}
                                    for i, p in enumerate(self.others)},
            }  # fmt: skip
            result = {"final_loss": w.last_loss, **w.eval_metrics, "steps": self.step,
                      "samples_per_s": sum(counts.values()) / wall if wall > 0 else 0.0,
                      "vertical": vertical}  # fmt: skip
        result = g.broadcast(result)
        theirs = link.finish(result)
        me = Totals(self.index * g.size + g.rank, socket.gethostname(), sent, received,
                    {"params": self._state_bytes()},
                    {"forward_backward": link.compute_mine})  # fmt: skip
        gathered = g.gather((me.to_dict(), theirs))
        if not g.first:
            return
        totals = []
        for mine, parties in gathered:
            for d in [mine, *(parties.get(p) for p in self.others)]:
                with contextlib.suppress(ValueError):  # (a party's word: malformed, left out)
                    totals.append(Totals.from_dict(d))
        parts = {"top": self.top.module}
        if self.bottom is not None:
            parts["bottom"] = self.bottom.module
        model = torch.nn.ModuleDict(parts)
        rows = TensorRows(torch.zeros(len(self.common), 0), torch.zeros(len(self.common)))
        data = Dataset(name=f"vertical: {', '.join(self.parties)}", task=self.task,
                       train=rows, test=None, num_outputs=self.table.num_outputs,
                       input_shape=(0,))  # fmt: skip
        epochs = [self._epoch_report(e, n, digests) for e, n in sorted(counts.items())]
        w.finish(
            model, dataset=data, world_size=len(self.parties), steps=self.step,
            num_parameters=sum(p.numel() for p in model.parameters()), wall_time=wall,
            counts=counts, totals=totals, epochs=epochs, vertical=result["vertical"],
            checkpoints={"saved": self.saver.saves - self.saver.failed,
                         "failed": self.saver.failed, "background": self.saver.background,
                         "stall_s": self.saver.stall_s},
            resumed_from_step=self.resumed_from, preemptions=preempt.history(self.home),
        )  # fmt: skip

    def _epoch_report(self, epoch: int, n: int, digests: dict[int, int]) -> dict[str, Any]:
        from shoal.data.order import FeistelPermutation

        got = digests.get(epoch, 0)
        if n == len(self.common):
            want = range_digest(0, n)
        else:
            seed = self.job.train.seed * 1_000_003 + epoch  # (as batch_rows orders an epoch)
            want = digest(FeistelPermutation(len(self.common), seed)(np.arange(n)))
        return {"epoch": epoch, "samples": n, "digest": f"{got:016x}",
                "expected": f"{want:016x}", "exact": got == want}  # fmt: skip

    def close(self) -> None:
        super().close()
        self.link.close()


def _phases(compute: float) -> dict[str, float]:
    return {**dict.fromkeys(PHASES, 0.0), "forward_backward": compute}


class _Window:
    """The label party's figures since the last log record."""

    def __init__(self, mine: float = 0.0) -> None:
        self.loss_sum = 0.0
        self.samples = 0.0
        self.steps = 0
        self.start = time.perf_counter()
        self.mine = mine
        """The label party's compute seconds when the window began."""
