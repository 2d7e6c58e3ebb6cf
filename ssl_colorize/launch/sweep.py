"""Sweeps: a TOML file of fixed [args] and a [grid], run as one SLURM job array into one results table.

    python -m ssl_colorize.launch sweep slurm/probe_sweep.toml --dry-run   # done / queued / failed / to submit
    python slurm/sweep.py slurm/probe_sweep.toml                           # (the same command)
    python slurm/sweep.py slurm/probe_sweep.toml --wait      # submit what has no rows yet, wait, print the table
    python slurm/sweep.py slurm/probe_sweep.toml --collect --table results/probe.csv
    python slurm/sweep.py slurm/probe_sweep.toml --watch runs/pretrain_alexnet --until-job 1234

Every grid point is checked by the entry point's own parser and ``validate`` before anything is
submitted; refused points are listed with their reasons and nothing is submitted. A grid point is
finished when the results table (``out_csv``) holds rows with its run id; a point whose job is still
queued or running is not submitted twice; a point whose job failed is reported with the reason read
from the job (its exception, or its state and stderr) and submitted again only with ``--retry-failed``.
The file format is described in slurm/probe_sweep.toml.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import itertools
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import submitit

from ssl_colorize.engine.cli import (ArgumentParser, UsageError, check_output_file, check_positive, run_cli)
from ssl_colorize.launch import cluster
from ssl_colorize.launch.entry import (entry_parser, job_name, module_name, options_to_argv, parser_option,
                                       refusal, with_option, with_resume)
from ssl_colorize.launch.submit import EntryPointJob, finished_run_ids, job_outcome, submit_array

try:  # sweep files are TOML: the standard library reads it from Python 3.11, tomli before
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

# Options the launcher manages; a sweep may not set them itself.
MANAGED_OPTIONS = ("out", "resume", "run_id", "out_csv", "overwrite")


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
    """Read and check a sweep TOML file (UsageError naming the file); relative paths in it are
    relative to the working directory."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError):
        raise UsageError(f"{path}: no such sweep file") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: a folder, not a sweep file") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML ({exc})") from None
    known = {"name", "entry_point", "out_csv", "run_root", "args", "grid", "slurm"}
    unknown = set(data) - known
    if unknown:
        raise UsageError(f"{path}: unknown keys {sorted(unknown)}; a sweep file has {sorted(known)}")
    for key in ("entry_point", "out_csv"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise UsageError(f"{path}: '{key}' (a string) is required")
    name = data.get("name", path.stem)
    args, grid, slurm = data.get("args", {}), data.get("grid", {}), data.get("slurm", {})
    for table, value in (("args", args), ("grid", grid), ("slurm", slurm)):
        if not isinstance(value, dict):
            raise UsageError(f"{path}: [{table}] must be a table")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise UsageError(f"{path}: [grid] {key} must be a non-empty list of values")
    for key in set(args) | set(grid):
        if key.replace("-", "_") in MANAGED_OPTIONS:
            raise UsageError(f"{path}: {key!r} is set by the sweep itself (out_csv, run_root); remove it")
    overlap = set(args) & set(grid)
    if overlap:
        raise UsageError(f"{path}: {sorted(overlap)} appear in both [args] and [grid]")
    cluster.cluster_options(base=slurm, source=f"{path} [slurm]")  # checks the table
    run_root = Path(data.get("run_root", f"runs/{name}"))  # under the working directory
    return Sweep(path=path, name=name, entry_point=data["entry_point"], out_csv=Path(data["out_csv"]).absolute(),
                 run_root=run_root.absolute(), args=dict(args), grid=dict(grid), slurm=dict(slurm))


def run_id_for(entry_point: str, params: dict[str, Any]) -> str:
    """A stable id for (entry point, arguments): the same grid point always gets the same id,
    whatever the order of keys in the sweep file and however the entry point is spelt."""
    canonical = json.dumps({"entry_point": module_name(entry_point), "args": params}, sort_keys=True, default=str)
    digest = hashlib.sha1(canonical.encode()).hexdigest()[:12]
    return f"{job_name(entry_point)}-{digest}"


def expand_sweep(sweep: Sweep, validate: bool = True) -> list[SweepPoint]:
    """Every combination of the grid (in file order, last key fastest) as a SweepPoint.

    With ``validate``, each point's arguments go through the entry point's parser and ``validate``;
    the points it refuses are listed, each with its reason, in one UsageError (nothing is submitted).
    """
    parser = entry_parser(sweep.entry_point)
    for key in ("run_id", "out_csv"):
        if parser_option(parser, key) is None:
            raise UsageError(f"{sweep.path}: entry point {sweep.entry_point} has no --{key.replace('_', '-')} "
                             f"option; a sweep needs it to find which jobs have finished")
    keys = list(sweep.grid)
    points, refused = [], []
    for index, combo in enumerate(itertools.product(*(sweep.grid[k] for k in keys))):
        params = dict(zip(keys, combo))
        all_args = {**sweep.args, **params}
        run_id = run_id_for(sweep.entry_point, all_args)
        out_dir = sweep.run_root / run_id
        argv = options_to_argv(parser, all_args, f"{sweep.path} point {json.dumps(params)}")
        argv = with_option(parser, argv, "run_id", run_id)
        argv = with_option(parser, argv, "out_csv", str(sweep.out_csv))
        argv = with_option(parser, argv, "out", str(out_dir))
        argv = with_resume(parser, argv)  # a job run again continues its run folder
        why = refusal(sweep.entry_point, argv) if validate else None
        if why is not None:
            refused.append(f"  point {json.dumps(params)}: {why}")
        points.append(SweepPoint(index, params, run_id, out_dir, argv))
    if refused:
        raise UsageError(f"{sweep.path}: {module_name(sweep.entry_point)} refuses {len(refused)} of {len(points)} "
                         f"grid points; nothing submitted:\n" + "\n".join(refused))
    return points


# ----------------------------------------------------------------------------------------------------
# The manifest (RUN_ROOT/submitted.jsonl): which job ran each point, and where its logs are
# ----------------------------------------------------------------------------------------------------
def manifest_path(sweep: Sweep) -> Path:
    return sweep.run_root / "submitted.jsonl"


def read_manifest(sweep: Sweep) -> dict[str, dict[str, str]]:
    """run id -> the entry of its latest submission (``job_id``, ``log_folder``, ``cluster``)."""
    path = manifest_path(sweep)
    latest: dict[str, dict[str, str]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill while it was written (or a blank one)
            entry.setdefault("log_folder", str(sweep.run_root / "slurm_logs" / "%j"))
            entry.setdefault("cluster", "slurm")
            latest[entry["run_id"]] = entry
    return latest


def _append_manifest(sweep: Sweep, entries: list[dict[str, str]]) -> None:
    path = manifest_path(sweep)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.write("".join(json.dumps(e) + "\n" for e in entries))
        handle.flush()
        os.fsync(handle.fileno())
        fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass
class SweepPlan:
    """Finished points (rows exist), queued or running ones, failed ones (with the reason read from
    their job) and those to submit."""

    done: list[SweepPoint] = field(default_factory=list)
    active: list[tuple[SweepPoint, str]] = field(default_factory=list)
    failed: list[tuple[SweepPoint, str, str]] = field(default_factory=list)  # (point, job id, reason)
    todo: list[SweepPoint] = field(default_factory=list)


def plan_sweep(sweep: Sweep, points: list[SweepPoint] | None = None, check_queue: bool = True,
               retry_failed: bool = False) -> SweepPlan:
    """Sort the points. A submitted point that has no rows and is no longer queued is failed when its
    job says so (see :func:`ssl_colorize.launch.submit.outcome_of`); it goes to ``todo`` only with
    ``retry_failed``. One whose job completed without leaving rows (the table lost them) is submitted again."""
    points = expand_sweep(sweep) if points is None else points
    finished = finished_run_ids(sweep.out_csv)
    manifest = read_manifest(sweep)
    slurm_ids = [e["job_id"] for e in manifest.values() if e["cluster"] == "slurm"]
    active_ids = cluster.active_job_ids(slurm_ids) if check_queue and slurm_ids else set()
    plan = SweepPlan()
    for point in points:
        entry = manifest.get(point.run_id)
        if point.run_id in finished:
            plan.done.append(point)
        elif entry is None:
            plan.todo.append(point)
        elif entry["job_id"] in active_ids:
            plan.active.append((point, entry["job_id"]))
        else:
            outcome = job_outcome(entry["job_id"], entry["log_folder"], entry["cluster"])
            if outcome.status == "failed" and not retry_failed:
                plan.failed.append((point, entry["job_id"], outcome.reason))
            else:
                plan.todo.append(point)
    return plan


def submit_sweep(sweep: Sweep, opts: cluster.ClusterOptions, points: Sequence[SweepPoint]) -> list[submitit.Job]:
    """Submit ``points`` as one job array and record their job ids in RUN_ROOT/submitted.jsonl."""
    if not points:
        return []
    log_folder = cluster.log_folder_path(opts.log_folder or sweep.run_root / "slurm_logs" / "%j")
    jobs = submit_array([EntryPointJob(sweep.entry_point, p.argv) for p in points], opts, log_folder, sweep.name)
    _append_manifest(sweep, [
        {"run_id": p.run_id, "job_id": str(j.job_id), "log_folder": log_folder, "cluster": opts.cluster,
         "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        for p, j in zip(points, jobs)
    ])
    return jobs


def describe_plan(plan: SweepPlan) -> str:
    lines = [f"{len(plan.done)} finished, {len(plan.active)} queued or running, {len(plan.failed)} failed, "
             f"{len(plan.todo)} to submit"]
    lines += [f"  done     {p.run_id}  {json.dumps(p.params)}" for p in plan.done]
    lines += [f"  active   {p.run_id}  {json.dumps(p.params)}  job {job_id}" for p, job_id in plan.active]
    lines += [f"  failed   {p.run_id}  {json.dumps(p.params)}  job {job_id}: {reason}"
              for p, job_id, reason in plan.failed]
    lines += [f"  submit   {p.run_id}  {json.dumps(p.params)}" for p in plan.todo]
    if plan.failed:
        lines.append("failed points are not submitted again until their reason is fixed; then add --retry-failed")
    return "\n".join(lines)


def collect_sweep(sweep: Sweep, points: list[SweepPoint] | None = None):
    """The sweep's result rows, one per measured number, with a column per grid key (a DataFrame)."""
    from ssl_colorize.results import read_rows

    points = expand_sweep(sweep, validate=False) if points is None else points
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
# The command line
# ----------------------------------------------------------------------------------------------------
def get_args_parser(add_help: bool = True) -> ArgumentParser:
    parser = ArgumentParser(description="Submit a sweep (TOML) as one SLURM job array.", add_help=add_help)
    parser.add_argument("sweep", help="sweep file (TOML), e.g. slurm/probe_sweep.toml")
    parser.add_argument("--dry-run", action="store_true", help="list the jobs and their status; submit nothing")
    parser.add_argument("--wait", action="store_true", help="wait for the submitted jobs, then print the table")
    parser.add_argument("--retry-failed", action="store_true",
                        help="submit the points whose job failed again (after fixing the reason shown)")
    parser.add_argument("--collect", action="store_true", help="print the sweep's results table; submit nothing")
    parser.add_argument("--table", default=None, help="with --collect/--wait: also write the rows to this CSV")
    watch = parser.add_argument_group("watcher: run the sweep on each new snapshot of a pretraining run")
    watch.add_argument("--watch", default=None, metavar="RUN_DIR", help="the pretraining run folder to watch")
    watch.add_argument("--snapshot-glob", default="snapshots/*.pth", help="snapshots, relative to RUN_DIR")
    watch.add_argument("--axis", default="checkpoint", help="the option that receives the snapshot path")
    watch.add_argument("--poll-s", type=float, default=60.0, help="seconds between scans")
    watch.add_argument("--until-job", default=None, help="stop once this (pretraining) job has left the queue")
    watch.add_argument("--until-file", default=None, help="stop once RUN_DIR/UNTIL_FILE exists")
    cluster.add_cluster_args(parser)
    return parser


def validate(args: argparse.Namespace) -> None:
    """The sweep file, the cluster options, every output, and every grid point through the entry
    point's own validation. Creates nothing."""
    sweep = load_sweep(args.sweep)
    opts = cluster.cluster_options(args, base=sweep.slurm, source=f"{args.sweep} [slurm] + command line")
    check_output_file("--table", args.table)
    if args.collect:
        return
    check_output_file(f"{args.sweep}: out_csv", sweep.out_csv)
    cluster.check_log_folder(opts.log_folder or sweep.run_root / "slurm_logs" / "%j")
    if not args.dry_run:
        cluster.check_can_submit(opts)
    if args.watch:
        from ssl_colorize.launch import watch

        check_positive("--poll-s", args.poll_s)
        watch.check_watcher(args.sweep, args.axis)
        return
    expand_sweep(sweep)


def print_table(sweep: Sweep, table: str | None) -> None:
    rows = collect_sweep(sweep)
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


def main(args: argparse.Namespace) -> int:
    sweep = load_sweep(args.sweep)
    opts = cluster.cluster_options(args, base=sweep.slurm, source=f"{args.sweep} [slurm] + command line")
    if args.collect:
        print_table(sweep, args.table)
        return 0
    if args.watch:
        from ssl_colorize.launch import watch

        submitted = watch.watch_snapshots(sweep, opts, args.watch, args.snapshot_glob, args.axis, args.poll_s,
                                          args.until_job, args.until_file)
        print(f"watcher done: submitted {len(submitted)} jobs")
        return 0
    points = expand_sweep(sweep, validate=False)  # validate(args) has checked every point
    is_slurm = opts.cluster == "slurm"
    plan = plan_sweep(sweep, points, check_queue=is_slurm, retry_failed=args.retry_failed)
    print(f"sweep {sweep.name}: {module_name(sweep.entry_point)}, {len(points)} points")
    print(describe_plan(plan), flush=True)
    if args.dry_run:
        return 0
    if not plan.todo:
        print("nothing to submit")
    else:
        jobs = submit_sweep(sweep, opts, plan.todo)
        array_id = str(jobs[0].job_id).split("_")[0]
        print(f"submitted job array {array_id} with {len(jobs)} tasks (at most {opts.array_parallelism} at once)",
              flush=True)
        if args.wait:
            if is_slurm:
                cluster.wait_for_jobs([str(j.job_id) for j in jobs])
            else:
                for job in jobs:
                    job.wait()
    if args.wait:
        print_table(sweep, args.table)
        after = plan_sweep(sweep, points, check_queue=is_slurm)
        for point, job_id, reason in after.failed:
            print(f"failed: {point.run_id} {json.dumps(point.params)} job {job_id}: {reason}", file=sys.stderr)
        return 1 if after.failed else 0
    return 0


def cli(argv: Sequence[str] | None = None) -> int:
    return run_cli(get_args_parser(), main, argv, validate=validate)


if __name__ == "__main__":
    sys.exit(cli())
