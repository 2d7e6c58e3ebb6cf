"""Submit any entry point to SLURM with the arguments it takes locally.

    python slurm/submit.py [cluster options] -- ENTRYPOINT [ARGS...]

ENTRYPOINT is a module (``ssl_colorize.pretrain``) or a script (``benchmarks/linear_probe.py``);
ARGS are exactly what ``python -m ssl_colorize.pretrain ARGS`` would take. Examples:

    # pretraining on 2 nodes x 8 GPUs (DDP, NCCL), requeued from its checkpoint at the time limit
    python slurm/submit.py --partition gpu --nodes 2 --gpus-per-node 8 --cpus-per-task 10 --time 3-00:00:00 \\
        -- ssl_colorize.pretrain --out runs/pretrain_alexnet --encoder alexnet_lab
    # the same, plus a watcher that probes every new snapshot (see slurm/probe_sweep.toml)
    python slurm/submit.py --gpus-per-node 8 --time 3-00:00:00 --watch-sweep slurm/probe_sweep.toml \\
        -- ssl_colorize.pretrain --out runs/pretrain_alexnet
    # one probe on the local test cluster, waiting for its result
    python slurm/submit.py --time 10 --wait -- benchmarks/linear_probe.py --checkpoint random

See ssl_colorize/launch.py for the contract between the launcher and the entry points.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout, installed or not

from ssl_colorize import launch  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Submit an ssl_colorize entry point to SLURM (submitit).",
        usage="python slurm/submit.py [cluster options] -- ENTRYPOINT [ARGS...]",
    )
    launch.add_cluster_args(parser)
    parser.add_argument("--dry-run", action="store_true", help="check the arguments, print the job, submit nothing")
    parser.add_argument("--wait", action="store_true", help="wait for the job to finish and print its result")
    watch = parser.add_argument_group("snapshot watcher (pretraining)")
    watch.add_argument("--watch-sweep", default=None, metavar="SWEEP.toml",
                       help="also submit a watcher job that runs this sweep on every new snapshot of the run")
    watch.add_argument("--snapshot-glob", default="snapshots/*.pth", help="snapshots, relative to the run's --out")
    watch.add_argument("--watch-axis", default="checkpoint", help="the probe's option that receives the snapshot")
    watch.add_argument("--watch-poll-s", type=float, default=60.0, help="seconds between scans")
    return parser


def split_argv(argv: list[str]) -> tuple[list[str], str, list[str]]:
    if "--" not in argv:
        raise SystemExit("usage: python slurm/submit.py [cluster options] -- ENTRYPOINT [ARGS...] "
                         "(the '--' is required)")
    cut = argv.index("--")
    rest = argv[cut + 1:]
    if not rest:
        raise SystemExit("slurm/submit.py: no ENTRYPOINT after '--'")
    return argv[:cut], rest[0], rest[1:]


def main(argv: list[str] | None = None) -> int:
    own, entry_point, entry_argv = split_argv(sys.argv[1:] if argv is None else argv)
    args = get_args_parser().parse_args(own)
    opts = launch.cluster_options(args)
    entry_args = launch.parse_entry_args(entry_point, entry_argv)  # fail here, not in the queue
    if args.dry_run:
        print(f"would submit {entry_point} {' '.join(entry_argv)}")
        print(f"  parsed: {vars(entry_args)}")
        print(f"  cluster: {dataclasses.asdict(opts)}")
        return 0
    job = launch.submit(entry_point, entry_argv, opts)
    print(f"submitted job {job.job_id}: {entry_point}  (logs: {job.paths.stdout.parent})", flush=True)
    if args.watch_sweep:
        out = getattr(entry_args, "out", None)
        if not out:
            raise SystemExit("--watch-sweep needs the entry point's --out (the run folder to watch)")
        watcher = launch.submit_watcher(args.watch_sweep, opts, out, until_job=str(job.job_id),
                                        snapshot_glob=args.snapshot_glob, axis=args.watch_axis,
                                        poll_s=args.watch_poll_s)
        print(f"submitted watcher job {watcher.job_id}: {args.watch_sweep} on each {out}/{args.snapshot_glob}")
    if args.wait:
        if opts.cluster == "slurm":
            launch.wait_for_jobs([str(job.job_id)])
        print(f"result: {job.results()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
