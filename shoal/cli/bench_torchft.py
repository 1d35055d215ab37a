"""torchft's fault-tolerant DDP on a shoal job, for comparison (``shoal bench faults
--recovery torchft``, ``bench/torchft_ddp.py``).

torchft (meta-pytorch/torchft; ``pip install -e '.[bench]'``) is the reference for
recovery in place: a Lighthouse forms a quorum every step, a replica group that
fails is left out, and a new one heals from a live peer. Here each replica group
is one process (torchft's unit of failure) training the job's model, data,
optimizer and schedule, built by shoal from the job itself; each global step's
batch (shoal's own order, so the same samples in the same steps) is cut over the
replicas that take part in it (``participating_rank`` of ``num_participants``), so
the global batch stays the same whatever the quorum.

With a mean time between failures, a random replica is SIGKILLed at exponential
intervals (the clock waits, after each kill, for the next committed step, as
``shoal bench faults`` does) and a new process takes its place. Every replica
appends each step it commits, with when and the sample ids it trained, to its
own file as it goes, so a killed one leaves its record: samples trained twice
or never are counted from them against the job's global batches.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

from shoal.config import JobConfig
from shoal.layout import write_config


def available() -> bool:
    """Whether torchft is installed."""
    return importlib.util.find_spec("torchft") is not None


def run(
    job: JobConfig, workers: int, out: Path, mtbf: float = 0.0, seed: int = 0,
    timeout_s: float = 900.0,
) -> dict[str, Any]:  # fmt: skip
    """Train ``job`` with torchft on ``workers`` replica groups of one process, killing
    one every ``mtbf`` seconds on average (0: never). Returns the wall time, the steps,
    each kill with the seconds to the next committed step, the median step time and the
    samples trained twice or never."""
    os.environ.setdefault("RUST_LOG", "error")  # (the Lighthouse logs every quorum at INFO)
    from torchft._torchft import LighthouseServer

    out.mkdir(parents=True, exist_ok=True)
    config = write_config(job, out)
    timeout = max(60.0, 10 * job.strategy.heartbeat_timeout)  # (torchft's own default: 60 s)
    lighthouse = LighthouseServer(
        bind="[::]:0",
        min_replicas=1,
        join_timeout_ms=100,
        heartbeat_timeout_ms=int(job.strategy.heartbeat_timeout * 1000),
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rng = random.Random(seed)

    def start(k: int, incarnation: int) -> subprocess.Popen:
        cmd = [sys.executable, "-m", __name__, str(config), "--replica", str(k),
               "--record", str(out / f"replica{k}-{incarnation}.txt"),
               "--lighthouse", lighthouse.address(), "--timeout", str(timeout)]  # fmt: skip
        with open(out / f"replica{k}-{incarnation}.log", "w") as log:  # (the child keeps it)
            return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)

    began = time.time()
    procs = {k: start(k, 0) for k in range(workers)}
    incarnations = dict.fromkeys(procs, 0)
    kills: list[float] = []
    due = began + rng.expovariate(1 / mtbf) if mtbf else None
    try:
        while any(p.poll() is None for p in procs.values()):
            time.sleep(0.05)
            if time.time() - began > timeout_s:
                raise TimeoutError(f"torchft did not finish in {timeout_s:g} s (see {out})")
            if due is None or time.time() < due:
                continue
            k = rng.randrange(workers)
            if procs[k].poll() is None:
                procs[k].send_signal(signal.SIGKILL)
                procs[k].wait()
                kills.append(time.time())
                incarnations[k] += 1
                procs[k] = start(k, incarnations[k])
                while _last_commit(out) < kills[-1] and time.time() - began < timeout_s:
                    time.sleep(0.05)  # (the clock runs while the replicas train)
            due = time.time() + rng.expovariate(1 / mtbf)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
        lighthouse.shutdown()
    wall = time.time() - began
    failed = [k for k, p in procs.items() if p.returncode != 0]
    if failed:
        log = out / f"replica{failed[0]}-{incarnations[failed[0]]}.log"
        last = [x for x in log.read_text(errors="replace").splitlines() if x.strip()][-1:]
        raise RuntimeError(
            f"replica {failed[0]} failed after {len(kills)} kills ({(last or ['?'])[0][:160]}); "
            f"see {log}"
        )
    commits = _commits(out)
    times = sorted(t for _, t, _ in commits)
    return {
        "wall_s": wall,
        "steps": 1 + max(s for s, _, _ in commits),
        "step_time_s": _step_time(out),
        "kills": [{"recover_s": next((t - k for t in times if t > k), None)} for k in kills],
        **_accounting(job, commits),
    }


def _commits(out: Path) -> list[tuple[int, float, list[int]]]:
    """Every step every replica committed: (step, when, its sample ids)."""
    found = []
    for path in sorted(out.glob("replica*.txt")):
        for line in path.read_text().splitlines():
            parts = line.split(" ")
            if len(parts) == 3:  # (a line cut short by a kill is not a commit)
                ids = [int(i) for i in parts[2].split(",") if i]
                found.append((int(parts[0]), float(parts[1]), ids))
    return found


def _step_time(out: Path) -> float:
    """The median time between two commits of one replica (start-up left out)."""
    gaps = []
    for path in out.glob("replica*.txt"):
        times = [float(line.split(" ")[1]) for line in path.read_text().splitlines()[1:]]
        gaps += [b - a for a, b in itertools.pairwise(times)]
    return statistics.median(gaps) if gaps else float("nan")


def _last_commit(out: Path) -> float:
    """When the newest commit of any replica was recorded (0: none yet)."""
    newest = 0.0
    for path in out.glob("replica*.txt"):
        with open(path, "rb") as fh:
            fh.seek(max(0, path.stat().st_size - 4096))
            lines = fh.read().decode(errors="replace").splitlines()
        for line in reversed(lines):
            parts = line.split(" ")
            if len(parts) == 3:
                newest = max(newest, float(parts[1]))
                break
    return newest


def _accounting(job: JobConfig, commits: list[tuple[int, float, list[int]]]) -> dict[str, int]:
    """Samples of the job's global batches trained twice, or never, by the commits."""
    sampler, total = _sampler(job)
    per_step: dict[int, Counter] = {}
    for step, _, ids in commits:
        per_step.setdefault(step, Counter()).update(ids)
    twice = never = 0
    for step in range(total):
        batch = sampler.global_indices(*divmod(step, sampler.steps_per_epoch))
        got = per_step.get(step, Counter())
        never += sum(1 for i in batch.tolist() if got[i] == 0)
        twice += sum(n - 1 for n in got.values() if n > 1)
        twice += sum(n for i, n in got.items() if i not in set(batch.tolist()))
    return {"samples_twice": twice, "samples_never": never}


def _sampler(job: JobConfig) -> tuple[Any, int]:
    from shoal.data import GlobalBatchSampler, build_dataset, build_order

    data = build_dataset(job.data)
    sampler = GlobalBatchSampler(
        data.num_train,
        job.train.batch_size,
        seed=job.train.seed,
        drop_last=job.data.drop_last,
        order=build_order(data, job.data, job.train.seed),
    )
    return sampler, job.train.total_steps(sampler.steps_per_epoch)


def _replica(args: argparse.Namespace) -> None:
    """One replica group: the job's training loop under torchft's Manager and DDP."""
    import torch
    from torch.distributed import TCPStore
    from torchft import Manager, ProcessGroupGloo
    from torchft.ddp import DistributedDataParallel

    from shoal.data import build_dataset
    from shoal.data.loader import Loader
    from shoal.jobfile import load_toml
    from shoal.models import build_model
    from shoal.models.tasks import per_sample_loss
    from shoal.optim import build_optimizer, build_scheduler

    torch.set_num_threads(1)
    job = load_toml(args.config)
    torch.manual_seed(job.train.seed)
    data = build_dataset(job.data)
    module = build_model(job.model, data)
    sampler, total = _sampler(job)
    optimizer = build_optimizer(module.parameters(), job.optim)
    scheduler = build_scheduler(optimizer, job.optim, total)
    loader = Loader(data.rows, torch.device("cpu"), 0)
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    timeout = timedelta(seconds=args.timeout)
    manager = Manager(
        pg=ProcessGroupGloo(timeout=timeout),
        min_replica_size=1,
        load_state_dict=lambda sd: (
            module.load_state_dict(sd["model"]),
            optimizer.load_state_dict(sd["optimizer"]),
            scheduler.load_state_dict(sd["scheduler"]),
        ),
        state_dict=lambda: {
            "model": module.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
        },
        replica_id=f"replica{args.replica}",
        rank=0,
        world_size=1,
        store_addr="127.0.0.1",
        store_port=store.port,
        lighthouse_addr=args.lighthouse,
        timeout=timeout,
        quorum_timeout=timeout,
        init_sync=False,  # every replica builds the model from the same seed
    )
    model = DistributedDataParallel(manager, module)
    record = os.open(args.record, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    while manager.current_step() < total:
        manager.start_quorum()  # (what torchft's optimizer wrapper does in zero_grad)
        optimizer.zero_grad(set_to_none=True)
        step = manager.current_step()
        batch = sampler.global_indices(*divmod(step, sampler.steps_per_epoch))
        manager.wait_quorum()
        rank, size = manager.participating_rank(), manager.num_participants()
        n = len(batch)
        part = batch[rank * n // size : (rank + 1) * n // size] if rank is not None else batch[:0]
        x, y = loader.get(part if len(part) else batch[:1])
        loss = per_sample_loss(data.task, model(x), y).sum() * (size / n)
        (loss if len(part) else loss * 0).backward()
        if manager.should_commit():
            optimizer.step()
            scheduler.step()
            ids = ",".join(str(i) for i in part.tolist())
            os.write(record, f"{step} {time.time():.6f} {ids}\n".encode())
    os.close(record)
    manager.shutdown(wait=False)


def main() -> None:
    p = argparse.ArgumentParser(description="one torchft replica of a shoal job")
    p.add_argument("config")
    p.add_argument("--replica", type=int, required=True)
    p.add_argument("--record", required=True)
    p.add_argument("--lighthouse", required=True)
    p.add_argument("--timeout", type=float, default=30.0)
    _replica(p.parse_args())


if __name__ == "__main__":
    main()
