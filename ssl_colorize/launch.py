"""Run any entry point on SLURM through submitit: one job, a sweep as one job array, a DDP job.

The contract between this launcher and an entry point (``ssl_colorize.pretrain``, ``benchmarks/*.py``)
------------------------------------------------------------------------------------------------------
* The entry point is a module (``ssl_colorize.pretrain``) or a script path (``benchmarks/linear_probe.py``)
  exposing ``get_args_parser() -> argparse.ArgumentParser`` and ``main(args)``. A job runs exactly the
  arguments it would take locally: ``main(get_args_parser().parse_args(argv))``.
* Options the launcher sets, each only where the entry point's parser has it:

  ``--out DIR``        the run folder. The entry point keeps a rolling checkpoint there (pretraining's
                       ``checkpoint.pth``, the probes' ``probe_checkpoint.pth``), written atomically
                       (:func:`ssl_colorize.checkpoint.save_checkpoint`) at regular intervals, holding
                       everything needed to continue: weights, optimizer, scheduler, step, RNG and
                       data-order state.
  ``--resume auto``    (or a path) ``auto`` resumes from that rolling checkpoint when it exists and starts
                       fresh otherwise. Resuming must give the same final result as an uninterrupted run.
                       The launcher adds ``--resume auto`` to every sweep job, to a job SLURM restarts
                       (``scontrol requeue``, node failure: ``SLURM_RESTART_COUNT`` > 0) and to the
                       submission that submitit's checkpointing requeues after a preemption or time-limit
                       signal (:meth:`EntryPointJob.checkpoint`).
  ``--run-id ID``      stored in every result row. A sweep derives it from the entry point and its
                       arguments (:func:`run_id_for`), so it is stable across re-submissions.
  ``--out-csv CSV``    the results table; rows go in with :func:`ssl_colorize.results.append_rows`
                       (file-locked and atomic, so concurrent jobs lose nothing), once, at the end, from
                       rank 0 only. A sweep treats a grid point as finished when this table holds rows
                       with its run id, and a job whose run id already has rows there does not run again.
* Multi-process jobs (several tasks per node, several nodes): the launcher exports ``RANK``,
  ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` from the submitit job environment
  and joins the process group (:func:`ssl_colorize.distributed.init_distributed`: NCCL on GPUs, gloo on
  CPUs) before calling ``main``; ``main`` calls ``init_distributed()`` itself too (it is idempotent), so
  that torchrun works the same way, and uses ``distributed.is_main()`` for files and rows.
* Snapshots for the watcher: pretraining keeps snapshots in its run folder, written atomically, with
  names that match a glob (default ``snapshots/*.pth``) and sort in training order.

What lives here: entry-point resolution, the cluster options (:func:`add_cluster_args`), the
checkpointable submitit callable (:class:`EntryPointJob`), submission of one job or a job array, the
queue queries, sweeps (TOML files in ``slurm/``) and the snapshot watcher. ``slurm/submit.py`` and
``slurm/sweep.py`` are thin command lines over these functions.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import getpass
import hashlib
import importlib
import importlib.util
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable, Iterator, Sequence

import submitit
from tqdm import tqdm

from ssl_colorize import distributed

try:  # sweep files are TOML: the standard library reads it from Python 3.11, tomli before
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO_ROOT = Path(__file__).resolve().parent.parent

# Options the launcher manages (see the module docstring); a sweep may not set them itself.
MANAGED_OPTIONS = ("out", "resume", "run_id", "out_csv")

# squeue states of a job that is not over yet (squeue lists no finished job).
ACTIVE_STATES = frozenset({
    "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
    "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "PREEMPTED", "RESV_DEL_HOLD",
})


# ----------------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------------
def _is_script(spec: str) -> bool:
    return spec.endswith(".py") or "/" in spec or os.sep in spec


def _script_path(spec: str) -> Path:
    """A script entry point, looked up relative to the working directory, then to the repository."""
    path = Path(spec).expanduser()
    candidates = [path] if path.is_absolute() else [Path.cwd() / path, REPO_ROOT / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise ValueError(f"entry point {spec!r}: no such file (looked in {', '.join(map(str, candidates))})")


def canonical_entry_point(spec: str) -> str:
    """The name that identifies an entry point in run ids: a module name, or a script path relative
    to the repository when it lies inside it (absolute otherwise)."""
    if not _is_script(spec):
        return spec
    path = _script_path(spec)
    try:
        return path.relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return path.as_posix()


def load_entry_point(spec: str) -> ModuleType:
    """Import an entry point (module name or script path) and check it has get_args_parser and main."""
    if _is_script(spec):
        path = _script_path(spec)
        try:
            name = ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts)
        except ValueError:
            name = "_ssl_colorize_entry_" + re.sub(r"\W", "_", path.stem)
        if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path):
            module = sys.modules[name]
        else:
            # Scripts may import their siblings or the package from a checkout that is not installed.
            if str(REPO_ROOT) not in sys.path:
                sys.path.insert(0, str(REPO_ROOT))
            module_spec = importlib.util.spec_from_file_location(name, path)
            if module_spec is None or module_spec.loader is None:
                raise ValueError(f"entry point {spec!r}: cannot import {path}")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(spec)
        except ModuleNotFoundError as exc:
            raise ValueError(f"entry point {spec!r}: cannot import it ({exc})") from exc
    for attr in ("get_args_parser", "main"):
        if not callable(getattr(module, attr, None)):
            raise ValueError(f"entry point {spec!r} has no {attr}(); entry points expose get_args_parser() "
                             f"and main(args)")
    return module


def entry_parser(spec: str) -> argparse.ArgumentParser:
    return load_entry_point(spec).get_args_parser()


def parser_option(parser: argparse.ArgumentParser, key: str) -> argparse.Action | None:
    """The parser's action for ``key`` (``lr``, ``out_csv``), spelt ``--key`` or with dashes, else None."""
    for option in (f"--{key}", f"--{key.replace('_', '-')}"):
        action = parser._option_string_actions.get(option)  # argparse keeps no public lookup
        if action is not None:
            return action
    return None


def parse_entry_args(spec: str, argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``argv`` with the entry point's own parser; a bad argument raises ValueError."""
    parser = entry_parser(spec)
    try:
        return parser.parse_args(list(argv))
    except SystemExit as exc:  # argparse has printed the reason on stderr
        raise ValueError(f"{spec}: invalid arguments {list(argv)} (argparse exit {exc.code}; see above)") from None


def _has_flag(argv: Sequence[str], action: argparse.Action) -> bool:
    return any(a in action.option_strings or a.split("=", 1)[0] in action.option_strings for a in argv)


def _values_taken(action: argparse.Action) -> tuple[int, int]:
    """How many values an option takes after its flag: (at least, at most)."""
    nargs = action.nargs
    if nargs is None:
        return 1, 1
    if nargs == "?":
        return 0, 1
    if nargs in ("*", "+", argparse.REMAINDER):
        return (1 if nargs == "+" else 0), sys.maxsize
    return int(nargs), int(nargs)


def _looks_like_value(token: str) -> bool:
    return not token.startswith("-") or re.fullmatch(r"-\d.*", token) is not None


def without_option(argv: Sequence[str], action: argparse.Action) -> list[str]:
    """``argv`` without any occurrence of the option ``action`` (flag and values)."""
    out, pos = [], 0
    argv = list(argv)
    while pos < len(argv):
        token = argv[pos]
        if token.split("=", 1)[0] in action.option_strings:
            pos += 1
            if "=" not in token:
                least, most = _values_taken(action)
                taken = 0
                while pos < len(argv) and taken < most and (taken < least or _looks_like_value(argv[pos])):
                    pos += 1
                    taken += 1
            continue
        out.append(token)
        pos += 1
    return out


def with_option(spec: str, argv: Sequence[str], key: str, value: str) -> list[str]:
    """``argv`` with ``--key value`` replacing any earlier value, if the entry point has that option."""
    action = parser_option(entry_parser(spec), key)
    if action is None:
        return list(argv)
    return without_option(argv, action) + [action.option_strings[-1], value]


# ----------------------------------------------------------------------------------------------------
# Cluster options
# ----------------------------------------------------------------------------------------------------
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
        self.time = parse_time_minutes(self.time)
        if self.cluster not in ("slurm", "local"):
            raise ValueError(f"cluster must be 'slurm' or 'local', got {self.cluster!r}")
        for name in ("nodes", "array_parallelism"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("gpus_per_node", "max_requeues", "signal_delay_s"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("tasks_per_node", "cpus_per_task"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if isinstance(self.setup, str):
            self.setup = [self.setup]
        if self.cluster == "slurm" and self.signal_delay_s >= self.time * 60:
            raise ValueError(f"--signal-delay-s {self.signal_delay_s} must be shorter than the time limit "
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
        help="folder for submitit's logs and pickles; %%j becomes the job id (default runs/slurm/%%j)")
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
    """Built-in defaults, overridden by ``base`` (a sweep's [slurm] table), overridden by the command line."""
    names = {f.name for f in fields(ClusterOptions)}
    values: dict[str, Any] = {}
    for key, value in (base or {}).items():
        if key not in names:
            raise ValueError(f"{source}: unknown cluster option {key!r}; known: {sorted(names)}")
        values[key] = value
    if args is not None:
        values.update({k: getattr(args, k) for k in names if getattr(args, k, None) is not None})
    try:
        return ClusterOptions(**values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: {exc}") from exc


def _job_setup_lines(opts: ClusterOptions) -> list[str]:
    # Jobs import this checkout, whether or not it is installed in the job's Python environment.
    return [f'export PYTHONPATH="{REPO_ROOT}${{PYTHONPATH:+:$PYTHONPATH}}"', *opts.setup]


def make_executor(opts: ClusterOptions, log_folder: str | os.PathLike, job_name: str) -> submitit.AutoExecutor:
    """A submitit executor for these options; jobs use this interpreter (``sys.executable``)."""
    if opts.cluster == "slurm" and shutil.which("sbatch") is None:
        raise RuntimeError("no SLURM here (sbatch not found); start one with slurm/local_cluster.sh start, "
                           "or pass --cluster local")
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
# The job
# ----------------------------------------------------------------------------------------------------
def _restart_count() -> int:
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    except ValueError:
        return 0


def _export_submitit_layout() -> None:
    """Inside a submitit job, export the torchrun variables that init_distributed reads."""
    if "SUBMITIT_EXECUTOR" not in os.environ:
        return
    env = submitit.JobEnvironment()
    if env.num_tasks <= 1:
        return
    os.environ.update({
        "RANK": str(env.global_rank),
        "WORLD_SIZE": str(env.num_tasks),
        "LOCAL_RANK": str(env.local_rank),
        "LOCAL_WORLD_SIZE": str(env.num_tasks // max(1, env.num_nodes)),
        "MASTER_ADDR": str(env.hostnames[0]),
        "MASTER_PORT": str(distributed.port_for_job(env.raw_job_id)),
    })


def rows_exist(out_csv: str | os.PathLike | None, run_id: str | None) -> bool:
    """Whether the results table already holds rows of this run."""
    if not out_csv or not run_id:
        return False
    return run_id in finished_run_ids(out_csv)


class EntryPointJob:
    """A picklable, checkpointable submitit callable: ``main(get_args_parser().parse_args(argv))``.

    It stores the entry point's name and its argument list, not the module, so the job imports the
    code in the job. On preemption or at the time limit submitit calls :meth:`checkpoint`, which
    returns the same job with ``--resume auto``; the entry point's rolling checkpoint does the rest.
    """

    def __init__(self, entry_point: str, argv: Sequence[str]) -> None:
        self.entry_point = entry_point
        self.argv = [str(a) for a in argv]

    def __repr__(self) -> str:
        return f"EntryPointJob({self.entry_point!r}, {self.argv!r})"

    def __call__(self) -> Any:
        argv = list(self.argv)
        module = load_entry_point(self.entry_point)
        parser = module.get_args_parser()
        resume = parser_option(parser, "resume")
        if _restart_count() > 0 and resume is not None and not _has_flag(argv, resume):
            # SLURM restarted the original submission (scontrol requeue, node failure): resume.
            argv += [resume.option_strings[-1], "auto"]
        args = parser.parse_args(argv)
        run_id, out_csv = getattr(args, "run_id", None), getattr(args, "out_csv", None)
        if rows_exist(out_csv, run_id):
            print(f"[launch] {run_id}: {out_csv} already holds its rows; not running it again", flush=True)
            return {"run_id": run_id, "skipped": True}
        _export_submitit_layout()
        layout = distributed.init_distributed()
        print(f"[launch] {self.entry_point} rank {layout.rank}/{layout.world_size} "
              f"restart {_restart_count()} argv {argv}", flush=True)
        try:
            return module.main(args)
        finally:
            distributed.destroy()

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on the signal SLURM sends before a time limit or a preemption: the job
        is requeued as this same call with ``--resume auto``."""
        argv = with_option(self.entry_point, self.argv, "resume", "auto")
        return submitit.helpers.DelayedSubmission(EntryPointJob(self.entry_point, argv), *args, **kwargs)


def _job_name(entry_point: str) -> str:
    return Path(entry_point).stem if _is_script(entry_point) else entry_point.rsplit(".", 1)[-1]


def submit(entry_point: str, argv: Sequence[str], opts: ClusterOptions) -> submitit.Job:
    """Submit one job running ``entry_point`` with ``argv`` (validated here with its parser first)."""
    parse_entry_args(entry_point, argv)
    job_spec = str(_script_path(entry_point)) if _is_script(entry_point) else entry_point
    executor = make_executor(opts, opts.log_folder or "runs/slurm/%j", _job_name(entry_point))
    return executor.submit(EntryPointJob(job_spec, argv))


def submit_array(jobs: Sequence[EntryPointJob], opts: ClusterOptions, log_folder: str | os.PathLike,
                 job_name: str) -> list[submitit.Job]:
    """Submit several jobs as one SLURM job array (at most ``opts.array_parallelism`` at once)."""
    executor = make_executor(opts, log_folder, job_name)
    with executor.batch():
        pending = [executor.submit(job) for job in jobs]
    return pending


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
def _outside_job_environment() -> Iterator[None]:
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


# ----------------------------------------------------------------------------------------------------
# Sweeps
# ----------------------------------------------------------------------------------------------------
@dataclass
class Sweep:
    """A sweep file: ``entry_point``, fixed ``[args]``, a ``[grid]`` of lists, cluster ``[slurm]``."""

    path: Path
    name: str
    entry_point: str
    out_csv: Path
    run_root: Path
    args: dict[str, Any]
    grid: dict[str, list[Any]]
    slurm: dict[str, Any]


@dataclass
class SweepPoint:
    """One job of a sweep: its grid values, its run id and its full argument list."""

    index: int
    params: dict[str, Any]
    run_id: str
    out_dir: Path
    argv: list[str]


def load_sweep(path: str | os.PathLike) -> Sweep:
    """Read and validate a sweep TOML file; relative paths in it are relative to the working directory."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"sweep file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML ({exc})") from None
    known = {"name", "entry_point", "out_csv", "run_root", "args", "grid", "slurm"}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; a sweep file has {sorted(known)}")
    for key in ("entry_point", "out_csv"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise ValueError(f"{path}: '{key}' (a string) is required")
    name = data.get("name", path.stem)
    args, grid, slurm = data.get("args", {}), data.get("grid", {}), data.get("slurm", {})
    for table, value in (("args", args), ("grid", grid), ("slurm", slurm)):
        if not isinstance(value, dict):
            raise ValueError(f"{path}: [{table}] must be a table")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"{path}: [grid] {key} must be a non-empty list of values")
    for key in set(args) | set(grid):
        if key in MANAGED_OPTIONS or key.replace("-", "_") in MANAGED_OPTIONS:
            raise ValueError(f"{path}: {key!r} is set by the sweep itself (out_csv, run_root); remove it")
    overlap = set(args) & set(grid)
    if overlap:
        raise ValueError(f"{path}: {sorted(overlap)} appear in both [args] and [grid]")
    cluster_options(base=slurm, source=f"{path} [slurm]")  # validates the table
    run_root = Path(data.get("run_root", f"runs/{name}"))
    return Sweep(path=path, name=name, entry_point=data["entry_point"], out_csv=Path(data["out_csv"]).absolute(),
                 run_root=run_root.absolute(), args=dict(args), grid=dict(grid), slurm=dict(slurm))


def options_to_argv(parser: argparse.ArgumentParser, values: dict[str, Any], source: str) -> list[str]:
    """``{"lr": 0.1, "taps": ["conv1", "conv2"], "amp": true}`` -> ``--lr 0.1 --taps conv1 conv2 --amp``,
    spelt as the entry point's parser spells them."""
    argv: list[str] = []
    for key, value in values.items():
        action = parser_option(parser, key)
        if action is None:
            raise ValueError(f"{source}: {key!r} is not an option of the entry point")
        option = action.option_strings[-1]
        if isinstance(action, argparse.BooleanOptionalAction):  # option_strings: --flag, --no-flag
            if not isinstance(value, bool):
                raise ValueError(f"{source}: {key} is a switch; give true or false, not {value!r}")
            argv.append(action.option_strings[0] if value else action.option_strings[1])
        elif action.nargs == 0:  # store_true / store_false / store_const
            if not isinstance(value, bool):
                raise ValueError(f"{source}: {key} is a switch; give true or false, not {value!r}")
            if value != bool(action.default):
                argv.append(option)
        elif isinstance(value, list):
            argv += [option, *map(str, value)]
        else:
            argv += [option, str(value)]
    return argv


def run_id_for(entry_point: str, params: dict[str, Any]) -> str:
    """A stable id for (entry point, arguments): the same grid point always gets the same id,
    whatever the order of keys in the sweep file."""
    canonical = json.dumps({"entry_point": canonical_entry_point(entry_point), "args": params},
                           sort_keys=True, default=str)
    digest = hashlib.sha1(canonical.encode()).hexdigest()[:12]
    return f"{_job_name(entry_point)}-{digest}"


def expand_sweep(sweep: Sweep) -> list[SweepPoint]:
    """Every combination of the grid (in file order, last key fastest) as a SweepPoint."""
    parser = entry_parser(sweep.entry_point)
    for key in ("run_id", "out_csv"):
        if parser_option(parser, key) is None:
            raise ValueError(f"{sweep.path}: entry point {sweep.entry_point} has no --{key.replace('_', '-')} "
                             f"option; a sweep needs it to find which jobs have finished")
    keys = list(sweep.grid)
    points = []
    for index, combo in enumerate(itertools.product(*(sweep.grid[k] for k in keys))):
        params = dict(zip(keys, combo))
        all_args = {**sweep.args, **params}
        run_id = run_id_for(sweep.entry_point, all_args)
        out_dir = sweep.run_root / run_id
        argv = options_to_argv(parser, all_args, f"{sweep.path} point {params}")
        argv = with_option(sweep.entry_point, argv, "run_id", run_id)
        argv = with_option(sweep.entry_point, argv, "out_csv", str(sweep.out_csv))
        argv = with_option(sweep.entry_point, argv, "out", str(out_dir))
        argv = with_option(sweep.entry_point, argv, "resume", "auto")
        try:
            parser.parse_args(argv)
        except SystemExit:
            raise ValueError(f"{sweep.path}: point {params} gives arguments the entry point rejects: "
                             f"{argv} (see the argparse message above)") from None
        points.append(SweepPoint(index, params, run_id, out_dir, argv))
    return points


def finished_run_ids(out_csv: str | os.PathLike) -> set[str]:
    """Run ids that have rows in the results table (an absent table has none)."""
    from ssl_colorize.results import read_rows

    rows = read_rows(out_csv)
    if rows.empty:
        return set()
    return set(rows["run_id"].astype(str))


def _manifest_path(sweep: Sweep) -> Path:
    return sweep.run_root / "submitted.jsonl"


def read_manifest(sweep: Sweep) -> dict[str, str]:
    """run id -> the SLURM job id of its latest submission."""
    path = _manifest_path(sweep)
    latest: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                entry = json.loads(line)
                latest[entry["run_id"]] = entry["job_id"]
    return latest


def _append_manifest(sweep: Sweep, entries: list[dict[str, str]]) -> None:
    path = _manifest_path(sweep)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.write("".join(json.dumps(e) + "\n" for e in entries))
        handle.flush()
        os.fsync(handle.fileno())
        fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass
class SweepPlan:
    """Which points are finished (rows exist), which are queued or running, which to submit."""

    done: list[SweepPoint]
    active: list[tuple[SweepPoint, str]]
    todo: list[SweepPoint]


def plan_sweep(sweep: Sweep, points: list[SweepPoint] | None = None, check_queue: bool = True) -> SweepPlan:
    points = expand_sweep(sweep) if points is None else points
    finished = finished_run_ids(sweep.out_csv)
    manifest = read_manifest(sweep)
    active_ids = active_job_ids(manifest.values()) if check_queue and manifest else set()
    plan = SweepPlan([], [], [])
    for point in points:
        job_id = manifest.get(point.run_id)
        if point.run_id in finished:
            plan.done.append(point)
        elif job_id is not None and job_id in active_ids:
            plan.active.append((point, job_id))
        else:
            plan.todo.append(point)
    return plan


def submit_sweep(sweep: Sweep, opts: ClusterOptions, points: Sequence[SweepPoint]) -> list[submitit.Job]:
    """Submit ``points`` as one job array and record their job ids in RUN_ROOT/submitted.jsonl."""
    if not points:
        return []
    log_folder = opts.log_folder or str(sweep.run_root / "slurm_logs" / "%j")
    job_spec = str(_script_path(sweep.entry_point)) if _is_script(sweep.entry_point) else sweep.entry_point
    jobs = submit_array([EntryPointJob(job_spec, p.argv) for p in points], opts, log_folder, sweep.name)
    _append_manifest(sweep, [
        {"run_id": p.run_id, "job_id": str(j.job_id), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        for p, j in zip(points, jobs)
    ])
    return jobs


def describe_plan(plan: SweepPlan) -> str:
    lines = [f"{len(plan.done)} finished, {len(plan.active)} queued or running, {len(plan.todo)} to submit"]
    for point in plan.done:
        lines.append(f"  done     {point.run_id}  {json.dumps(point.params)}")
    for point, job_id in plan.active:
        lines.append(f"  active   {point.run_id}  {json.dumps(point.params)}  job {job_id}")
    for point in plan.todo:
        lines.append(f"  submit   {point.run_id}  {json.dumps(point.params)}")
    return "\n".join(lines)


def collect_sweep(sweep: Sweep, points: list[SweepPoint] | None = None):
    """The sweep's result rows, one per measured number, with a column per grid key (a DataFrame)."""
    from ssl_colorize.results import read_rows

    points = expand_sweep(sweep) if points is None else points
    rows = read_rows(sweep.out_csv)
    if rows.empty:
        return rows
    rows = rows[rows["run_id"].astype(str).isin({p.run_id for p in points})].copy()
    by_id = {p.run_id: p.params for p in points}
    for key in sweep.grid:
        rows[f"grid.{key}"] = [json.dumps(by_id[r][key]) if isinstance(by_id[r][key], list) else by_id[r][key]
                               for r in rows["run_id"].astype(str)]
    return rows.reset_index(drop=True)


# ----------------------------------------------------------------------------------------------------
# The watcher: evaluate each pretraining snapshot as it appears
# ----------------------------------------------------------------------------------------------------
def snapshot_sweep(sweep: Sweep, snapshot: Path, axis: str) -> Sweep:
    """The sweep with its ``axis`` (the checkpoint option) fixed to one snapshot."""
    args = {k: v for k, v in sweep.args.items() if k != axis}
    grid = {axis: [str(snapshot)], **{k: v for k, v in sweep.grid.items() if k != axis}}
    return Sweep(sweep.path, sweep.name, sweep.entry_point, sweep.out_csv, sweep.run_root, args, grid, sweep.slurm)


def watch_snapshots(sweep: Sweep, opts: ClusterOptions, run_dir: str | os.PathLike,
                    snapshot_glob: str = "snapshots/*.pth", axis: str = "checkpoint", poll_s: float = 60.0,
                    until_job: str | None = None, until_file: str | None = None,
                    max_hours: float | None = None) -> list[str]:
    """Poll ``run_dir`` for snapshots and submit the sweep (as a job array) for each new one.

    Stops after a last scan once the pretraining job ``until_job`` has left the queue, once
    ``run_dir/until_file`` exists, or after ``max_hours``. Idempotent: a snapshot whose sweep is
    finished or queued is not submitted again, so the watcher can be restarted (or requeued) freely.
    Returns the job ids it submitted.
    """
    run_dir = Path(run_dir)
    if parser_option(entry_parser(sweep.entry_point), axis) is None:
        raise ValueError(f"{sweep.path}: entry point {sweep.entry_point} has no --{axis} option to receive "
                         f"snapshots (set --axis)")
    seen: set[Path] = set()
    submitted: list[str] = []
    deadline = None if max_hours is None else time.monotonic() + max_hours * 3600
    while True:
        stopping = (
            (until_job is not None and not active_job_ids([until_job]))
            or (until_file is not None and (run_dir / until_file).exists())
            or (deadline is not None and time.monotonic() > deadline)
        )
        for snapshot in sorted(run_dir.glob(snapshot_glob)):
            if snapshot in seen or not snapshot.is_file():
                continue
            one = snapshot_sweep(sweep, snapshot.resolve(), axis)
            plan = plan_sweep(one)
            with _outside_job_environment():
                jobs = submit_sweep(one, opts, plan.todo)
            submitted += [str(j.job_id) for j in jobs]
            print(f"[watch] {snapshot}: {len(plan.todo)} submitted, {len(plan.done)} finished, "
                  f"{len(plan.active)} queued", flush=True)
            seen.add(snapshot)
        if stopping:
            return submitted
        time.sleep(poll_s)


class WatcherJob:
    """:func:`watch_snapshots` as a submitit job (so it outlives the login session); it holds no
    state of its own, so on preemption it is simply requeued."""

    def __init__(self, sweep_path: str, opts: dict[str, Any], run_dir: str, snapshot_glob: str, axis: str,
                 poll_s: float, until_job: str | None, until_file: str | None, cwd: str) -> None:
        self.sweep_path, self.opts, self.run_dir = sweep_path, opts, run_dir
        self.snapshot_glob, self.axis, self.poll_s = snapshot_glob, axis, poll_s
        self.until_job, self.until_file, self.cwd = until_job, until_file, cwd

    def __call__(self) -> list[str]:
        os.chdir(self.cwd)
        sweep = load_sweep(self.sweep_path)
        return watch_snapshots(sweep, ClusterOptions(**self.opts), self.run_dir, self.snapshot_glob, self.axis,
                               self.poll_s, self.until_job, self.until_file)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def submit_watcher(sweep_path: str | os.PathLike, probe_opts: ClusterOptions, run_dir: str | os.PathLike,
                   until_job: str | None, snapshot_glob: str = "snapshots/*.pth", axis: str = "checkpoint",
                   poll_s: float = 60.0, until_file: str | None = None,
                   watcher_time: int | str | None = None) -> submitit.Job:
    """Submit the watcher as its own one-CPU job; the probe jobs it submits use ``probe_opts``."""
    sweep = load_sweep(sweep_path)  # validate now rather than in the queue
    opts = asdict(probe_opts)
    watcher_opts = ClusterOptions(**{
        **opts, "nodes": 1, "gpus_per_node": 0, "tasks_per_node": 1, "cpus_per_task": 1, "mem_gb": None,
        "time": watcher_time if watcher_time is not None else probe_opts.time,
        "constraint": None, "log_folder": str(sweep.run_root / "slurm_logs" / "watcher_%j"),
    })
    executor = make_executor(watcher_opts, watcher_opts.log_folder, f"watch-{sweep.name}")
    job = WatcherJob(str(Path(sweep_path).absolute()), opts, str(Path(run_dir).absolute()), snapshot_glob, axis,
                     poll_s, until_job, until_file, os.getcwd())
    return executor.submit(job)
