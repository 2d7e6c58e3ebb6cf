"""torch.distributed from the job's environment: torchrun, a SLURM job step, or one plain process.

Where the process layout comes from, first match wins:

1. ``RANK`` and ``WORLD_SIZE`` (with ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``): set by torchrun,
   and inside submitit jobs of several tasks by :func:`export_submitit_layout` (submitit's
   ``TorchDistributedEnvironment``), which the launcher (:mod:`ssl_colorize.launch`) calls.
2. A SLURM job step started by ``srun`` (``SLURM_STEP_ID`` is set): ``SLURM_PROCID``,
   ``SLURM_STEP_NUM_TASKS``, ``SLURM_LOCALID``; the master is the first host of the step's node list
   (expanded by ``scontrol show hostnames``, or by :func:`expand_hostlist` where scontrol is absent)
   and the port is derived from the job id, so two jobs sharing a node do not collide. The batch
   step of an ``sbatch`` script is not a job step: it sees ``SLURM_NTASKS`` of the whole allocation
   but runs once, so it counts as one process.
3. Otherwise a single process: :func:`init_distributed` is a no-op.

Backend: NCCL when CUDA is available (each process takes GPU ``LOCAL_RANK``), gloo on CPUs.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as dist

# Ports derived from a SLURM job id fall in this range (above the usual ephemeral-port floor of
# well-known services, below Linux's default ephemeral range 32768-60999).
_PORT_BASE, _PORT_SPAN = 20000, 12000


@dataclass(frozen=True)
class DistEnv:
    """The process layout of this job: who am I, how many are we, where is the rendezvous."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"  # "torchrun", "slurm" or "single"

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def _int_env(environ: Mapping[str, str], name: str) -> int:
    value = environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _split_top_level(nodelist: str) -> list[str]:
    """Split 'a[1-2,4],b' at the commas that are outside brackets."""
    parts, depth, start = [], 0, 0
    for pos, char in enumerate(nodelist):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in node list {nodelist!r}")
        elif char == "," and depth == 0:
            parts.append(nodelist[start:pos])
            start = pos + 1
    if depth != 0:
        raise ValueError(f"unbalanced '[' in node list {nodelist!r}")
    parts.append(nodelist[start:])
    return [p for p in parts if p]


def _expand_range_list(ranges: str, nodelist: str) -> list[str]:
    """'01-03,7' -> ['01', '02', '03', '7'] (zero padding follows the lower bound, as in SLURM)."""
    out = []
    for item in ranges.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if match is None:
            raise ValueError(f"cannot read range {item!r} in node list {nodelist!r}")
        low, high = match.group(1), match.group(2)
        if high is None:
            out.append(low)
            continue
        if int(high) < int(low):
            raise ValueError(f"descending range {item!r} in node list {nodelist!r}")
        out.extend(f"{n:0{len(low)}d}" for n in range(int(low), int(high) + 1))
    return out


def expand_hostlist(nodelist: str) -> list[str]:
    """Expand a SLURM host list such as ``gpu[01-03,7],rack[1-2]-n[1-4]`` into host names, in order.

    A pure-Python version of ``scontrol show hostnames``, used where scontrol is not installed.
    """
    hosts = []
    for group in _split_top_level(nodelist.strip()):
        names = [""]
        # Alternate literal text and bracketed range lists; every bracket multiplies the names.
        for literal, ranges in re.findall(r"([^\[\]]*)(?:\[([^\]]*)\])?", group):
            names = [n + literal for n in names]
            if ranges:
                names = [n + suffix for n in names for suffix in _expand_range_list(ranges, nodelist)]
        hosts.extend(names)
    return hosts


def slurm_hostnames(nodelist: str) -> list[str]:
    """Host names of a SLURM node list: ``scontrol show hostnames`` when available, else our parser."""
    scontrol = shutil.which("scontrol")
    if scontrol is not None:
        # On failure, fall back to the parser below: the list format is documented and stable.
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            out = subprocess.run(
                [scontrol, "show", "hostnames", nodelist], capture_output=True, text=True, check=True, timeout=30
            ).stdout.split()
            if out:
                return out
    return expand_hostlist(nodelist)


def port_for_job(job_id: str) -> int:
    """A rendezvous port that is the same for every task of a job and differs between nearby jobs."""
    digits = re.sub(r"\D", "", str(job_id)) or "0"
    return _PORT_BASE + int(digits) % _PORT_SPAN


def detect_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read the process layout from ``environ`` (default ``os.environ``); see the module docstring."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int_env(env, "WORLD_SIZE")
        rank = _int_env(env, "RANK")
        local_rank = _int_env(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        port = _int_env(env, "MASTER_PORT") if "MASTER_PORT" in env else 29500
        source = "torchrun"
    elif "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
        tasks_var = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
        world = _int_env(env, tasks_var) if tasks_var in env else 1
        rank = _int_env(env, "SLURM_PROCID")
        local_rank = _int_env(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        addr = slurm_hostnames(nodelist)[0] if nodelist else "127.0.0.1"
        port = _int_env(env, "MASTER_PORT") if "MASTER_PORT" in env else port_for_job(env.get("SLURM_JOB_ID", "0"))
        addr = env.get("MASTER_ADDR", addr)
        source = "slurm"
    else:
        return DistEnv()
    if world < 1 or not 0 <= rank < world or local_rank < 0:
        raise ValueError(f"inconsistent process layout from {source}: rank={rank}, world_size={world}, "
                         f"local_rank={local_rank}")
    return DistEnv(rank, world, local_rank, addr, port, source)


def export_submitit_layout() -> DistEnv | None:
    """Inside a submitit job of several tasks, export the torchrun variables of this task.

    submitit's ``TorchDistributedEnvironment`` reads the layout from the job (ranks from SLURM or from
    submitit's local executor, the master on the job's first host, a port derived from the job id) and
    exports ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and
    ``MASTER_PORT``; :func:`init_distributed` then reads them as it reads torchrun's. Returns the layout,
    or None outside a submitit job or for a single task (nothing exported).
    """
    if "SUBMITIT_EXECUTOR" not in os.environ:
        return None
    import submitit  # only the launcher's jobs need it

    if submitit.JobEnvironment().num_tasks <= 1:
        return None
    # CUDA_VISIBLE_DEVICES is left alone: init_distributed picks GPU LOCAL_RANK among the visible
    # ones, which also holds where SLURM already narrowed each task's devices. overwrite: a job
    # submitted from another job (the snapshot watcher) may have inherited the submitter's values.
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    return detect_env()


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> DistEnv:
    """Join the job's process group (NCCL on GPUs, gloo on CPUs); a no-op for a single process.

    Idempotent: a second call returns the layout of the group already joined. With CUDA, each
    process uses GPU ``local_rank`` (modulo the visible devices, for jobs whose tasks see one GPU).
    """
    info = detect_env()
    if not info.is_distributed:
        return info
    if dist.is_available() and dist.is_initialized():
        return info
    if not dist.is_available():
        raise RuntimeError(f"{info.world_size} processes requested but torch.distributed is not available")
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    # Export the layout so that code reading the torchrun variables sees the same thing.
    os.environ.update({
        "RANK": str(info.rank), "WORLD_SIZE": str(info.world_size), "LOCAL_RANK": str(info.local_rank),
        "MASTER_ADDR": info.master_addr, "MASTER_PORT": str(info.master_port),
    })
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{info.master_addr}:{info.master_port}",
        rank=info.rank,
        world_size=info.world_size,
        timeout=_dt.timedelta(seconds=timeout_s),
    )
    return info


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """True on the process that writes checkpoints, logs and result rows (rank 0)."""
    return get_rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def device() -> torch.device:
    """This process's device: its GPU when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def destroy() -> None:
    """Leave the process group (safe to call when none was joined)."""
    if is_initialized():
        dist.destroy_process_group()
