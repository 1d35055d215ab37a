"""Slurm's and Kubeflow's variables read as the job's machines and processes."""

from __future__ import annotations

import pytest

from shoal.environment import cluster_from_env, first_host, slurm_worker_env

SRUN_PER_NODE = {
    "SLURM_JOB_ID": "4242", "SLURM_PROCID": "1", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2",
    "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]",
}  # fmt: skip


HOSTLISTS = [("node01", "node01"), ("node[03-05,9],gpu1", "node03"), ("a[1,2]", "a1"),
             ("gpu-a100-[012-015]", "gpu-a100-012"), ("x,y", "x")]  # fmt: skip


@pytest.mark.parametrize(("nodelist", "first"), HOSTLISTS)
def test_the_first_host_of_a_slurm_hostlist(nodelist, first):
    assert first_host(nodelist) == first


def test_srun_with_a_task_per_node_gives_machines_rank_and_meeting_point():
    scheduler, found = cluster_from_env(SRUN_PER_NODE)
    assert scheduler == "Slurm"
    assert found == {"nnodes": 2, "node_rank": 1, "rdzv_endpoint": "gpu07:29742"}
    gpus = cluster_from_env({**SRUN_PER_NODE, "SLURM_GPUS_ON_NODE": "4", "MASTER_PORT": "777"})
    assert gpus[1]["workers"] == 4 and gpus[1]["rdzv_endpoint"] == "gpu07:777"
    assert slurm_worker_env(SRUN_PER_NODE) == {}  # one task per node: it is the launcher


def test_the_batch_script_itself_is_not_a_step():
    batch = {k: v for k, v in SRUN_PER_NODE.items() if k != "SLURM_STEP_ID"}
    assert cluster_from_env(batch) == ("", {})
    assert slurm_worker_env(batch) == {}


def test_srun_with_a_task_per_process_makes_each_task_a_worker():
    env = {**SRUN_PER_NODE, "SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
           "SLURM_NTASKS_PER_NODE": "4(x2)"}  # fmt: skip
    assert cluster_from_env(env) == ("", {})
    assert slurm_worker_env(env) == {
        "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
        "MASTER_ADDR": "gpu07", "MASTER_PORT": "29742",
    }  # fmt: skip


def test_kubeflow_pet_variables_are_torchruns():
    env = {"PET_NNODES": "3", "PET_NODE_RANK": "2", "PET_MASTER_ADDR": "job-node-0-0.job",
           "PET_MASTER_PORT": "23456", "PET_NPROC_PER_NODE": "auto", "RANK": "2"}  # fmt: skip
    assert cluster_from_env(env) == (
        "Kubeflow", {"min_nodes": 0, "nnodes": 3, "node_rank": 2,
                     "rdzv_endpoint": "job-node-0-0.job:23456"},
    )  # fmt: skip
    elastic = cluster_from_env({**env, "PET_NNODES": "1:4", "PET_NPROC_PER_NODE": "2"})[1]
    assert (elastic["min_nodes"], elastic["nnodes"], elastic["workers"]) == (1, 4, 2)
    single = cluster_from_env({"PET_NNODES": "1", "PET_MASTER_ADDR": "h"})[1]
    assert "rdzv_endpoint" not in single  # one machine: loopback


def test_shoal_train_takes_them_where_no_flag_is_given(monkeypatch, capsys):
    """In this process (the same ``main`` the command runs)."""
    from shoal.cli import main

    for k, v in {**SRUN_PER_NODE, "SLURM_NODEID": "0", "SLURM_PROCID": "0"}.items():
        monkeypatch.setenv(k, v)
    assert main(["train", "--model", "linear", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "nnodes = 2" in out and 'rdzv_endpoint = "gpu07:29742"' in out
    assert main(["train", "--model", "linear", "--dry-run", "--nnodes", "1"]) == 0
    out = capsys.readouterr().out
    assert "nnodes = 1" in out and 'rdzv_endpoint = ""' in out
