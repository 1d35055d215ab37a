"""``--strategy vertical``, declared: its section, its checks, how its parties start.

Parties hold different columns of the same samples (see docs/VERTICAL.md). On one
machine, one launcher starts a process per party (:func:`launch_parties`) and, when
one fails, starts them all again from the newest checkpoint every party holds. With
``--party NAME`` this machine runs that party alone, connected to the label party's
``--label-address``: one ``shoal train`` per party, each on its own machine.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

from shoal.config import JobConfig, option
from shoal.dist import DistEnv
from shoal.errors import UserError
from shoal.strategies import plugin
from shoal.strategies.base import Strategy
from shoal.strategies.vertical.split import KINDS

BIG = 1 << 30


@dataclass
class VerticalConfig:
    """[strategy.vertical]"""

    parties: str = option(
        "", "the parties and their data, NAME=PATH,NAME=PATH (each PATH a Parquet dataset "
        "with an id column; the last party holds the labels unless --label-party says); "
        "with --party, only that party's PATH is read and the others may be bare names",
    )  # fmt: skip
    label_party: str = option("", "the party holding the labels (empty: the last of --parties)")
    party: str = option(
        "", "run only this party here, connected to --label-address (one shoal train per "
        "party, each on its machine, SHOAL_SECRET the same on all); empty: every party "
        "runs on this machine",
    )  # fmt: skip
    label_address: str = option(
        "", "HOST:PORT where the label party listens and the others connect (with --party; "
        "empty: a free port on this machine)",
    )  # fmt: skip
    party_workers: int = option(
        1, "processes per party, each training a slice of every batch with the label "
        "party's process of the same rank, their gradients summed (a party as a "
        "data-parallel group; with --party, process r of the label party listens at "
        "--label-address PORT+r)", low=1, high=64,
    )  # fmt: skip
    id_column: str = option("id", "the column naming each sample, in every party's data")
    label_column: str = option(
        "", "the label party's label column (empty: the one its writer stored)"
    )
    align: str = option(
        "psi", "how the parties find their common ids: psi (private set intersection: no "
        "party learns another's ids outside it) or exact (the ids are known to match)",
        choices=("psi", "exact"),
    )  # fmt: skip
    split_model: str = option(
        "two-tower", "the model split between the parties: two-tower (a tower per party, "
        "their dot product), two-tower-mlp (an MLP over the towers), mlp (a hidden layer "
        "per party, an MLP on top), linear (hetero-LR: linear or logistic regression)",
        choices=KINDS,
    )  # fmt: skip
    bottom_hidden: int = option(
        64, "hidden units of each party's bottom model (and of an MLP top)", low=1,
        high=1 << 16, when="split_model!=linear",
    )  # fmt: skip
    tower_dim: int = option(
        16, "the towers' embedding size", low=1, high=1 << 16,
        when="split_model=two-tower|two-tower-mlp",
    )  # fmt: skip
    staleness: int = option(
        0, "0: the one model's arithmetic, exactly; 1: a party sends its next batch's "
        "output before the last gradient is back (computes while the label party does)",
        low=0, high=1,
    )  # fmt: skip
    vertical_noise: float = option(
        0.0, "standard deviation of Gaussian noise on every output a party sends and every "
        "gradient the label party returns (0: none)", low=0, high=1e6,
    )  # fmt: skip
    label_dp: float = option(
        0.0, "label differential privacy: epsilon of randomized response on the labels, "
        "drawn once (0: off)", low=0, high=100,
    )  # fmt: skip


class Vertical(Strategy):
    """(Never built: a vertical job's processes run :func:`run_party`, not the trainer.)"""

    def setup(self, *args: Any) -> None:  # pragma: no cover
        raise NotImplementedError

    def train_step(self, *args: Any) -> Any:  # pragma: no cover
        raise NotImplementedError


class Plugin(plugin.Plugin):
    name = "vertical"
    description = (
        "vertical partitioning: parties hold different columns of the same samples "
        "(PSI alignment, split learning, two-tower)"
    )
    Config = VerticalConfig
    runtime = Vertical
    needs_process_group = False
    own_data = True
    default_optimizer = "adam"
    default_lr = 0.01
    reads = ("cluster.startup_timeout", "cluster.grace_period")
    ignores = (
        "data", "model", "train.device", "train.balance", "train.balance_every",
        "train.max_rank_batch", "cluster.workers", "cluster.nnodes", "cluster.min_nodes",
        "cluster.node_rank", "cluster.rdzv_endpoint", "cluster.rdzv_last_call",
        "cluster.engine", "cluster.address", "strategy.heartbeat_timeout",
    )  # fmt: skip
    ignores_why = (
        "its parties read their own data (--parties) and build their parts of the model "
        "(--split-model), one process each, on the CPU"
    )

    def check(self, job: JobConfig) -> None:
        from shoal.strategies.vertical.job import label_of, parse_parties

        o = self.options(job)
        if not o.parties:
            raise UserError("--strategy vertical needs --parties NAME=PATH,NAME=PATH")
        parties = parse_parties(o.parties)
        label_of(o, parties)
        here = [o.party] if o.party else list(parties)
        if o.party and o.party not in parties:
            raise UserError(f"--party {o.party} is not one of --parties ({', '.join(parties)})")
        for name in here:
            path = parties[name]
            if not path:
                raise UserError(f"--parties: party {name} runs here, and its data is not given "
                                f"({name}=PATH)")  # fmt: skip
            if not os.path.exists(os.path.expanduser(path)):
                raise UserError(f"--parties {name}={path}: no such file or directory")
        if o.party and not o.label_address:
            raise UserError("--party runs one party of several machines: give --label-address "
                            "HOST:PORT (where the label party listens)")  # fmt: skip
        if o.label_address and (":" not in o.label_address or o.label_address.startswith("tcp")):
            raise UserError(f"--label-address {o.label_address}: give HOST:PORT")
        if job.cluster.recovery == "inplace":
            raise UserError("--strategy vertical recovers by restarting every party from "
                            "their common checkpoint (no --recovery inplace)")  # fmt: skip
        if job.data.drop_last:
            raise UserError("--strategy vertical trains on every common sample: no --drop-last")

    def check_data(self, job: JobConfig, data: Any) -> None:
        """Each party run here: its files open, its id column and columns there (the rows
        are read by the party's process alone)."""
        from shoal.data.files import Files, split_roots
        from shoal.strategies.vertical.job import label_of, parse_parties

        o = self.options(job)
        parties = parse_parties(o.parties)
        label = label_of(o, parties)
        for name in [o.party] if o.party else list(parties):
            files = Files(split_roots(os.path.expanduser(parties[name]))[0])
            files.field(o.id_column)
            if name == label:
                column = o.label_column or str(files.metadata.get("label", ""))
                if not column:
                    raise UserError(f"{parties[name]}: the label party's data names no label "
                                    "column: give --label-column")  # fmt: skip
                files.field(column)

    def launch(self, job: JobConfig, config_path: str) -> None:
        launch_parties(job, config_path)

    def run_role(self, role: str, job: JobConfig, env: DistEnv) -> None:
        from shoal.strategies.vertical.runtime import run_party

        if role != "party":
            raise ValueError(f"vertical has no role {role!r}")
        run_party(job)

    def summary_rows(self, summary: dict[str, Any]) -> list[tuple[str, str]]:
        v = summary.get("vertical")
        if not v:
            return []
        others = ", ".join(p for p in v["parties"] if p != v["label_party"])
        each = v.get("processes_per_party", 1)
        rows = [
            ("parties", f"{others} + {v['label_party']} (labels)"
                        + (f", {each} processes each" if each > 1 else "")),
            ("common ids", f"{v['common_ids']:,} by {v['align']} in {v['align_s']:.1f} s"
                           + (f" ({v['test_common_ids']:,} held out)"
                              if v.get("test_common_ids") else "")),
            ("bytes per step", f"{v['bytes_per_step'] / 1000:,.1f} KB (outputs and gradients)"),
        ]  # fmt: skip
        if v.get("train_samples_per_s"):
            rows.append(("training throughput", f"{v['train_samples_per_s']:,.0f} samples/s "
                         "in steps"))  # fmt: skip
        protect = []
        if v.get("noise"):
            protect.append(f"noise sigma {v['noise']:g} on outputs and gradients")
        if v.get("label_dp_epsilon"):
            protect.append(f"label DP epsilon {v['label_dp_epsilon']:g} (randomized response)")
        if protect:
            rows.append(("protection", "; ".join(protect)))
        return rows


def launch_parties(job: JobConfig, config_path: str) -> None:
    """Start this machine's parties and wait for them. Every party on this machine: a
    party that fails stops the others, and all start again (up to ``--max-restarts``)
    from the newest checkpoint they all hold. One party (``--party``): it runs once."""
    from torch.distributed.elastic.multiprocessing.api import SignalException

    from shoal import failure
    from shoal.dist import _free_port
    from shoal.launch import JobPreempted, LaunchFailed, describe_exit, preempted_since
    from shoal.net import wire
    from shoal.roles import Role, RoleGroup
    from shoal.strategies.vertical.group import GROUP_ENV, RANK_ENV
    from shoal.strategies.vertical.job import ADDRESS_ENV, PARTY_ENV, parse_parties

    o = job.strategy.options
    here = [o.party] if o.party else list(parse_parties(o.parties))
    n = o.party_workers
    if o.party:
        if not wire.secret_hex():
            raise UserError("--party needs SHOAL_SECRET, the same on every party "
                            "(e.g. export SHOAL_SECRET=$(openssl rand -hex 32))")  # fmt: skip
        addresses, secret = "", wire.secret_hex()  # (--label-address PORT + rank)
    else:
        host, _, port = o.label_address.rpartition(":")
        ports = (
            [int(port) + r for r in range(n)]
            if o.label_address
            else [_free_port() for _ in range(n)]
        )
        addresses = ",".join(f"tcp://{host or '127.0.0.1'}:{p}" for p in ports)
        secret = wire.secret_hex() or wire.new_secret()
    base = {
        wire.SECRET_ENV: secret,
        ADDRESS_ENV: addresses,
        "OMP_NUM_THREADS": "1",
        "LOCAL_WORLD_SIZE": str(len(here) * n),
    }  # (the cores shared: see dist.init)
    names = [p if n == 1 else f"{p} (process {r})" for p in here for r in range(n)]

    def roles() -> list[Role]:
        out = []
        for party in here:
            meet = f"tcp://127.0.0.1:{_free_port()}"  # (a party's processes: their group)
            for r in range(n):
                env = {**base, PARTY_ENV: party, RANK_ENV: str(r), GROUP_ENV: meet}
                out.append(Role("party", len(out), env))
        return out

    attempts = 0 if o.party else job.cluster.max_restarts
    signals = _PassOn()
    started = time.time()
    try:
        for attempt in range(attempts + 1):
            group = signals.group = RoleGroup(roles(), config_path, fork_first=attempt == 0)
            signals.install()  # (after: torch's process layer puts in handlers of its own)
            try:
                failed, preempted = _wait(group, names)
            finally:
                group.close()
            if preempted and failed is None:
                record = preempted_since(config_path, started)
                raise JobPreempted(record or {"step": "?", "signal": "SIGTERM",
                                              "checkpoint_s": 0.0})  # fmt: skip
            if failed is None:
                return
            name, code = failed
            how = describe_exit(code)
            if code == failure.EXIT_RAISED:
                raised, verdict = group.raised.take("party")
                how = f"raised {raised.kind}" if raised is not None else how
                if verdict:
                    raise LaunchFailed(f"party {name} {how}; {verdict}")
            if code == 2:  # (it said why, on its own line)
                raise LaunchFailed(f"party {name} refused the job")
            if signals.told:
                raise LaunchFailed(f"party {name} {how} while the job was stopping")
            if attempt == attempts:
                many = f", {attempt + 1} times (--max-restarts)" if attempts else ""
                raise LaunchFailed(f"party {name} {how}{many}")
            print(f"shoal: error: party {name} {how}; every party starts again from the newest "
                  f"checkpoint they all hold (restart {attempt + 1} of {attempts})",
                  file=sys.stderr, flush=True)  # fmt: skip
    except SignalException:  # (one before ours were in: torch's process layer's)
        raise KeyboardInterrupt from None
    finally:
        signals.restore()


class _PassOn:
    """The launcher's signals, passed on to the parties: SIGTERM (a scheduler's) and
    Ctrl-C as SIGTERM, Slurm's SIGUSR1 as itself; each party tells the label party, and
    all stop after the same step with a checkpoint of it. A second Ctrl-C: at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self) -> None:
        self.group: Any = None
        self.told: list[int] = []
        self.previous = {s: signal.getsignal(s) for s in self.SIGNALS}

    def install(self) -> None:
        for s in self.SIGNALS:
            signal.signal(s, self._on)

    def _on(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and signal.SIGINT in self.told:
            self.restore()
            raise KeyboardInterrupt
        self.told.append(signum)
        if signum == signal.SIGINT:
            from shoal.launch import CTRL_C

            CTRL_C.set()
        if self.group is not None:
            self.group.signal(signal.SIGUSR1 if signum == signal.SIGUSR1 else signal.SIGTERM)

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def _wait(group: Any, names: list[str]) -> tuple[tuple[str, int] | None, bool]:
    """Until every party exited: the party whose failure says most (one that raised or
    refused the job, before one that lost its peer: a party's failure ends the others'
    connections), the others stopped, or ``None``; and whether the parties stopped
    preempted, each with a checkpoint of the same step."""
    from shoal import failure
    from shoal.preempt import EXIT_PREEMPTED

    done, failed, preempted = 0, [], False
    while done < len(names) and not failed:
        for role, code in group.poll():
            if code in (0, EXIT_PREEMPTED):
                done += 1
                preempted |= code == EXIT_PREEMPTED
            else:
                failed.append((names[role.rank], code))
        time.sleep(0.05)
    until = time.monotonic() + 2.0  # (the others notice within a moment)
    while failed and group.running and time.monotonic() < until:
        failed += [(names[r.rank], c) for r, c in group.poll() if c != 0]
        time.sleep(0.05)
    group.signal(signal.SIGKILL)
    if not failed:
        return None, preempted
    telling = [f for f in failed if f[1] in (failure.EXIT_RAISED, 2)]
    return (telling or failed)[0], preempted
