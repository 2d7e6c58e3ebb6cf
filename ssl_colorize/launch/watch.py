"""The snapshot watcher: run a sweep (typically the linear probe) on each pretraining snapshot as it
appears, as its own long-lived one-CPU job.

Pretraining keeps snapshots in its run folder, written atomically, with names that match a glob
(default ``snapshots/*.pth``) and sort in training order. The watcher fills the sweep's ``axis``
option (default ``--checkpoint``) with each new snapshot and submits that sweep as a job array.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import submitit

from ssl_colorize.engine.cli import UsageError
from ssl_colorize.launch import cluster
from ssl_colorize.launch.entry import entry_parser, parser_option
from ssl_colorize.launch.sweep import Sweep, load_sweep, plan_sweep, submit_sweep, expand_sweep


def check_watcher(sweep_path: str | os.PathLike, axis: str) -> Sweep:
    """The sweep file reads, and its entry point has the option that receives the snapshots."""
    sweep = load_sweep(sweep_path)
    if parser_option(entry_parser(sweep.entry_point), axis) is None:
        raise UsageError(f"{sweep_path}: entry point {sweep.entry_point} has no --{axis} option to receive "
                         f"snapshots (set the axis option)")
    return sweep


def snapshot_sweep(sweep: Sweep, snapshot: Path, axis: str) -> Sweep:
    """The sweep with its ``axis`` (the checkpoint option) fixed to one snapshot."""
    args = {k: v for k, v in sweep.args.items() if k != axis}
    grid = {axis: [str(snapshot)], **{k: v for k, v in sweep.grid.items() if k != axis}}
    return Sweep(sweep.path, sweep.name, sweep.entry_point, sweep.out_csv, sweep.run_root, args, grid, sweep.slurm)


def watch_snapshots(sweep: Sweep, opts: cluster.ClusterOptions, run_dir: str | os.PathLike,
                    snapshot_glob: str = "snapshots/*.pth", axis: str = "checkpoint", poll_s: float = 60.0,
                    until_job: str | None = None, until_file: str | None = None,
                    max_hours: float | None = None) -> list[str]:
    """Poll ``run_dir`` for snapshots and submit the sweep (as a job array) for each new one.

    Stops after a last scan once the pretraining job ``until_job`` has left the queue, once
    ``run_dir/until_file`` exists, or after ``max_hours``. Idempotent: a snapshot whose sweep is
    finished or queued is not submitted again, so the watcher can be restarted (or requeued) freely.
    A snapshot whose points the entry point refuses is reported and skipped. Returns the job ids it
    submitted.
    """
    run_dir = Path(run_dir)
    check_watcher(sweep.path, axis)
    seen: set[Path] = set()
    submitted: list[str] = []
    deadline = None if max_hours is None else time.monotonic() + max_hours * 3600
    while True:
        stopping = (
            (until_job is not None and not cluster.active_job_ids([until_job]))
            or (until_file is not None and (run_dir / until_file).exists())
            or (deadline is not None and time.monotonic() > deadline)
        )
        for snapshot in sorted(run_dir.glob(snapshot_glob)):
            if snapshot in seen or not snapshot.is_file():
                continue
            seen.add(snapshot)
            one = snapshot_sweep(sweep, snapshot.resolve(), axis)
            try:
                plan = plan_sweep(one, expand_sweep(one))
            except UsageError as exc:
                print(f"[watch] {snapshot}: not submitted: {exc}", flush=True)
                continue
            with cluster.outside_job_environment():
                jobs = submit_sweep(one, opts, plan.todo)
            submitted += [str(j.job_id) for j in jobs]
            print(f"[watch] {snapshot}: {len(plan.todo)} submitted, {len(plan.done)} finished, "
                  f"{len(plan.active)} queued, {len(plan.failed)} failed", flush=True)
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
        return watch_snapshots(sweep, cluster.ClusterOptions(**self.opts), self.run_dir, self.snapshot_glob,
                               self.axis, self.poll_s, self.until_job, self.until_file)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def submit_watcher(sweep_path: str | os.PathLike, probe_opts: cluster.ClusterOptions, run_dir: str | os.PathLike,
                   until_job: str | None, snapshot_glob: str = "snapshots/*.pth", axis: str = "checkpoint",
                   poll_s: float = 60.0, until_file: str | None = None,
                   watcher_time: int | str | None = None) -> submitit.Job:
    """Submit the watcher as its own one-CPU job; the probe jobs it submits use ``probe_opts``."""
    sweep = check_watcher(sweep_path, axis)  # now rather than in the queue
    opts = asdict(probe_opts)
    watcher_opts = cluster.ClusterOptions(**{
        **opts, "nodes": 1, "gpus_per_node": 0, "tasks_per_node": 1, "cpus_per_task": 1, "mem_gb": None,
        "time": watcher_time if watcher_time is not None else probe_opts.time,
        "constraint": None, "log_folder": str(sweep.run_root / "slurm_logs" / "watcher_%j"),
    })
    executor = cluster.make_executor(watcher_opts, watcher_opts.log_folder, f"watch-{sweep.name}")
    job = WatcherJob(str(Path(sweep_path).absolute()), opts, str(Path(run_dir).absolute()), snapshot_glob, axis,
                     poll_s, until_job, until_file, os.getcwd())
    return executor.submit(job)
