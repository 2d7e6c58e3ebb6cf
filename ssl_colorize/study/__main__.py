"""``python -m ssl_colorize.study {build,serve,report}``: the real-vs-fake study, end to end.

    python -m ssl_colorize.study build --checkpoint runs/rebal/checkpoint.pth runs/l2/checkpoint.pth \
        --arm-name rebalanced l2 --photos /data/val_photos --out studies/s1
    python -m ssl_colorize.study serve studies/s1 --port 8000      # open http://127.0.0.1:8000/
    python -m ssl_colorize.study report studies/s1
"""

from __future__ import annotations

import argparse
import datetime as _dt
from pathlib import Path

from ssl_colorize.engine.cli import (
    ArgumentParser, UsageError, check_device, check_input_dir, check_number, check_output_dir, check_output_file, check_positive,
    fail, run_cli,
)
from ssl_colorize.study.plan import DATABASE_FILE, STUDY_FILE, Protocol, load_study
from ssl_colorize.targets import DEFAULT_TEMPERATURE


def get_args_parser() -> ArgumentParser:
    parser = ArgumentParser(
        "python -m ssl_colorize.study",
        description="Real-vs-fake colorization study (paper section 3.1, 'perceptual realism').",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    defaults = Protocol()

    build = sub.add_parser("build", help="render a study folder from checkpoints (one per arm) and photographs")
    build.add_argument("--checkpoint", nargs="+", action="extend", required=True,
                       help="one checkpoint (file or run folder, or random:ENCODER) per arm")
    build.add_argument("--arm-name", nargs="+", action="extend", default=None, help="a name per arm")
    build.add_argument("--photos", default=None, help="folder of colour photographs (default: the built-in photographs)")
    build.add_argument("--out", required=True, help="the new study folder")
    build.add_argument("--size", type=int, default=defaults.size, help="square image size (the paper's: 256)")
    build.add_argument("--practice", type=int, default=defaults.practice, help="practice pairs with feedback")
    build.add_argument("--test", type=int, default=defaults.test, help="test pairs without feedback")
    build.add_argument("--attention-rate", type=float, default=defaults.attention_rate,
                       help="share of attention checks per block")
    build.add_argument("--display-ms", type=int, default=defaults.display_ms, help="display time of a pair in milliseconds")
    build.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="annealed-mean T")
    build.add_argument("--limit", type=int, default=None, help="use at most this many photographs")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--device", default=None)

    serve = sub.add_parser("serve", help="serve a study folder on http://127.0.0.1:PORT/")
    serve.add_argument("study_dir")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--display-ms", type=int, default=None,
                       help="override the study's display time (pilots and tests only; the paper's is 1000)")
    serve.add_argument("--quiet", action="store_true", help="do not log requests")

    report = sub.add_parser("report", help="per-arm fooled rate, bootstrap SE, attention checks; write rows")
    report.add_argument("study_dir")
    report.add_argument("--unit", choices=("participant", "trial"), default="participant",
                        help="bootstrap resampling unit")
    report.add_argument("--bootstrap", type=int, default=10000, help="bootstrap resamples")
    report.add_argument("--seed", type=int, default=0)
    report.add_argument("--include-incomplete", action="store_true", help="count unfinished sessions too")
    report.add_argument("--min-attention", type=float, default=0.0,
                        help="drop sessions whose attention-check accuracy is below this fraction")
    report.add_argument("--out-csv", default="results/colorization_quality.csv",
                        help="results table to append rows to, under the current folder by default ('none' to skip)")
    report.add_argument("--run-id", default=None)
    return parser


def _protocol(args: argparse.Namespace) -> Protocol:
    check_number("--practice", args.practice, minimum=0)
    check_number("--test", args.test, minimum=1)
    if not 0 <= args.attention_rate < 1:
        raise fail("--attention-rate", args.attention_rate, "must be in [0, 1): a share of each block")
    check_number("--display-ms", args.display_ms, minimum=1)
    check_number("--size", args.size, minimum=8)
    try:
        return Protocol(args.practice, args.test, args.attention_rate, args.display_ms, args.size).validate()
    except ValueError as exc:
        raise UsageError(f"build: {exc}") from exc


def _study(study_dir: str) -> dict:
    try:
        return load_study(study_dir)
    except ValueError as exc:  # names the folder and what is missing
        raise UsageError(str(exc)) from exc


def validate(args: argparse.Namespace) -> None:
    """Every check that needs no model and no image; creates nothing."""
    if args.command == "build":
        from ssl_colorize.checkpoint_ref import parse_checkpoint_ref

        _protocol(args)
        for spec in args.checkpoint:
            if parse_checkpoint_ref(spec).is_random and ":" not in spec:
                raise fail("--checkpoint", spec, "name the encoder: random:ENCODER")
        if args.arm_name is not None and len(args.arm_name) != len(args.checkpoint):
            raise fail("--arm-name", " ".join(args.arm_name),
                       f"{len(args.arm_name)} names for {len(args.checkpoint)} checkpoints (one per arm)")
        check_input_dir("--photos", args.photos)
        check_positive("--temperature", args.temperature)
        check_number("--limit", args.limit, minimum=2)
        check_device("--device", args.device)
        check_output_dir("--out", args.out)
        if any((Path(args.out) / name).exists() for name in (STUDY_FILE, DATABASE_FILE)):
            raise fail("--out", args.out, "already holds a study; choose a new folder (answers are never overwritten)")
    elif args.command == "serve":
        check_number("--port", args.port, minimum=0, maximum=65535)
        check_positive("--display-ms", args.display_ms)
        _study(args.study_dir)
    else:
        check_number("--bootstrap", args.bootstrap, minimum=2)
        check_number("--min-attention", args.min_attention, minimum=0.0, maximum=1.0)
        if args.out_csv.lower() != "none":
            check_output_file("--out-csv", args.out_csv)
        _study(args.study_dir)
        if not (Path(args.study_dir) / DATABASE_FILE).is_file():
            raise fail("study_dir", args.study_dir, f"no answers yet ({DATABASE_FILE} is missing): serve the study first")


def main(args: argparse.Namespace) -> object:
    try:
        return _run(args)
    except ValueError as exc:  # our readers name the file or the setting that is wrong
        raise UsageError(f"{args.command}: {exc}") from exc


def _run(args: argparse.Namespace) -> object:
    if args.command == "build":
        from ssl_colorize.study.build import build_study

        protocol = _protocol(args)
        return build_study(args.checkpoint, args.out, photos=args.photos, arm_names=args.arm_name,
                           protocol=protocol, temperature=args.temperature, seed=args.seed,
                           device=args.device, limit=args.limit)
    if args.command == "serve":
        from ssl_colorize.study.server import serve

        return serve(args.study_dir, port=args.port, display_ms=args.display_ms, quiet=args.quiet)
    from ssl_colorize.results import append_rows, make_row
    from ssl_colorize.study.report import format_report, result_rows, summarize

    reports = summarize(args.study_dir, unit=args.unit, n_boot=args.bootstrap, seed=args.seed,
                        include_incomplete=args.include_incomplete, min_attention=args.min_attention)
    print(format_report(reports, args.unit))
    if args.out_csv.lower() != "none":
        run_id = args.run_id or "study-" + _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        rows = result_rows(reports, load_study(args.study_dir), args.study_dir, run_id, args.unit,
                           args.bootstrap, args.seed, args.min_attention)
        if rows:
            append_rows(args.out_csv, [make_row(**r) for r in rows])
        print(f"{len(rows)} rows -> {args.out_csv}")
    return reports


def cli(argv=None) -> object:
    return run_cli(get_args_parser(), main, argv, validate=validate)


if __name__ == "__main__":
    cli()
