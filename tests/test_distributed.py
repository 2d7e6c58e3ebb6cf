"""ssl_colorize.distributed: the process layout from torchrun / SLURM variables, and a real two-process
gloo group on the CPU. (Jobs launched through a real SLURM cluster are in tests/test_slurm.py.)"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess

import pytest
import torch
import torch.multiprocessing as mp

from ssl_colorize import distributed
from ssl_colorize.distributed import DistEnv, detect_env, expand_hostlist, port_for_job

LAYOUT_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.mark.parametrize("nodelist, expected", [
    ("localhost", ["localhost"]),
    ("gpu[01-03,7]", ["gpu01", "gpu02", "gpu03", "gpu7"]),
    ("n[008-011]", ["n008", "n009", "n010", "n011"]),
    ("a1,b[2-3],c", ["a1", "b2", "b3", "c"]),
    ("rack[1-2]-node[1-2]", ["rack1-node1", "rack1-node2", "rack2-node1", "rack2-node2"]),
])
def test_expand_hostlist_by_hand(nodelist, expected):
    assert expand_hostlist(nodelist) == expected
    if shutil.which("scontrol"):  # SLURM's own expansion, where installed, agrees
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
        if out.returncode == 0:
            assert out.stdout.split() == expected


@pytest.mark.parametrize("bad", ["gpu[1-3", "gpu1-3]", "gpu[3-1]", "gpu[a-b]"])
def test_expand_hostlist_rejects_malformed(bad):
    with pytest.raises(ValueError, match="node list"):
        expand_hostlist(bad)


def test_torchrun_variables_win():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h0", "MASTER_PORT": "1234",
           "SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "8"}
    assert detect_env(env) == DistEnv(rank=3, world_size=4, local_rank=1, master_addr="h0", master_port=1234,
                                      source="torchrun")


def test_slurm_job_step():
    env = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "8",
           "SLURM_LOCALID": "1", "SLURM_STEP_NODELIST": "node[3-6]", "SLURM_JOB_ID": "1234"}
    info = detect_env(env)
    # Rank 5 of 8, second task on its node; the rendezvous is on the first node of the step, on the
    # port 20000 + 1234 % 12000 = 21234 that every task of job 1234 derives alike.
    assert info == DistEnv(rank=5, world_size=8, local_rank=1, master_addr="node3", master_port=21234,
                           source="slurm")
    assert port_for_job("1234") == 21234
    assert port_for_job("1235") != port_for_job("1234")


def test_slurm_batch_step_is_one_process():
    # sbatch's batch script sees the allocation's task count but is not a job step: one process.
    env = {"SLURM_JOB_ID": "77", "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "localhost"}
    assert detect_env(env) == DistEnv()


def test_inconsistent_layout_is_an_error():
    with pytest.raises(ValueError, match="rank=4, world_size=4"):
        detect_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        detect_env({"RANK": "0", "WORLD_SIZE": "two"})


def test_single_process_is_a_no_op(monkeypatch):
    for name in LAYOUT_VARS + ("SLURM_STEP_ID", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    info = distributed.init_distributed()
    assert info.world_size == 1 and not distributed.is_initialized()
    assert (distributed.get_rank(), distributed.get_world_size(), distributed.is_main()) == (0, 1, True)
    distributed.barrier()  # no group: returns at once
    assert distributed.device() == (torch.device("cuda", torch.cuda.current_device())
                                    if torch.cuda.is_available() else torch.device("cpu"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, port: int, results) -> None:
    # What srun gives each task of a two-task step, plus a free port (MASTER_PORT overrides the job-id one).
    for name in LAYOUT_VARS:
        os.environ.pop(name, None)
    os.environ.update({"SLURM_STEP_ID": "0", "SLURM_PROCID": str(rank), "SLURM_STEP_NUM_TASKS": "2",
                       "SLURM_LOCALID": str(rank), "SLURM_STEP_NODELIST": "localhost", "SLURM_JOB_ID": "99",
                       "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    info = distributed.init_distributed(timeout_s=120)
    again = distributed.init_distributed()  # idempotent
    value = torch.tensor([float(rank + 1)])
    torch.distributed.all_reduce(value)
    distributed.barrier()
    results.put((rank, info.world_size, again.rank, distributed.get_rank(), distributed.get_world_size(),
                 distributed.is_main(), torch.distributed.get_backend(), value.item()))
    distributed.destroy()


def test_two_processes_join_a_gloo_group():
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(rank, port, results)) for rank in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
        assert proc.exitcode == 0
    got = sorted(results.get(timeout=5) for _ in range(2))
    # all_reduce sums 1 + 2 across the two ranks; gloo because this test runs on the CPU.
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    assert got == [(0, 2, 0, 0, 2, True, backend, 3.0), (1, 2, 1, 1, 2, False, backend, 3.0)]


SUBMITIT_LOCAL = {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "4242", "SUBMITIT_LOCAL_NTASKS": "2",
                  "SUBMITIT_LOCAL_JOB_NUM_NODES": "1", "SUBMITIT_LOCAL_NODEID": "0", "SUBMITIT_LOCAL_GLOBALID": "1",
                  "SUBMITIT_LOCAL_LOCALID": "1"}


def test_submitit_layout_is_exported_for_init_distributed(monkeypatch):
    # Task 1 of a two-task submitit job: submitit's TorchDistributedEnvironment exports the torchrun
    # variables, which detect_env (and so init_distributed) then reads.
    for name in LAYOUT_VARS + ("LOCAL_WORLD_SIZE", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    for name, value in SUBMITIT_LOCAL.items():
        monkeypatch.setenv(name, value)
    info = distributed.export_submitit_layout()
    assert (info.rank, info.world_size, info.local_rank, info.source) == (1, 2, 1, "torchrun")
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_WORLD_SIZE"]) == ("1", "2", "2")
    assert 20000 <= info.master_port <= 60000 and detect_env() == info
    assert "CUDA_VISIBLE_DEVICES" not in os.environ  # init_distributed picks the GPU by LOCAL_RANK itself
    # Every task of the job derives the same rendezvous: task 0 gets the same address and port.
    for name in LAYOUT_VARS:
        monkeypatch.delenv(name)
    monkeypatch.setenv("SUBMITIT_LOCAL_GLOBALID", "0")
    monkeypatch.setenv("SUBMITIT_LOCAL_LOCALID", "0")
    task0 = distributed.export_submitit_layout()
    assert (task0.rank, task0.master_addr, task0.master_port) == (0, info.master_addr, info.master_port)


def test_submitit_layout_of_one_task_or_no_job_exports_nothing(monkeypatch):
    for name in LAYOUT_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    assert distributed.export_submitit_layout() is None
    for name, value in {**SUBMITIT_LOCAL, "SUBMITIT_LOCAL_NTASKS": "1", "SUBMITIT_LOCAL_GLOBALID": "0",
                        "SUBMITIT_LOCAL_LOCALID": "0"}.items():
        monkeypatch.setenv(name, value)
    assert distributed.export_submitit_layout() is None and "RANK" not in os.environ
