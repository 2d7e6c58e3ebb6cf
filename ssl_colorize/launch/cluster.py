"""Cluster options (the command line and a sweep's [slurm] table), the submitit executor, the queue."""

from __future__ import annotations

import argparse
import contextlib
import getpass
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import submitit
from submitit.core.utils import JobPaths
from tqdm import tqdm

from ssl_colorize.engine.cli import UsageError, check_output_dir

# squeue states of a job that is not over yet (squeue lists no finished job).
ACTIVE_STATES = frozenset({
    "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
    "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "PREEMPTED", "RESV_DEL_HOLD",
})

# The folder that holds the package (a checkout's root, or site-packages): jobs import from it.
PACKAGE_PARENT = Path(__file__).resolve().parent.parent.parent

# Where submitit keeps a single job's logs and pickles, under the current working directory.
DEFAULT_LOG_FOLDER = "runs/slurm/%j"


@dataclass
class ClusterOptions:
    """Where and how a job runs. ``cluster="local"`` runs through submitit's local executor (no SLURM)."""

    cluster: str = "slurm"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: int = 60  # minutes
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None  # default: one task per GPU, or one
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    constraint: str | None = None
    comment: str | None = None
    exclude: str | None = None
    job_name: str | None = None
    log_folder: str | None = None  # default: runs/slurm/%j (or RUN_ROOT/slurm_logs/%j for sweeps)
    array_parallelism: int = 16
    max_requeues: int = 3
    signal_delay_s: int = 120
    setup: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        try:
            self.time = parse_time_minutes(self.time)
        except ValueError as exc:
            raise ValueError(f"--time {self.time}: {exc}") from None
        if self.cluster not in ("slurm", "local"):
            raise ValueError(f"--cluster {self.cluster}: must be slurm or local")
        for name in ("nodes", "array_parallelism"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        for name in ("gpus_per_node", "max_requeues", "signal_delay_s"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 0")
        for name in ("tasks_per_node", "cpus_per_task"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {value}: must be at least 1")
        if self.mem_gb is not None and float(self.mem_gb) <= 0:
            raise ValueError(f"--mem-gb {self.mem_gb}: must be > 0")
        if isinstance(self.setup, str):
            self.setup = [self.setup]
        if self.cluster == "slurm" and self.signal_delay_s >= self.time * 60:
            raise ValueError(f"--signal-delay-s {self.signal_delay_s}: must be shorter than the time limit "
                             f"({self.time} min): SLURM signals the job that long before the limit")

    @property
    def ntasks_per_node(self) -> int:
        return self.tasks_per_node or max(1, self.gpus_per_node)


def parse_time_minutes(value: int | float | str) -> int:
    """SLURM time limits: minutes (``90``), ``MM:SS``, ``HH:MM:SS``, ``D-HH`` or ``D-HH:MM[:SS]``."""
    if isinstance(value, bool):
        raise ValueError(f"time limit must be minutes or [D-]HH:MM:SS, got {value!r}")
    if isinstance(value, (int, float)):
        minutes = float(value)
    else:
        text = str(value).strip()
        match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
        if match is None:
            raise ValueError(f"time limit must be minutes or [D-]HH:MM:SS, got {value!r}")
        days, first, second, third = match.groups()
        if days is None and second is None:
            minutes = float(first)
        elif days is None and third is None:
            minutes = int(first) + int(second) / 60  # MM:SS
        else:
            hours = int(first)
            mins = int(second or 0)
            secs = int(third or 0)
            minutes = int(days or 0) * 1440 + hours * 60 + mins + secs / 60
    if minutes <= 0:
        raise ValueError(f"time limit must be positive, got {value!r}")
    return max(1, int(round(minutes + 0.4999)))  # round up: never ask for less than requested


def add_cluster_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Add the cluster options as a group. Defaults are None so that a sweep file's [slurm] table
    can supply them; :func:`cluster_options` fills in the rest from :class:`ClusterOptions`."""
    group = parser.add_argument_group("cluster (SLURM through submitit)")
    add = group.add_argument
    add("--cluster", choices=("slurm", "local"), default=None,
        help="slurm (default), or local: same job machinery on this machine, no scheduler")
    add("--partition", default=None, help="SLURM partition")
    add("--account", default=None, help="SLURM account to charge")
    add("--qos", default=None, help="SLURM quality of service")
    add("--time", default=None, help="time limit: minutes or [D-]HH:MM:SS (default 60 minutes)")
    add("--nodes", type=int, default=None, help="nodes (default 1)")
    add("--gpus-per-node", type=int, default=None, help="GPUs per node (default 0)")
    add("--tasks-per-node", type=int, default=None,
        help="processes per node (default: one per GPU, or one); more than one means DDP")
    add("--cpus-per-task", type=int, default=None, help="CPUs per process")
    add("--mem-gb", type=float, default=None, help="memory per node in GB")
    add("--constraint", default=None, help="SLURM node features, e.g. 'volta32gb'")
    add("--comment", default=None, help="SLURM job comment")
    add("--exclude", default=None, help="nodes to avoid")
    add("--job-name", default=None, help="job name (default: the entry point's name)")
    add("--log-folder", default=None,
        help="folder for submitit's logs and pickles; %%j becomes the job id (default runs/slurm/%%j here)")
    add("--array-parallelism", type=int, default=None, help="array tasks running at once (default 16)")
    add("--max-requeues", type=int, default=None,
        help="how often a job that reaches its time limit is requeued (default 3)")
    add("--signal-delay-s", type=int, default=None,
        help="seconds before the time limit at which SLURM signals the job to checkpoint (default 120)")
    add("--setup", action="append", default=None,
        help="a shell line to run before the job (e.g. 'module load cuda'); repeatable")
    return group


def cluster_options(args: argparse.Namespace | None = None, base: dict[str, Any] | None = None,
                    source: str = "cluster options") -> ClusterOptions:
    """Built-in defaults, overridden by ``base`` (a sweep's [slurm] table), overridden by the command line.
    A bad value is a UsageError naming the option (and ``source``)."""
    names = {f.name for f in fields(ClusterOptions)}
    values: dict[str, Any] = {}
    for key, value in (base or {}).items():
        if key not in names:
            raise UsageError(f"{source}: unknown cluster option {key!r}; known: {', '.join(sorted(names))}")
        values[key] = value
    if args is not None:
        values.update({k: getattr(args, k) for k in names if getattr(args, k, None) is not None})
    try:
        return ClusterOptions(**values)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{source}: {exc}") from None


def check_log_folder(log_folder: str | os.PathLike, option: str = "--log-folder") -> None:
    """The part of a log folder before the first %j-style tag can be written (creates nothing)."""
    check_output_dir(option, JobPaths.get_first_id_independent_folder(log_folder))


def check_can_submit(opts: ClusterOptions) -> None:
    if opts.cluster == "slurm" and shutil.which("sbatch") is None:
        raise UsageError("--cluster slurm: no SLURM here (sbatch not found); start one with "
                         "bash slurm/local_cluster.sh start, or pass --cluster local")


def _job_setup_lines(opts: ClusterOptions) -> list[str]:
    # A job imports the package the submitter imports, installed or a checkout that is not installed.
    return [f'export PYTHONPATH="{PACKAGE_PARENT}${{PYTHONPATH:+:$PYTHONPATH}}"', *opts.setup]


def make_executor(opts: ClusterOptions, log_folder: str | os.PathLike, job_name: str) -> submitit.AutoExecutor:
    """A submitit executor for these options; jobs use this interpreter (``sys.executable``)."""
    check_can_submit(opts)
    executor = submitit.AutoExecutor(folder=str(log_folder), cluster=opts.cluster,
                                     slurm_max_num_timeout=opts.max_requeues)
    params: dict[str, Any] = {
        "name": opts.job_name or job_name,
        "timeout_min": opts.time,
        "nodes": opts.nodes,
        "tasks_per_node": opts.ntasks_per_node,
        "cpus_per_task": opts.cpus_per_task,
        "gpus_per_node": opts.gpus_per_node or None,
        "mem_gb": opts.mem_gb,
    }
    if opts.cluster == "slurm":
        params.update({
            "slurm_partition": opts.partition,
            "slurm_account": opts.account,
            "slurm_qos": opts.qos,
            "slurm_constraint": opts.constraint,
            "slurm_comment": opts.comment,
            "slurm_exclude": opts.exclude,
            "slurm_array_parallelism": opts.array_parallelism,
            "slurm_signal_delay_s": opts.signal_delay_s,
            "slurm_setup": _job_setup_lines(opts),
        })
    else:
        params["local_setup"] = _job_setup_lines(opts)
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return executor


# ----------------------------------------------------------------------------------------------------
# The queue
# ----------------------------------------------------------------------------------------------------
def queue_states() -> dict[str, str]:
    """State of every active job of this user, by job id (array tasks as ``ARRAYID_TASK``)."""
    if shutil.which("squeue") is None:
        return {}
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T", "-u", getpass.getuser()],
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"squeue failed: {out.stderr.strip()}")
    states = {}
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            states[parts[0]] = parts[1]
    return states


def active_job_ids(job_ids: Iterable[str]) -> set[str]:
    """The subset of ``job_ids`` that is still pending or running."""
    states = queue_states()
    return {j for j in job_ids if states.get(str(j), "") in ACTIVE_STATES}


def wait_for_jobs(job_ids: Sequence[str], poll_s: float = 2.0, timeout_s: float | None = None) -> None:
    """Block until none of ``job_ids`` is pending or running any more (requeued jobs included)."""
    job_ids = [str(j) for j in job_ids]
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with tqdm(total=len(job_ids), desc="jobs finished", unit="job") as bar:
        while True:
            active = active_job_ids(job_ids)
            bar.n = len(job_ids) - len(active)
            bar.refresh()
            if not active:
                return
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"jobs still active after {timeout_s} s: {sorted(active)}")
            time.sleep(poll_s)


@contextlib.contextmanager
def outside_job_environment() -> Iterator[None]:
    """Hide this job's SLURM variables while submitting from inside a job (the watcher job):
    sbatch and srun read SLURM_*/SBATCH_* variables as options and would inherit the watcher's."""
    saved = {k: v for k, v in os.environ.items()
             if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "SUBMITIT_"))}
    for key in saved:
        del os.environ[key]
    try:
        yield
    finally:
        os.environ.update(saved)


def log_folder_path(log_folder: str | os.PathLike) -> str:
    """A log folder as an absolute path (submitit resolves it against the cwd at submission too)."""
    return str(Path(log_folder).expanduser().absolute())
