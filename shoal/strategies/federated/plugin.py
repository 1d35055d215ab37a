"""``--strategy fedavg``: its options, checks and summary rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shoal.config import JobConfig, option
from shoal.data import partition
from shoal.errors import UserError
from shoal.strategies import plugin
from shoal.strategies.federated.rounds import file_rows
from shoal.strategies.federated.server import SERVER_OPTS
from shoal.strategies.federated.strategy import FedAvg

BIG = 1 << 30


@dataclass
class FedAvgConfig:
    """[strategy.fedavg]"""

    clients: int = option(10, "simulated clients, each holding its own rows", low=1, high=BIG)
    clients_per_round: int = option(
        0, "clients drawn for each round (0: all of them)", low=0, high=BIG
    )
    local_steps: int = option(
        1,
        "local optimizer steps per client and round (see --local-epochs)",
        low=1,
        high=BIG,
        when="local_epochs=0",
    )
    local_epochs: int = option(
        0, "local passes over a client's rows per round; replaces --local-steps", low=0,
        high=BIG,
    )  # fmt: skip
    partition: str = option(
        "iid", "how rows are dealt to clients: iid, dirichlet:ALPHA (label skew), shards:K "
        "(K labels per client), files (a client per Parquet file; with --listen, each client "
        "brings its own: shoal federate --data FILE --client K)",
    )  # fmt: skip
    prox_mu: float = option(0.0, "FedProx proximal term mu (0: FedAvg)", low=0, high=1e6)
    server_opt: str = option(
        "avg", "server optimizer on the clients' mean change", choices=SERVER_OPTS
    )
    server_lr: float = option(1.0, "server learning rate", above=0, high=1e6)
    server_beta1: float = option(
        0.9, "server adam/yogi/adagrad momentum", low=0, below=1,
        when="server_opt=adam|yogi|adagrad",
    )  # fmt: skip
    server_beta2: float = option(
        0.99, "server adam/yogi second-moment decay", low=0, below=1, when="server_opt=adam|yogi"
    )
    server_tau: float = option(
        1e-3, "server adam/yogi/adagrad adaptivity (tau)", above=0,
        when="server_opt=adam|yogi|adagrad",
    )  # fmt: skip
    secure_agg: bool = option(
        False, "secure aggregation: the server learns only the sum of a round's updates "
        "(pairwise masks from X25519 key agreement, dropped clients recovered from shares)",
    )  # fmt: skip
    listen: str = option(
        "", "HOST:PORT: serve clients on other machines (shoal federate --connect) instead "
        "of simulating them; needs --workers 1 and SHOAL_SECRET",
    )  # fmt: skip
    round_deadline: float = option(
        0.0, "seconds a round waits for its clients; later ones are left out (0: no limit)",
        low=0, high=1e7,
    )  # fmt: skip


class Plugin(plugin.Plugin):
    name = "fedavg"
    description = (
        "federated averaging: simulated --clients train locally, FedProx and server "
        "optimizers (adam, yogi, adagrad)"
    )
    Config = FedAvgConfig
    runtime = FedAvg
    privacy = "client"
    recovers_in_place = True
    reads = (*plugin.Plugin.reads, *plugin.IN_PLACE_READS)

    def in_place_refusal(self, job: JobConfig) -> str:
        if self.options(job).listen:
            return (
                "--recovery inplace keeps a simulation's other processes going; with "
                "--listen the server is one process (a lost remote client is covered by "
                "--round-deadline)"
            )
        return ""

    def check(self, job: JobConfig) -> None:
        super().check(job)
        opts = self.options(job)
        partition.parse(opts.partition)
        if job.train.steps <= 0:
            raise UserError("--strategy fedavg counts rounds in --steps: give --steps N")
        if opts.listen and job.world_size != 1:
            raise UserError(
                "--listen runs the federation's server as one process: --workers 1 "
                "(the clients run shoal federate elsewhere)"
            )
        if (
            opts.listen
            and partition.parse(opts.partition).kind == "files"
            and (not opts.round_deadline)
        ):
            raise UserError(
                "--partition files with --listen needs --round-deadline: only client K's own "
                "process can train client K, so a client that never comes would hold its "
                "rounds forever"
            )
        if opts.clients_per_round > opts.clients:
            raise UserError(
                f"--clients-per-round {opts.clients_per_round} is more than --clients "
                f"{opts.clients}"
            )

    def check_data(self, job: JobConfig, data: Any) -> None:
        opts = self.options(job)
        spec = partition.parse(opts.partition)
        if spec.kind == "files":
            rows = file_rows(data)
            if rows is None:
                raise UserError(f"--partition files needs a Parquet training set, and "
                                f"{data.name} is not one")  # fmt: skip
            if not opts.listen and len(rows) != opts.clients:
                raise UserError(
                    f"--partition files: --clients {opts.clients}, and {data.name} has "
                    f"{len(rows)} files (a client per file)"
                )
            return
        if spec.kind != "iid" and data.task not in ("classification", "binary"):
            raise UserError(
                f"--partition {spec} deals rows by label: it needs a classification "
                f"dataset, and {data.name} is {data.task}"
            )
        if opts.clients > data.num_train:
            raise UserError(
                f"--clients {opts.clients} is more than the {data.num_train} training rows"
            )

    def summary_rows(self, summary: dict[str, Any]) -> list[tuple[str, str]]:
        fed = summary.get("federated")
        if not fed:
            return []
        late = f", {fed['dropped_late']} late" if fed["dropped_late"] else ""
        return [
            ("federation", f"{fed['clients']} clients ({fed['partition']}), "
                           f"{fed['clients_per_round']} per round, server {fed['server_opt']}"
                           + (f", prox mu {fed['prox_mu']:g}" if fed["prox_mu"] else "")),
            ("rounds", f"{fed['rounds']}: {fed['client_updates']} client updates{late}"),
        ]  # fmt: skip
