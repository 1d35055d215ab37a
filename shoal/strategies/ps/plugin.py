"""``--strategy ps``, declared: its section, its checks, its roles and its summary rows.

The parameter server is the one strategy that does not run under torchrun's
agent: :meth:`Plugin.launch` starts a coordinator thread and one process per
server and worker (:mod:`shoal.strategies.ps.launch`), and ``server`` is a role
of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from shoal.config import JobConfig
from shoal.dist import DistEnv
from shoal.errors import UserError
from shoal.strategies import plugin
from shoal.strategies.ps.strategy import ParameterServer, PSConfig


class Plugin(plugin.Plugin):
    name = "ps"
    description = (
        "parameter server: sharded servers over ZeroMQ, bsp/asp/ssp, server-side optimizer"
    )
    Config = PSConfig
    runtime = ParameterServer
    needs_process_group = False
    remote_tables = True
    reads = ("cluster.servers", "cluster.startup_timeout")  # (it is not preemptible)

    def check(self, job: JobConfig) -> None:
        from shoal.strategies.ps.launch import check_job

        c = job.cluster  # a machine may hold only servers, or only workers
        if c.workers + c.servers == 0:
            raise UserError("--strategy ps needs --workers or --servers on every machine")
        if c.nnodes == 1 and (c.workers == 0 or c.servers == 0):
            raise UserError("--strategy ps on one machine needs --workers >= 1 and --servers >= 1")
        check_job(job)

    def checkpoint_root(self, run_dir: Path) -> Path:
        from shoal.strategies.ps.server import coordinator_dir

        return coordinator_dir(run_dir)

    def launch(self, job: JobConfig, config_path: str) -> None:
        from shoal.strategies.ps.launch import launch_ps

        launch_ps(job, config_path)

    def run_role(self, role: str, job: JobConfig, env: DistEnv) -> None:
        from shoal.strategies.ps.launch import run_server

        if role != "server":
            raise ValueError(f"ps has no role {role!r}")
        run_server(job)

    def run_in_group(self, job: JobConfig, group: DistEnv, train: Callable[[], int]) -> int:
        from shoal.strategies.ps.launch import run_in_group

        return run_in_group(job, group, train)

    def summary_rows(self, summary: dict[str, Any]) -> list[tuple[str, str]]:
        ps = summary["ps"]
        bound = f" (bound {ps['staleness_bound']})" if ps.get("staleness_bound") is not None else ""
        rows = [
            ("ps mode / max staleness", f"{ps['mode']} / {ps['max_staleness']}{bound}"),
            ("tasks per worker", " / ".join(str(w.get("tasks", 0)) for w in summary["per_worker"])),
        ]
        if ps["failed_workers"]:
            rows.append(("failed workers", ", ".join(map(str, ps["failed_workers"]))))
        return rows
