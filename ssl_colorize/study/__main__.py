"""``python -m ssl_colorize.study {build,serve,report}``: the real-vs-fake study, end to end.

    python -m ssl_colorize.study build --checkpoint runs/rebal/checkpoint.pth runs/l2/checkpoint.pth \
        --arm-name rebalanced l2 --photos /data/val_photos --out studies/s1
    python -m ssl_colorize.study serve studies/s1 --port 8000      # open http://127.0.0.1:8000/
    python -m ssl_colorize.study report studies/s1
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
from pathlib import Path

from ssl_colorize.study.plan import Protocol
from ssl_colorize.targets import DEFAULT_TEMPERATURE

REPO_ROOT = Path(__file__).resolve().parents[2]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    build.add_argument("--size", type=int, default=defaults.size, help="square image size (default 256, the paper's)")
    build.add_argument("--practice", type=int, default=defaults.practice, help="practice pairs with feedback (10)")
    build.add_argument("--test", type=int, default=defaults.test, help="test pairs without feedback (40)")
    build.add_argument("--attention-rate", type=float, default=defaults.attention_rate,
                       help="share of attention checks per block (0.1)")
    build.add_argument("--display-ms", type=int, default=defaults.display_ms, help="display time of a pair (1000)")
    build.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="annealed-mean T (0.38)")
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
                        help="bootstrap resampling unit (default: participant)")
    report.add_argument("--bootstrap", type=int, default=10000, help="bootstrap resamples")
    report.add_argument("--seed", type=int, default=0)
    report.add_argument("--include-incomplete", action="store_true", help="count unfinished sessions too")
    report.add_argument("--min-attention", type=float, default=0.0,
                        help="drop sessions whose attention-check accuracy is below this fraction (default 0)")
    report.add_argument("--out-csv", default=str(REPO_ROOT / "results" / "colorization_quality.csv"),
                        help="results table to append rows to ('none' to skip)")
    report.add_argument("--run-id", default=None)
    return parser


def main(args: argparse.Namespace) -> object:
    if args.command == "build":
        from ssl_colorize.study.build import build_study

        protocol = Protocol(args.practice, args.test, args.attention_rate, args.display_ms, args.size)
        return build_study(args.checkpoint, args.out, photos=args.photos, arm_names=args.arm_name,
                           protocol=protocol, temperature=args.temperature, seed=args.seed,
                           device=args.device, limit=args.limit)
    if args.command == "serve":
        from ssl_colorize.study.server import serve

        return serve(args.study_dir, port=args.port, display_ms=args.display_ms, quiet=args.quiet)
    from ssl_colorize.results import append_rows, make_row
    from ssl_colorize.study.plan import load_study
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
    args = get_args_parser().parse_args(argv)
    try:
        return main(args)
    except ValueError as exc:
        print(f"ssl_colorize.study {args.command}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc


if __name__ == "__main__":
    cli()
