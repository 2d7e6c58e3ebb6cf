"""``python -m ssl_colorize.results [CSV ...]``: our result rows as paper-style tables (methods x layers),
beside the published numbers (which ship with the package).

With no CSV, the tables are every results table under ``results/`` in the current folder (a CSV with
the row header, or a per-run folder ``NAME.csv.d``); with none there, the published tables alone.
"""

from __future__ import annotations

from pathlib import Path

from ssl_colorize.atomic import atomic_write
from ssl_colorize.engine.cli import (ArgumentParser, check_input_file, check_output_file, fail, run_cli,
                                     usage_error_from)
from ssl_colorize.results.plots import plot_accuracy_vs_layer
from ssl_colorize.results.rows import PARTS_SUFFIX, find_tables, has_rows, parts_dir, read_rows
from ssl_colorize.results.tables import format_table, load_published, paper_tables, select_rows, value_columns

PROG = "python -m ssl_colorize.results"
#: Where the tables are looked for when no CSV is given, relative to the current folder.
DEFAULT_RESULTS_DIR = Path("results")


def get_args_parser(add_help: bool = True) -> ArgumentParser:
    parser = ArgumentParser(
        prog=PROG, add_help=add_help,
        description="Print our results as paper-style tables (methods x layers) beside the published numbers.",
    )
    parser.add_argument("csv", nargs="*", metavar="CSV",
                        help="results tables: a CSV, its per-run folder CSV.d, or a folder of tables "
                             "(default: every table in ./results/)")
    parser.add_argument("--benchmark", default=None, help="e.g. linear_probe, voc_classification")
    parser.add_argument("--dataset", default=None, help="e.g. imagenet, builtin-shapes")
    parser.add_argument("--metric", default=None, help="e.g. top1")
    parser.add_argument("--protocol", default=None,
                        help="only this protocol, ours and published, e.g. zhang, goyal, max, 10crop "
                             "(old names such as linear-avg are read as today's)")
    parser.add_argument("--encoder", default=None, help="only our rows of this encoder, e.g. alexnet_lab")
    parser.add_argument("--published", default=None,
                        help="published rows (default: the package's ssl_colorize/results/published.csv)")
    parser.add_argument("--no-published", action="store_true", help="leave the published rows out")
    parser.add_argument("--no-reference", action="store_true",
                        help="only the datasets we have rows for (no published tables of other datasets)")
    parser.add_argument("--export", default=None, metavar="CSV",
                        help="also write our rows (after the filters) to this one CSV, e.g. for a spreadsheet")
    parser.add_argument("--png", default=None,
                        help="draw accuracy against layer; with several tables, one PNG each (suffixed)")
    return parser


def validate(args) -> None:
    for path in args.csv:
        if not has_rows(path):
            raise fail("CSV", path, f"no such results table (neither the file nor its per-run folder "
                                    f"{parts_dir(path).name})")
    if not args.no_published:
        check_input_file("--published", args.published)
    check_output_file("--png", args.png)
    check_output_file("--export", args.export)
    if args.export and any(Path(p).resolve() == Path(args.export).resolve() for p in args.csv):
        raise fail("--export", args.export, "is one of the tables read; name another file")


def main(args) -> int:
    paths = _table_paths(args.csv) if args.csv else find_tables(DEFAULT_RESULTS_DIR)
    try:  # a file that is not a results table is the user's mistake: one line naming it
        ours = read_rows(paths)
        published = None if args.no_published else load_published(args.published)
    except ValueError as exc:
        raise usage_error_from(exc) from None
    if args.export:
        chosen = select_rows(ours, benchmark=args.benchmark, dataset=args.dataset, metric=args.metric,
                             protocol=args.protocol, encoder=args.encoder)
        with atomic_write(args.export, "w", newline="") as handle:
            chosen.to_csv(handle, index=False)
        print(f"{len(chosen)} rows -> {args.export}")
    tables = paper_tables(ours, published, benchmark=args.benchmark, dataset=args.dataset, metric=args.metric,
                          protocol=args.protocol, encoder=args.encoder, reference=not args.no_reference)
    if not tables:
        print("no rows match" + (f" in {', '.join(map(str, paths))}" if paths else " (no results table found)"))
        return 1
    for title, table in tables:
        print(format_table(table, title) + "\n")
    if args.png:
        drawable = [(t, tb) for t, tb in tables if len([c for c in value_columns(tb) if c != "best"]) > 1]
        if any((tb["kind"] == "ours").any() for _, tb in drawable):  # ours against the published of its protocol
            drawable = [(t, tb) for t, tb in drawable if (tb["kind"] == "ours").any()]
        base = Path(args.png)
        for title, table in drawable:
            suffixed = base.with_name(f"{base.stem}_{_slug_title(title)}{base.suffix or '.png'}")
            path = base if len(drawable) == 1 else suffixed
            plot_accuracy_vs_layer(table, path, title=title)
            print(f"plot -> {path}")
    return 0


def _table_paths(named: list[str]) -> list[Path]:
    """The tables named: a CSV or a per-run folder ``NAME.csv.d`` as is, any other folder for its tables."""
    paths: list[Path] = []
    for path in map(Path, named):
        is_tables_folder = path.is_dir() and not path.name.endswith(PARTS_SUFFIX)
        paths += find_tables(path) if is_tables_folder else [path]
    return paths


def _slug_title(title: str) -> str:
    return "_".join("".join(ch if ch.isalnum() or ch in "-." else "_" for ch in part.strip()).strip("_")
                    for part in title.replace("(published)", "published").split("|"))


def cli(argv: list[str] | None = None) -> int:
    return run_cli(get_args_parser(), main, argv, validate=validate)


if __name__ == "__main__":
    raise SystemExit(cli())
