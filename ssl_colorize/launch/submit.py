"""One job or a job array on SLURM (or submitit's local executor), requeued from its checkpoint.

    python -m ssl_colorize.launch submit [cluster options] -- ENTRYPOINT [ARGS...]
    python slurm/submit.py [cluster options] -- ENTRYPOINT [ARGS...]          (the same)

ENTRYPOINT is a module (``ssl_colorize.pretrain``) or a benchmark's script (``benchmarks/linear_probe.py``);
ARGS are exactly what ``python -m ENTRYPOINT ARGS`` would take. The entry point's own parser and
``validate`` check ARGS here, before anything is submitted (``--dry-run`` included). Examples:

    # pretraining on 2 nodes x 8 GPUs (DDP, NCCL), requeued from its checkpoint at the time limit
    python slurm/submit.py --partition gpu --nodes 2 --gpus-per-node 8 --cpus-per-task 10 --time 3-00:00:00 \\
        -- ssl_colorize.pretrain --out runs/pretrain_alexnet --encoder alexnet_lab
    # the same, plus a watcher that probes every new snapshot (see slurm/probe_sweep.toml)
    python slurm/submit.py --gpus-per-node 8 --time 3-00:00:00 --watch-sweep slurm/probe_sweep.toml \\
        -- ssl_colorize.pretrain --out runs/pretrain_alexnet
    # one probe on the local test cluster, waiting for its result
    python slurm/submit.py --time 10 --wait -- benchmarks/linear_probe.py --checkpoint random
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import submitit

from ssl_colorize import distributed
from ssl_colorize.engine.cli import ArgumentParser, UsageError, check_positive, run_cli
from ssl_colorize.launch import cluster
from ssl_colorize.launch.entry import (entry_parser, has_option, job_name, load_entry_point, module_name,
                                       parse_entry_args, parser_option, with_resume)


# ----------------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------------
def restart_count() -> int:
    """How often SLURM restarted this job (scontrol requeue, node failure, submitit's requeue)."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    except ValueError:
        return 0


def finished_run_ids(out_csv: str | os.PathLike) -> set[str]:
    """Run ids that have rows in the results table (an absent table has none)."""
    from ssl_colorize.results import read_rows

    try:
        rows = read_rows(out_csv)
    except ValueError as exc:  # our reader names the file and what is wrong with it
        raise UsageError(f"results table {out_csv}: {exc}") from None
    if rows.empty:
        return set()
    return set(rows["run_id"].astype(str))


def rows_exist(out_csv: str | os.PathLike | None, run_id: str | None) -> bool:
    """Whether the results table already holds rows of this run."""
    if not out_csv or not run_id:
        return False
    return run_id in finished_run_ids(out_csv)


class EntryPointJob:
    """A picklable, checkpointable submitit callable: ``main(get_args_parser().parse_args(argv))``.

    It stores the entry point's module name and its argument list, not the module, so the job
    imports the code in the job. On preemption or at the time limit submitit calls
    :meth:`checkpoint`, which returns the same job with ``--resume``; the entry point's rolling
    checkpoint does the rest.
    """

    def __init__(self, entry_point: str, argv: Sequence[str]) -> None:
        self.entry_point = module_name(entry_point)
        self.argv = [str(a) for a in argv]

    def __repr__(self) -> str:
        return f"EntryPointJob({self.entry_point!r}, {self.argv!r})"

    def __call__(self) -> Any:
        module = load_entry_point(self.entry_point)
        parser = entry_parser(self.entry_point)
        argv = list(self.argv)
        resume = parser_option(parser, "resume")
        if restart_count() > 0 and resume is not None and not has_option(argv, resume):
            # SLURM restarted the original submission (scontrol requeue, node failure): resume.
            argv = with_resume(parser, argv)
        args = parser.parse_args(argv)
        run_id, out_csv = getattr(args, "run_id", None), getattr(args, "out_csv", None)
        if rows_exist(out_csv, run_id):
            print(f"[launch] {run_id}: {out_csv} already holds its rows; not running it again", flush=True)
            return {"run_id": run_id, "skipped": True}
        distributed.export_submitit_layout()
        layout = distributed.init_distributed()
        print(f"[launch] {self.entry_point} rank {layout.rank}/{layout.world_size} "
              f"restart {restart_count()} argv {argv}", flush=True)
        try:
            return module.main(args)
        finally:
            distributed.destroy()

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on the signal SLURM sends before a time limit or a preemption: the job
        is requeued as this same call with ``--resume``."""
        argv = with_resume(entry_parser(self.entry_point), self.argv)
        return submitit.helpers.DelayedSubmission(EntryPointJob(self.entry_point, argv), *args, **kwargs)


def submit(entry_point: str, argv: Sequence[str], opts: cluster.ClusterOptions) -> submitit.Job:
    """Submit one job running ``entry_point`` with ``argv``, refused (UsageError) when the entry
    point's own parser or ``validate`` refuses ``argv``."""
    parse_entry_args(entry_point, argv)
    executor = cluster.make_executor(opts, opts.log_folder or cluster.DEFAULT_LOG_FOLDER, job_name(entry_point))
    return executor.submit(EntryPointJob(entry_point, argv))


def submit_array(jobs: Sequence[EntryPointJob], opts: cluster.ClusterOptions, log_folder: str | os.PathLike,
                 name: str) -> list[submitit.Job]:
    """Submit several jobs as one SLURM job array (at most ``opts.array_parallelism`` at once)."""
    executor = cluster.make_executor(opts, log_folder, name)
    with executor.batch():
        pending = [executor.submit(job) for job in jobs]
    return pending


# ----------------------------------------------------------------------------------------------------
# What became of a job that has left the queue, read through submitit
# ----------------------------------------------------------------------------------------------------
@dataclass
class JobOutcome:
    job_id: str
    status: str  # "completed", "failed", or "unknown" (no result yet, and nothing says it failed)
    reason: str = ""


def _last_line(text: str, prefer: Sequence[str] = ()) -> str:
    """The last non-empty line of ``text``, or the last one holding the first of ``prefer`` found."""
    lines = [line.strip() for line in text.splitlines() if line.strip() and not set(line.strip()) <= {"-"}]
    for marker in prefer:
        preferred = [line for line in lines if marker in line]
        if preferred:
            return preferred[-1][:300]
    return lines[-1][:300] if lines else ""


def _traceback_of(error: Exception) -> str:
    """The job's traceback inside submitit's FailedJobError message (between its dashed lines)."""
    parts = str(error).split("-" * 22)
    return parts[1] if len(parts) >= 3 else str(error)


@contextlib.contextmanager
def _quiet_submitit() -> Iterator[None]:
    # Without SLURM accounting sacct fails, and submitit warns on every state query; the state is
    # then UNKNOWN and the job's stderr says what happened.
    logger = logging.getLogger("submitit")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def job_outcome(job_id: str, log_folder: str | os.PathLike, cluster_name: str = "slurm") -> JobOutcome:
    """How a job that is no longer queued ended (see :func:`outcome_of`); ``log_folder`` is the folder
    it was submitted with (``%j`` and all)."""
    job_class = submitit.SlurmJob if cluster_name == "slurm" else submitit.LocalJob
    return outcome_of(job_class(folder=str(log_folder), job_id=str(job_id)))


def outcome_of(job: submitit.Job) -> JobOutcome:
    """How a job that is no longer queued ended: its result (``job.exception()``), else its state
    (sacct, through submitit) and the last error line of its stderr (``job.stderr()``)."""
    job_id = str(job.job_id)
    if job.paths.result_pickle.exists():
        error = job.exception()  # returns at once: the result is there
        if error is None:
            return JobOutcome(job_id, "completed")
        return JobOutcome(job_id, "failed", _last_line(_traceback_of(error)))
    if not isinstance(job, submitit.SlurmJob):
        return JobOutcome(job_id, "unknown", "no result yet (a local job may still be running)")
    with _quiet_submitit():
        state = job.state
    stderr = job.stderr() or ""
    # slurmstepd says why SLURM ended the job between stars ("*** JOB 7 ... CANCELLED AT ... DUE TO TIME LIMIT ***").
    detail = _last_line(stderr, prefer=("*** JOB", "***", "error")) or f"no error output (see {job.paths.stderr})"
    return JobOutcome(job_id, "failed", f"ended without a result (state {state}): {detail}")


# ----------------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------------
def get_args_parser(add_help: bool = True) -> ArgumentParser:
    parser = ArgumentParser(
        description="Submit an ssl_colorize entry point to SLURM (submitit), checked by its own validation first.",
        usage="%(prog)s [cluster options] -- ENTRYPOINT [ARGS...]", add_help=add_help)
    cluster.add_cluster_args(parser)
    parser.add_argument("--dry-run", action="store_true", help="check the arguments, print the job, submit nothing")
    parser.add_argument("--wait", action="store_true", help="wait for the job to finish and print its result")
    watch = parser.add_argument_group("snapshot watcher (pretraining)")
    watch.add_argument("--watch-sweep", default=None, metavar="SWEEP.toml",
                       help="also submit a watcher job that runs this sweep on every new snapshot of the run")
    watch.add_argument("--snapshot-glob", default="snapshots/*.pth", help="snapshots, relative to the run's --out")
    watch.add_argument("--watch-axis", default="checkpoint", help="the probe's option that receives the snapshot")
    watch.add_argument("--watch-poll-s", type=float, default=60.0, help="seconds between scans")
    parser.add_argument("command", nargs=argparse.REMAINDER, metavar="-- ENTRYPOINT [ARGS...]",
                        help="the entry point and its arguments, after '--'")
    return parser


def split_command(args: argparse.Namespace) -> tuple[str, list[str]]:
    """(entry point, its arguments) from ``-- ENTRYPOINT ARGS...``."""
    command = list(args.command)
    if not command or command[0] != "--":
        shown = " ".join(command[:2]) or "(none)"
        raise UsageError(f"{shown}: put '--' before the entry point: [cluster options] -- ENTRYPOINT [ARGS...]")
    if len(command) < 2:
        raise UsageError("--: no ENTRYPOINT after '--'")
    return command[1], command[2:]


def validate(args: argparse.Namespace) -> None:
    """Every check before submitting: cluster options, log folder, the entry point's own validation,
    the watcher's sweep. Creates nothing."""
    entry_point, entry_argv = split_command(args)
    opts = cluster.cluster_options(args, source="cluster options")
    if not args.dry_run:
        cluster.check_can_submit(opts)
    cluster.check_log_folder(opts.log_folder or cluster.DEFAULT_LOG_FOLDER)
    entry_args = parse_entry_args(entry_point, entry_argv)
    if args.watch_sweep:
        from ssl_colorize.launch import watch

        check_positive("--watch-poll-s", args.watch_poll_s)
        if not getattr(entry_args, "out", None):
            raise UsageError(f"--watch-sweep {args.watch_sweep}: needs the entry point's --out (the run folder to watch)")
        watch.check_watcher(args.watch_sweep, args.watch_axis)


def main(args: argparse.Namespace) -> int:
    entry_point, entry_argv = split_command(args)
    opts = cluster.cluster_options(args, source="cluster options")
    entry_args = entry_parser(entry_point).parse_args(entry_argv)  # validate(args) has checked them
    if args.dry_run:
        print(f"would submit {module_name(entry_point)} {' '.join(entry_argv)}")
        print(f"  parsed: {vars(entry_args)}")
        print(f"  cluster: {dataclasses.asdict(opts)}")
        return 0
    job = submit(entry_point, entry_argv, opts)
    print(f"submitted job {job.job_id}: {module_name(entry_point)}  (logs: {job.paths.stdout.parent})", flush=True)
    if args.watch_sweep:
        from ssl_colorize.launch import watch

        out = str(Path(entry_args.out).absolute())
        watcher = watch.submit_watcher(args.watch_sweep, opts, out, until_job=str(job.job_id),
                                       snapshot_glob=args.snapshot_glob, axis=args.watch_axis,
                                       poll_s=args.watch_poll_s)
        print(f"submitted watcher job {watcher.job_id}: {args.watch_sweep} on each {out}/{args.snapshot_glob}")
    if args.wait:
        if opts.cluster == "slurm":
            cluster.wait_for_jobs([str(job.job_id)])
        else:
            job.wait()
        outcome = outcome_of(job)
        if outcome.status != "completed":
            print(f"job {job.job_id} failed: {outcome.reason}", file=sys.stderr)
            return 1
        print(f"result: {job.results()}")
    return 0


def cli(argv: Sequence[str] | None = None) -> int:
    return run_cli(get_args_parser(), main, argv, validate=validate)


if __name__ == "__main__":
    sys.exit(cli())
