"""What a scheduler's environment says about the job's machines and processes.

``shoal train`` on each machine needs the number of machines, this machine's
rank and where they meet. Under Slurm (``srun`` with one task per node) and
Kubeflow (a ``PyTorchJob``/``TrainJob`` whose command is ``shoal train``),
the scheduler has already decided them and says so in variables; shoal reads
them where no flag was given:

=====================  =============================  =====================================
setting                Slurm                           Kubeflow (torchrun's ``PET_*``)
=====================  =============================  =====================================
``--nnodes``           ``SLURM_JOB_NUM_NODES``         ``PET_NNODES`` (``N`` or ``MIN:MAX``)
``--node-rank``        ``SLURM_NODEID``                ``PET_NODE_RANK``
``--rdzv-endpoint``    first host of                   ``PET_MASTER_ADDR``:``PET_MASTER_PORT``
                       ``SLURM_JOB_NODELIST``, port
                       ``MASTER_PORT`` or 29500 +
                       ``SLURM_JOB_ID`` mod 1000
``--workers``          ``SLURM_GPUS_ON_NODE``          ``PET_NPROC_PER_NODE`` (a number)
=====================  =============================  =====================================

``srun`` with a task per process (more tasks than nodes) makes each task one
worker instead: :func:`slurm_worker_env` gives the ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``... that torch reads.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

SLURM_PORT_BASE = 29500
"""Slurm jobs meet on ``SLURM_PORT_BASE + SLURM_JOB_ID % 1000`` unless ``MASTER_PORT``
is set, so two jobs sharing a node do not collide."""


def first_host(nodelist: str) -> str:
    """The first host of a Slurm hostlist: ``node[03-05,9],gpu1`` -> ``node03``."""
    match = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?", nodelist.strip())
    if not match or not (match.group(1) or match.group(2)):
        raise ValueError(f"not a Slurm hostlist: {nodelist!r}")
    prefix, ranges = match.group(1), match.group(2)
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _slurm_step(env: Mapping[str, str]) -> bool:
    """Inside an ``srun`` step (the batch script itself is not one: it runs on one node)."""
    return "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env)


def _slurm_port(env: Mapping[str, str]) -> int:
    if env.get("MASTER_PORT", "").isdigit():
        return int(env["MASTER_PORT"])
    return SLURM_PORT_BASE + int(env.get("SLURM_JOB_ID", "0") or 0) % 1000


def _nodes(env: Mapping[str, str]) -> int:
    return int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)


def cluster_from_env(env: Mapping[str, str]) -> tuple[str, dict[str, Any]]:
    """``(scheduler, {ClusterConfig field: value})`` from the environment; empty when no
    scheduler placed this process as a machine's launcher."""
    if "PET_NNODES" in env:
        out: dict[str, Any] = {}
        low, _, high = env["PET_NNODES"].partition(":")
        out["min_nodes"], out["nnodes"] = (int(low), int(high)) if high else (0, int(low))
        if "PET_NODE_RANK" in env:
            out["node_rank"] = int(env["PET_NODE_RANK"])
        if "PET_MASTER_ADDR" in env:
            out["rdzv_endpoint"] = f"{env['PET_MASTER_ADDR']}:{env.get('PET_MASTER_PORT', 29500)}"
        if env.get("PET_NPROC_PER_NODE", "").isdigit():
            out["workers"] = int(env["PET_NPROC_PER_NODE"])
        return "Kubeflow", _single(out)
    if _slurm_step(env) and int(env.get("SLURM_NTASKS", "1")) <= _nodes(env):
        out = {"nnodes": _nodes(env), "node_rank": int(env.get("SLURM_NODEID", "0"))}
        host = first_host(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", ""))
        out["rdzv_endpoint"] = f"{host}:{_slurm_port(env)}"
        if env.get("SLURM_GPUS_ON_NODE", "").isdigit() and int(env["SLURM_GPUS_ON_NODE"]) > 0:
            out["workers"] = int(env["SLURM_GPUS_ON_NODE"])
        return "Slurm", _single(out)
    return "", {}


def _single(out: dict[str, Any]) -> dict[str, Any]:
    """One machine: nothing to meet on beyond loopback (shoal picks a free local port)."""
    if out.get("nnodes") == 1 and not out.get("min_nodes"):
        out.pop("rdzv_endpoint", None)
    return out


def slurm_worker_env(env: Mapping[str, str]) -> dict[str, str]:
    """torch's variables for an ``srun`` task that is one worker (more tasks than
    nodes); empty otherwise, or where torch's are set already."""
    if not _slurm_step(env) or "RANK" in env:
        return {}
    tasks = int(env.get("SLURM_NTASKS", "1"))
    if tasks <= _nodes(env):
        return {}
    host = first_host(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", ""))
    per_node = env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": str(tasks),
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": per_node if per_node.isdigit() else str(tasks // _nodes(env)),
        "MASTER_ADDR": env.get("MASTER_ADDR", host),
        "MASTER_PORT": str(_slurm_port(env)),
    }
