"""d2engine.utils.cluster: torchrun and Slurm environments (joined for real in test_launch.py)."""

from __future__ import annotations

import dataclasses
import socket

import pytest

from d2engine.utils import cluster
from d2engine.utils.cluster import (
    ClusterEnv,
    detect_cluster_env,
    local_rank_from_env,
    local_world_size_from_env,
    parse_slurm_nodelist,
)

_SLURM = {
    "SLURM_PROCID": "5",
    "SLURM_NTASKS": "8",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "2",
    "SLURM_TASKS_PER_NODE": "2(x4)",
    "SLURM_JOB_NODELIST": "gpu[03-06]",
    "SLURM_JOB_ID": "123456",
}


def test_public_api() -> None:
    assert cluster.__all__ == sorted(cluster.__all__)
    assert all(hasattr(cluster, name) for name in cluster.__all__)


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("node7", ["node7"]),
        ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
        ("gpu[01,7]", ["gpu01", "gpu7"]),  # each element keeps its own zero padding
        ("a-[1-2],cpu3", ["a-1", "a-2", "cpu3"]),
        ("n[8-10]x", ["n8x", "n9x", "n10x"]),
        ("10.0.0.5", ["10.0.0.5"]),
    ],
)
def test_parse_slurm_nodelist(nodelist: str, hosts: list[str]) -> None:
    assert parse_slurm_nodelist(nodelist) == hosts


def test_parse_slurm_nodelist_rejects_odd_forms() -> None:
    with pytest.raises(ValueError, match="Cannot parse the range 'a-b'"):
        parse_slurm_nodelist("n[a-b]")
    with pytest.raises(ValueError, match="names no host"):
        parse_slurm_nodelist(",")


def test_detect_torchrun() -> None:
    env = {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "GROUP_RANK": "1",
        "MASTER_ADDR": "h",
        "MASTER_PORT": "9",
        # torchrun wins over the Slurm job it may run in
        **_SLURM,
    }
    assert detect_cluster_env(env) == ClusterEnv("torchrun", 3, 4, 1, 2, "1", "env://")
    del env["GROUP_RANK"], env["LOCAL_WORLD_SIZE"]  # then the machine is the host name
    assert detect_cluster_env(env) == ClusterEnv(
        "torchrun", 3, 4, 1, None, socket.gethostname(), "env://"
    )


def test_cluster_env_is_frozen() -> None:
    env = ClusterEnv("torchrun", 0, 2, 0, 2, "0", "env://")
    with pytest.raises(dataclasses.FrozenInstanceError):
        env.rank = 1  # type: ignore[misc]


def test_detect_torchrun_without_master_names_what_is_missing() -> None:
    with pytest.raises(ValueError, match="but LOCAL_RANK, MASTER_PORT is not.*torchrun"):
        detect_cluster_env({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h"})


def test_a_variable_that_is_not_an_integer_is_named() -> None:
    env = {"RANK": "zero", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h"}
    with pytest.raises(ValueError, match="RANK must be an integer, got 'zero'.*HINT"):
        detect_cluster_env({**env, "MASTER_PORT": "1"})
    with pytest.raises(ValueError, match="SLURM_NTASKS must be an integer, got '2x'"):
        detect_cluster_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2x"})


def test_detect_slurm() -> None:
    env = dict(_SLURM)
    assert detect_cluster_env(env) == ClusterEnv("slurm", 5, 8, 1, 2, "2", "tcp://gpu03:18456")
    # MASTER_ADDR / MASTER_PORT win; the step's task count and node list win over the job's
    env.update(
        MASTER_ADDR="fe80::1",
        MASTER_PORT="777",
        SLURM_STEP_NUM_TASKS="6",
        SLURM_STEP_TASKS_PER_NODE="3(x3)",
    )
    found = detect_cluster_env(env)
    assert found is not None
    assert (found.init_method, found.world_size, found.local_world_size) == (
        "tcp://[fe80::1]:777",
        6,
        3,
    )
    del env["MASTER_ADDR"]
    env["SLURM_STEP_NODELIST"] = "cpu[7-9]"
    assert detect_cluster_env(env).init_method == "tcp://cpu7:777"  # type: ignore[union-attr]


def test_single_task_slurm_job_is_not_a_slurm_launch() -> None:
    # An sbatch script running `python train.py --num-gpus 2` has one task: start workers here.
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}
    assert detect_cluster_env(env) is None
    assert detect_cluster_env({}) is None


def test_slurm_without_host_asks_for_master_addr() -> None:
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}
    with pytest.raises(ValueError, match="neither MASTER_ADDR nor.*export MASTER_ADDR"):
        detect_cluster_env(env)
    with pytest.raises(ValueError, match="Cannot parse the range.*export MASTER_ADDR"):
        detect_cluster_env({**env, "SLURM_JOB_NODELIST": "n[a-b]"})
    with pytest.raises(ValueError, match="but SLURM_NODEID is not set.*srun"):
        detect_cluster_env({k: v for k, v in env.items() if k != "SLURM_NODEID"})


def test_detect_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in _SLURM.items():
        monkeypatch.setenv(name, value)
    assert detect_cluster_env() == detect_cluster_env(_SLURM)
    assert (local_rank_from_env(), local_world_size_from_env()) == (1, 2)


def test_local_rank_from_env() -> None:
    assert local_rank_from_env({}) is None
    assert local_rank_from_env({"SLURM_LOCALID": "2"}) == 2
    assert local_rank_from_env({"SLURM_LOCALID": "2", "LOCAL_RANK": "3"}) == 3  # torchrun wins
    assert local_rank_from_env({"LOCAL_RANK": ""}) is None


@pytest.mark.parametrize(
    ("spec", "node", "size"),
    [("2(x3),1", "2", 2), ("2(x3),1", "3", 1), ("4", "0", 4), ("1,3", "1", 3), ("4", "1", None)],
)
def test_local_world_size_from_slurm_tasks_per_node(spec: str, node: str, size: int) -> None:
    env = {"SLURM_NODEID": node, "SLURM_TASKS_PER_NODE": spec}
    assert local_world_size_from_env(env) == size
    # the step's list wins over the job's; SLURM_NTASKS_PER_NODE, when Slurm sets it, over both
    assert local_world_size_from_env({**env, "SLURM_STEP_TASKS_PER_NODE": "5(x9)"}) == 5
    assert local_world_size_from_env({**env, "SLURM_NTASKS_PER_NODE": "7"}) == 7
    assert local_world_size_from_env({**env, "LOCAL_WORLD_SIZE": "8"}) == 8  # torchrun wins


def test_local_world_size_unknown() -> None:
    assert local_world_size_from_env({}) is None
    assert local_world_size_from_env({"SLURM_TASKS_PER_NODE": "2"}) is None  # no node id
    assert local_world_size_from_env({"SLURM_NODEID": "0", "SLURM_TASKS_PER_NODE": "x"}) is None
