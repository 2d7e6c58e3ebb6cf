"""Run a sweep file as one SLURM job array; finish a partly failed sweep by running it again.

    python slurm/sweep.py slurm/probe_sweep.toml --dry-run    # list the jobs: done / queued / to submit
    python slurm/sweep.py slurm/probe_sweep.toml              # submit what has no result rows yet
    python slurm/sweep.py slurm/probe_sweep.toml --wait       # ... and wait, then print the table
    python slurm/sweep.py slurm/probe_sweep.toml --collect --table results/probe.csv
    python slurm/sweep.py slurm/probe_sweep.toml --watch runs/pretrain_alexnet --until-job 1234

A grid point is finished when the sweep's results CSV (``out_csv``) holds rows with its run id;
points whose job is still queued or running are not submitted twice. Cluster options on the command
line override the file's [slurm] table. The file format is described in slurm/probe_sweep.toml.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout, installed or not

from ssl_colorize import launch  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Submit a sweep (TOML) as one SLURM job array.")
    parser.add_argument("sweep", help="sweep file (TOML), e.g. slurm/probe_sweep.toml")
    parser.add_argument("--dry-run", action="store_true", help="list the jobs and their status; submit nothing")
    parser.add_argument("--wait", action="store_true", help="wait for the submitted jobs, then print the table")
    parser.add_argument("--collect", action="store_true", help="print the sweep's results table; submit nothing")
    parser.add_argument("--table", default=None, help="with --collect/--wait: also write the rows to this CSV")
    watch = parser.add_argument_group("watcher: run the sweep on each new snapshot of a pretraining run")
    watch.add_argument("--watch", default=None, metavar="RUN_DIR", help="the pretraining run folder to watch")
    watch.add_argument("--snapshot-glob", default="snapshots/*.pth", help="snapshots, relative to RUN_DIR")
    watch.add_argument("--axis", default="checkpoint", help="the option that receives the snapshot path")
    watch.add_argument("--poll-s", type=float, default=60.0, help="seconds between scans")
    watch.add_argument("--until-job", default=None, help="stop once this (pretraining) job has left the queue")
    watch.add_argument("--until-file", default=None, help="stop once RUN_DIR/UNTIL_FILE exists")
    launch.add_cluster_args(parser)
    return parser


def print_table(sweep: launch.Sweep, table: str | None) -> None:
    rows = launch.collect_sweep(sweep)
    if rows.empty:
        print(f"no rows for this sweep in {sweep.out_csv} yet")
        return
    grid_cols = [c for c in rows.columns if c.startswith("grid.")]
    view = rows.pivot_table(index=grid_cols + ["tap"], columns="metric", values="value", aggfunc="mean")
    print(view.to_string())
    print(f"{rows['run_id'].nunique()} runs, {len(rows)} rows from {sweep.out_csv}")
    if table:
        Path(table).parent.mkdir(parents=True, exist_ok=True)
        rows.to_csv(table, index=False)
        print(f"wrote {table}")


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    sweep = launch.load_sweep(args.sweep)
    opts = launch.cluster_options(args, base=sweep.slurm, source=f"{args.sweep} [slurm] + command line")
    if args.collect:
        print_table(sweep, args.table)
        return 0
    if args.watch:
        submitted = launch.watch_snapshots(sweep, opts, args.watch, args.snapshot_glob, args.axis, args.poll_s,
                                           args.until_job, args.until_file)
        print(f"watcher done: submitted {len(submitted)} jobs")
        return 0
    plan = launch.plan_sweep(sweep, check_queue=opts.cluster == "slurm")
    print(f"sweep {sweep.name}: {sweep.entry_point}, {len(plan.done) + len(plan.active) + len(plan.todo)} points")
    print(launch.describe_plan(plan))
    if args.dry_run:
        return 0
    if not plan.todo:
        print("nothing to submit")
    else:
        jobs = launch.submit_sweep(sweep, opts, plan.todo)
        array_id = str(jobs[0].job_id).split("_")[0]
        print(f"submitted job array {array_id} with {len(jobs)} tasks (at most {opts.array_parallelism} at once)",
              flush=True)
        if args.wait:
            if opts.cluster == "slurm":
                launch.wait_for_jobs([str(j.job_id) for j in jobs])
            else:
                for job in jobs:
                    job.wait()
    if args.wait:
        print_table(sweep, args.table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
