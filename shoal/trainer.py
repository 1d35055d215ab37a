"""The training loop: data -> strategy step -> metrics and checkpoints.

Runs inside every worker process. It knows nothing about how a strategy
communicates; it only feeds batches, gathers telemetry at log steps and saves
what the strategy says its state is.
"""

from __future__ import annotations

import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from shoal import balance, checkpoint, preempt
from shoal.config import JobConfig
from shoal.data import Dataset, GlobalBatchSampler, Task, build_dataset, build_order
from shoal.data.loader import Audit, Loader
from shoal.data.order import MASK64, digest
from shoal.dist import CollectiveGatherer, DistEnv, attempt, peer_failure
from shoal.errors import UserError
from shoal.faults import Injector
from shoal.inplace import state as inplace_state
from shoal.inplace.member import Member
from shoal.inplace.regroup import NewcomerWaits, Regrouping
from shoal.memory import ActivationMeter, private_bytes
from shoal.metrics import PHASES, PhaseTimer
from shoal.models import build_model
from shoal.models.sparse import count_parameters, remote_tables
from shoal.models.tasks import per_sample_loss
from shoal.preempt import Preempted, Preemption
from shoal.strategies import Batch, Strategy, resolve
from shoal.telemetry import Totals, Window, merge_counts
from shoal.writer import RunWriter


@dataclass
class _Window:
    """Telemetry accumulated on this rank since the last log record."""

    loss_sum: torch.Tensor
    count: int = 0
    digest: int = 0
    global_samples: int = 0
    steps: int = 0
    start: float = field(default_factory=time.perf_counter)


class Trainer(Regrouping):
    """One worker's view of a training job."""

    def __init__(self, job: JobConfig, env: DistEnv, member: Member | None = None) -> None:
        self.job = job
        self.env = env
        self.member = member
        """This worker's membership of an in-place job (``--recovery inplace``)."""
        self.out = Path(job.output.out)
        torch.manual_seed(job.train.seed)
        self.data: Dataset = build_dataset(job.data)
        self.loader = Loader(self.data.rows, env.device, job.data.prefetch)
        self.plugin = resolve(job)
        self.strategy: Strategy = self.plugin.build(job, env)
        with remote_tables(self.plugin.remote_tables):
            model = build_model(job.model, self.data).to(env.device)
        self.num_parameters = count_parameters(model)
        dp_rank, dp_size = self.strategy.data_rank
        self.sampler = GlobalBatchSampler(
            self.data.num_train,
            job.train.batch_size,
            dp_rank,
            dp_size,
            seed=job.train.seed,
            drop_last=job.data.drop_last,
            order=build_order(self.data, job.data, job.train.seed),
        )
        self.balancer = balance.Balancer(
            balance.parse(job.train.balance), dp_size, dp_rank, job.train.balance_every
        )
        self.balancing = self.balancer.spec.mode != "equal"
        if self.balancing:
            self.sampler.cut = self.balancer.sizes
        self.total_steps = job.train.total_steps(self.sampler.steps_per_epoch)
        self.activations = ActivationMeter()
        """What each forward saves for backward (measured at logging steps)."""
        example = self.loader.get(np.arange(min(64, self.data.num_train)))
        self.strategy.data = self.data
        self.strategy.setup(model, self.total_steps, example, self.activations)
        self.gatherer = self.strategy.gatherer()
        self.step = 0
        self.finished = 0
        """Steps this process finished (since it started, or was restarted)."""
        self.wall_offset = 0.0
        self.prior_samples: dict[int, int] = {}
        self.prior_digests: dict[int, int] = {}
        # this rank's seconds per phase, and (stepping) the wall of its training steps from
        # one step's end to the next's with the forward and backward in them
        self.time_totals = dict.fromkeys((*PHASES, "stepping", "stepping_compute"), 0.0)
        self.writer: RunWriter | None = None  # on the rank that writes the run, while it runs
        self.saver = checkpoint.AsyncSaver(
            self.out, job.train.keep_checkpoints, background=job.train.checkpoint_async
        )
        self.faults = Injector(env.rank, run_dir=self.out)
        self.resumed_from: int | None = None
        self.peak_memory: dict[str, int] = {}  # the most this rank held, per figure
        self.restarts = attempt()
        self.ledger = inplace_state.Ledger()  # (in-place jobs: committed steps' batches)
        self.taken: list[Task] = []  # tasks taken and not yet committed
        self.regroups: list[dict[str, Any]] = []  # this process's, for the summary
        self.pending_log: tuple[Any, dict[str, Any]] | None = None  # a record's gather, out
        self.sent = 0  # bytes of state this process sent in its last regroup
        self.state_s = 0.0  # seconds this process spent passing state in its last regroup

    # --- state --------------------------------------------------------------------

    def restore(self) -> Path | None:
        """Continue from the newest good checkpoint in the run directory, if any."""
        found = checkpoint.load_latest(self.out)
        self._agree_on(checkpoint.step_of(found[0]) if found else -1)
        if found is None:
            return None
        path, state = found
        self.strategy.load_state_dict(state["strategy"])
        if (path / checkpoint.SHARDS_DIR).is_dir():  # written by a sharded strategy
            self.strategy.load_shards(path / checkpoint.SHARDS_DIR)
        self.sampler.load_state_dict(state["sampler"])
        if "balance" in state:
            self.balancer.load_state_dict(state["balance"])
        self.step = int(state["step"])
        self.faults.resumed_at(self.step)
        self.resumed_from = self.step
        self.wall_offset = float(state["wall_time"])
        self.prior_samples = {int(k): int(v) for k, v in state["samples_per_epoch"].items()}
        self.prior_digests = {int(k): int(v) for k, v in state.get("digests", {}).items()}
        rng = state["rng"]
        if self.env.rank < len(rng):
            torch.set_rng_state(rng[self.env.rank])
        return path

    def _agree_on(self, step: int) -> None:
        """Every rank of a process group must resume from the same checkpoint."""
        if not torch.distributed.is_initialized():
            return
        mine = torch.tensor([step, -step], dtype=torch.int64)
        both = mine.clone()
        torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX)
        if int(both[0]) != -int(both[1]):
            raise UserError(
                f"the workers see different newest checkpoints in {self.out} (rank "
                f"{self.env.rank} sees step {step}): the run directory must be on a "
                "filesystem every machine sees"
            )

    def save_checkpoint(self) -> None:
        """Every rank contributes its RNG and sample counts; the writer saves."""
        self._flush_log()
        rng = self.gatherer.gather(torch.get_rng_state(), "rng")
        counts, digests = self.samples_per_epoch(), self.digests_per_epoch()
        own = self.strategy.state_dict()  # on every rank: a strategy may gather its state
        state: dict[str, Any] = {}
        if rng is not None and counts is not None:
            state = {
                "step": self.step,
                "strategy": own,
                "sampler": self.sampler.state_dict(),
                "balance": self.balancer.state_dict(),
                "rng": [r.clone() for r in rng],  # own storage each: set_rng_state ignores offsets
                "samples_per_epoch": counts,
                "digests": digests,
                "wall_time": self.wall_time(),
            }
        if self.plugin.sharded_checkpoints:  # every rank writes its part of the model
            self.saver.save_sharded(self.step, state, self.strategy.save_shards, bool(state))
        elif state:
            self.saver.save(self.step, state)

    def samples_per_epoch(self) -> dict[int, int] | None:
        """Samples consumed per epoch by all workers together (on the writer)."""
        local = torch.zeros(self.sampler.epoch + 1, dtype=torch.float64)
        for epoch, n in self.sampler.samples_seen.items():
            local[epoch] = n if self.strategy.reports else 0
        rows = self.gatherer.gather(local, "counts")
        if rows is None:
            return None
        counts = merge_counts(self.prior_samples, rows.sum(0).tolist())
        for epoch, n in self.ledger.credited[0].items():  # (lost members': see _fold)
            counts[epoch] = counts.get(epoch, 0) + n
        return counts

    def digests_per_epoch(self) -> dict[int, int] | None:
        """The digest of the samples consumed per epoch by all workers (on the writer)."""
        local = torch.zeros(self.sampler.epoch + 1, dtype=torch.int64)
        for epoch, d in self.sampler.digests.items():
            local[epoch] = int(np.uint64(d).view(np.int64)) if self.strategy.reports else 0
        rows = self.gatherer.gather(local, "digests")
        if rows is None:
            return None
        total = dict(self.prior_digests)
        for epoch, d in enumerate(rows.numpy().view(np.uint64).sum(0, dtype=np.uint64).tolist()):
            total[epoch] = (total.get(epoch, 0) + int(d)) & MASK64
        for epoch, d in self.ledger.credited[1].items():
            total[epoch] = (total.get(epoch, 0) + d) & MASK64
        return total

    # --- loop ---------------------------------------------------------------------

    def loss_fn(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        x, y = batch
        self.faults.in_step(self.step + 1, len(y))
        with self.activations.measure():
            return per_sample_loss(self.data.task, model(x), y)

    def run(self) -> None:
        """Train to ``total_steps``, logging, evaluating and checkpointing on the way."""
        t = self.job.train
        if self.gatherer.is_writer and self.writer is None:  # (a newcomer may have one)
            self.writer = RunWriter(self.job, self.total_steps, self.step)
            self.writer.start(f"{self.job.strategy.name} x{self.env.world_size}", self.step)
        self._start = time.perf_counter()
        timer = PhaseTimer(self.env.device)
        window = _Window(torch.zeros((), device=self.env.device, dtype=torch.float64))
        work = self.strategy.work(self.sampler, self.step, self.total_steps)
        audit = Audit(self.out, self.step, self.env.rank) if self.job.data.audit_samples else None
        self.balancer.start(self.step)
        first = True
        # where this rank's busy time for --balance auto began: the end of the last step
        # measured (a first step sets things up; a step with an evaluation, a checkpoint
        # or a re-plan, collectives that wait for the slowest rank, is not measured)
        busy_since: float | None = None
        stepped = 0.0  # when the last step ended (a measured step's whole time runs from it)
        # (the parameter server's workers have no group to agree in: ps is not preemptible)
        grouped = dist.is_initialized() and self.plugin.needs_process_group
        preemption = Preemption() if grouped else None
        try:
            while True:  # one pass per generation of an in-place job
                try:
                    while True:
                        with timer.phase("wait"):
                            task = work.next()
                        if task is None:
                            break
                        self.taken.append(task)
                        with timer.phase("data"):
                            batch = self.loader.get(task.indices)
                            ahead = work.peek()
                            if ahead is not None:  # read in the background while this step trains
                                self.loader.ahead(ahead.indices)
                        lr = self.strategy.lr
                        self.step = task.step  # until it is done
                        # activations: measured in the first step and each step that logs
                        self.activations.enabled = first or work.log_now(task.step + 1)
                        first = False
                        if t.max_rank_batch:
                            sizes = self.balancer.sizes(task.global_batch)
                            self.strategy.micro_batches = balance.micro_batches(
                                sizes, t.max_rank_batch
                            )
                        loss_sum = self.strategy.train_step(
                            batch, self.loss_fn, task.loss_scale, timer
                        )
                        self.faults.computed(len(task.indices), self.strategy.compute_time)
                        done = time.perf_counter()
                        if busy_since is not None:  # the step less its waits on peers
                            # (steps that follow an evaluation, a checkpoint or a regroup
                            # are not counted: the wall between them is not training's)
                            self.time_totals["stepping"] += done - stepped
                            self.time_totals["stepping_compute"] += self.strategy.compute_time
                            busy = done - busy_since - self.strategy.wait_time
                            self.balancer.observe(
                                len(task.indices), busy, self.strategy.compute_time, done - stepped
                            )
                        busy_since = stepped = done
                        if ahead is not None and self.strategy.prefetches:
                            # the next task's rows are asked for now (after this step's push, so
                            # they hold it) and arrive while the next task is fetched
                            with timer.phase("data"):
                                upcoming = self.loader.get(ahead.indices)
                            with timer.phase("comm"):
                                self.strategy.prefetch(upcoming)
                        self.step = task.step + 1
                        self.finished += 1
                        self._committed(task)
                        window.loss_sum += loss_sum
                        window.count += len(task.indices)
                        window.digest = (window.digest + digest(task.indices)) & MASK64
                        if audit is not None:
                            audit.write(task.step, task.part, task.parts, task.indices)
                        window.global_samples += task.global_batch
                        window.steps += 1
                        last = self.step == self.total_steps
                        if work.log_now(self.step):
                            busy_since += self._log(window, timer, lr, task)
                            window = _Window(torch.zeros_like(window.loss_sum))
                        elif self.writer is not None:
                            self.writer.tick(self.step)
                        if self.balancer.due(self.step) and not last:
                            self.balancer.replan(self.step, self.env.device)
                            busy_since = None
                        if t.eval_every and self.step % t.eval_every == 0 and not last:
                            began = time.perf_counter()
                            self._evaluate()
                            self._together()
                            window.start += time.perf_counter() - began  # (not a step's time)
                            busy_since = None
                        if t.checkpoint_every and self.step % t.checkpoint_every == 0 and not last:
                            self.save_checkpoint()
                            busy_since = None
                        self.faults.after_step(self.step)
                        if preemption is not None:
                            told = preemption.poll(self.strategy.consistent_after(self.step))
                            if told is not None:
                                self._preempted(*told)
                        if (
                            self.member is not None
                            and self.strategy.consistent_after(self.step)
                            and self.member.due(self.step)
                        ):
                            raise NewcomerWaits(self.step)
                    break
                except Exception as e:
                    if self.member is None or not (isinstance(e, NewcomerWaits) or peer_failure(e)):
                        raise
                    why = str(e).splitlines()[0][:200]
                    if isinstance(e, NewcomerWaits):
                        self._flush_log()
                    self.pending_log = None  # (a lost member: its gather was on the broken group)
                    _drop_frames(e)  # (their locals hold the group)
                # (the exception is gone here, and with it any hold of its frames on the group)
                if preemption is not None:
                    preemption.regrouped()
                while True:  # (a member lost while the next generation forms: again)
                    try:
                        work = self._regroup(why)
                        self.faults.regrouped()
                        break
                    except Exception as e:
                        if not peer_failure(e):
                            raise
                        why = str(e).splitlines()[0][:200]
                        _drop_frames(e)
                busy_since = None
        except BaseException as e:
            self.saver.settle()  # a checkpoint begun before the failure is one to resume from
            if self.writer is not None:
                self.writer.close()
            if preemption is not None and isinstance(e, Preempted):
                preemption.restore()
            elif preemption is not None:
                preemption.failed()  # a failure, not a preemption: signals act at once again
            raise
        finally:
            self.loader.close()
            if audit is not None:
                audit.close()
        self._end(preemption)

    def _end(self, preemption: Preemption | None) -> None:
        """The final checkpoint, evaluation and summary. The preemption handlers stay
        until they are written: a signal meanwhile lets them finish, and then every rank
        stops as a preempted one does (a default handler would kill the process half-way)."""
        try:
            self.faults.at_end()
            self.save_checkpoint()
            self._evaluate()
            self.saver.wait()
            self._finish()
            told = preemption.settle() if preemption is not None else None
            if told is not None:  # (noted before the handlers go: the launcher reads it)
                self._stop(*told)
        except Preempted:
            raise
        except BaseException:
            if preemption is not None:
                preemption.failed()
            raise
        finally:
            if preemption is not None:
                preemption.restore()

    def _preempted(self, signame: str, received: float) -> None:
        """Every rank was told (or a peer was): checkpoint this step and stop."""
        self.save_checkpoint()
        self.saver.wait()
        self._stop(signame, received)

    def _stop(self, signame: str, received: float) -> None:
        """This step's checkpoint is written: note the preemption (rank 0) and stop."""
        entry: dict[str, Any] = {}
        if self.env.is_main:
            entry = preempt.record(
                self.out, self.step, signame, received, self.job.cluster.grace_period
            )
            print(f"shoal: {signame}: stopped after step {self.step}, checkpoint written "
                  f"{entry['checkpoint_s']:.1f} s after the signal", file=sys.stderr,
                  flush=True)  # fmt: skip
        raise Preempted(self.step, entry)

    def wall_time(self) -> float:
        return self.wall_offset + time.perf_counter() - self._start

    def _log(self, window: _Window, timer: PhaseTimer, lr: float, task: Task) -> float:
        """Every rank contributes its window; the writer records it. Returns the seconds
        spent in the gather (waiting for the slowest rank)."""
        phases = timer.take()
        for k, v in phases.items():
            self.time_totals[k] = self.time_totals.get(k, 0.0) + v
        comm = self.strategy.comm
        reports = self.strategy.reports
        mine = Window(
            loss_sum=window.loss_sum.item() if reports else 0.0,
            samples=window.count if reports else 0,
            bytes_sent=comm.sent,
            bytes_received=comm.received,
            phases=phases,
            memory={k: float(v) for k, v in self._memory().items()},
        )
        epoch = self.step / self.sampler.steps_per_epoch
        meta = {
            "step": self.step,
            "task": [task.step, task.part],
            "epoch": epoch,
            "lr": lr,
            "steps": window.steps,
            "global_samples": window.global_samples,
            "digest": f"{window.digest:016x}" if reports else "0",
        }
        began = time.perf_counter()
        self._flush_log()
        shares = self.balancer.log() if self.balancing else None
        record = {
            "step": self.step,
            "epoch": epoch,
            "lr": lr,
            "steps": window.steps,
            "global_samples": window.global_samples,
            "elapsed": time.perf_counter() - window.start,
            "wall_time": self.wall_time(),
            "rank_shares": shares,
            "extra": self.strategy.metrics() if self.writer is not None else {},
        }
        if isinstance(self.gatherer, CollectiveGatherer):
            # in the background: written at the next record (or evaluation, checkpoint,
            # end), so that no step waits a round trip for the metrics on a distant link
            self.pending_log = (self.gatherer.start(mine.to_tensor()), record)
        else:
            rows = self.gatherer.gather(mine.to_tensor(), "window", meta)
            self.pending_log = (lambda: rows, record)
            self._flush_log()
        return time.perf_counter() - began

    def _flush_log(self) -> None:
        """Write the metrics record whose gather is out, if one is (collective)."""
        if self.pending_log is None:
            return
        finish, record = self.pending_log
        self.pending_log = None
        rows = finish()
        if rows is not None and self.writer is not None:
            self.writer.window({r: Window.from_tensor(row) for r, row in enumerate(rows)}, **record)

    def _memory(self) -> dict[str, int]:
        """This rank's memory figures (the activation peak: since the last call), also
        kept as the run's peak."""
        now = {
            **self.strategy.memory(),
            "activations_peak": self.activations.take_peak(),
            "private": private_bytes(),
        }
        for k, v in now.items():
            self.peak_memory[k] = max(self.peak_memory.get(k, 0), v)
        return now

    def _together(self) -> None:
        """Every rank waits here for the others (after the writer evaluated alone), where
        the ranks' telemetry travels by collectives: the wait is then no step's."""
        if isinstance(self.gatherer, CollectiveGatherer) and self.env.world_size > 1:
            dist.barrier()

    def _evaluate(self) -> None:
        self._flush_log()  # (the step's record before its evaluation's)
        model = self.strategy.eval_model()  # collective where the model is sharded
        if self.writer is not None:
            self.writer.evaluation(model, self.data, self.env.device, self.step, self.wall_time())

    def _finish(self) -> None:
        """Every rank contributes its totals; the writer exports the model and summary."""
        self._flush_log()
        comm = self.strategy.comm
        model = self.strategy.eval_model()  # collective where the model is sharded
        self._memory()
        mine = Totals(
            rank=self.env.rank,
            host=self.env.host,
            bytes_sent=comm.sent,
            bytes_received=comm.received,
            memory=dict(self.peak_memory),
            time=dict(self.time_totals),
            own=self.strategy.totals(),
        )
        gathered = self.gatherer.gather_object(mine.to_dict(), "totals")
        counts, digests = self.samples_per_epoch(), self.digests_per_epoch()
        if gathered is None or counts is None or digests is None or self.writer is None:
            return
        totals = [Totals.from_dict(d) for d in gathered]
        self.writer.finish(
            model,
            dataset=self.data,
            world_size=self.env.world_size,
            steps=self.step,
            num_parameters=self.num_parameters,
            wall_time=self.wall_time(),
            counts=counts,
            epochs=self.sampler.digest_report(counts, digests),
            totals=totals,
            **self.strategy.summarize(totals),
            checkpoints={
                "saved": self.saver.saves - self.saver.failed,
                "failed": self.saver.failed,
                "background": self.saver.background,
                "stall_s": self.saver.stall_s,
            },
            restarts=self.restarts,
            resumed_from_step=self.resumed_from,
            **({"balance": self.balancer.summary()} if self.balancing else {}),
            preemptions=preempt.history(self.out),
            **({"regroups": self.regroups} if self.member is not None else {}),
        )


def _drop_frames(e: BaseException) -> None:
    """Clear the locals of every frame ``e`` and the exceptions it chains to passed
    through: a collective that failed inside backward (an FSDP hook, say) leaves frames
    whose locals hold the model's state, and with it the process group's sockets."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        traceback.clear_frames(x.__traceback__)
        todo += [x.__cause__, x.__context__]
