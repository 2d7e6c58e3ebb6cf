"""Tidy result rows: one row per measured number (DESIGN.md, "Contracts").

Rows from many runs, and from concurrent SLURM jobs, merge into one CSV: :func:`append_rows` takes an
exclusive lock on a side file, rewrites the whole table to a temporary file and renames it into place,
so a reader never sees a half-written file and no writer loses another's rows.
"""

from __future__ import annotations

import csv
import datetime as _dt
import fcntl
import io
import json
import os
import subprocess
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from ssl_colorize.atomic import atomic_write

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class ResultRow:
    run_id: str
    benchmark: str
    checkpoint: str
    encoder: str
    tap: str
    dataset: str
    split: str
    protocol: str
    metric: str
    value: float
    seed: int = 0
    hparams: str = "{}"
    code_version: str = ""
    time: str = ""


COLUMNS = [f.name for f in fields(ResultRow)]
#: How read_rows parses each column: text columns stay text even when a value looks like a number (a
#: commit hash of only decimal digits, a run id "7"), seeds are nullable integers, values floats.
_READ_DTYPES = {f.name: {"str": str, "int": "Int64", "float": float}[f.type] for f in fields(ResultRow)}


@lru_cache(maxsize=1)
def code_version() -> str:
    """The git commit of this checkout (with '+dirty' when it has uncommitted changes), else the package version."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, capture_output=True, text=True
        ).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return "ssl_colorize-" + version("ssl_colorize")
        except PackageNotFoundError:
            return "unknown"


def make_row(hparams: dict[str, Any] | str | None = None, **values: Any) -> ResultRow:
    """A row with ``code_version`` and ``time`` filled in; ``hparams`` may be a dict (stored as JSON)."""
    if isinstance(hparams, dict):
        hparams = json.dumps(hparams, sort_keys=True, default=str)
    values.setdefault("code_version", code_version())
    values.setdefault("time", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    unknown = set(values) - set(COLUMNS)
    if unknown:
        raise ValueError(f"make_row: unknown fields {sorted(unknown)}; the columns are {COLUMNS}")
    return ResultRow(hparams=hparams or "{}", **values)


@contextmanager
def _locked(path: Path):
    lock_path = path.with_name(path.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def append_rows(csv_path: str | os.PathLike, rows: Iterable[ResultRow | dict]) -> Path:
    """Append rows to a results CSV, safely under concurrent writers (lock + atomic rename)."""
    path = Path(csv_path)
    new = [asdict(r) if isinstance(r, ResultRow) else dict(r) for r in rows]
    for row in new:
        missing = set(COLUMNS) - set(row)
        if missing:
            raise ValueError(f"append_rows: a row lacks {sorted(missing)}")
    with _locked(path):
        existing = path.read_text() if path.exists() else ""
        if existing and not existing.startswith(",".join(COLUMNS)):
            raise ValueError(f"{path} is not a results table written by ssl_colorize (unexpected header)")
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
        if not existing:
            writer.writeheader()
        writer.writerows(new)
        if existing and not existing.endswith("\n"):
            existing += "\n"
        with atomic_write(path, "w", newline="") as handle:
            handle.write(existing + buffer.getvalue())
    return path


def read_rows(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> pd.DataFrame:
    """All rows of one or more results CSVs (missing files are skipped) as one DataFrame."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    frames = [pd.read_csv(p, dtype=_READ_DTYPES) for p in map(Path, paths) if p.is_file()]
    if not frames:
        return pd.DataFrame(columns=COLUMNS)
    return pd.concat(frames, ignore_index=True)


# ----------------------------------------------------------------------------------------------
# Tables: ours beside the published numbers (a view over the rows)
# ----------------------------------------------------------------------------------------------

#: The published numbers (docs/protocols.md sections 4-6), one tidy row each, with their source.
PUBLISHED_CSV = REPO_ROOT / "results" / "published.csv"
PUBLISHED_COLUMNS = ["method", "benchmark", "dataset", "encoder", "tap", "metric", "value", "protocol", "tag",
                     "source", "note"]
#: Column order of the tables: layers shallow to deep (AlexNet conv*, ResNet res*), then fine-tuning
#: settings and summaries. Taps not listed follow, in the order they first appear.
TAP_ORDER = ("conv1", "conv2", "res2", "conv3", "res3", "conv4", "res4", "conv5", "res5", "conv6", "conv7",
             "conv8", "fc6", "fc7", "fc8", "fc6-8", "all", "head", "best")
#: Columns of a table that are not values.
TABLE_INFO_COLUMNS = ("method", "kind", "protocol", "runs")


def load_published(path: str | os.PathLike | None = None) -> pd.DataFrame:
    """The published rows (default ``results/published.csv``); an empty table when the file is absent."""
    path = Path(path) if path else PUBLISHED_CSV
    if not path.is_file():
        return pd.DataFrame(columns=PUBLISHED_COLUMNS)
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = set(PUBLISHED_COLUMNS) - set(table.columns)
    if missing:
        raise ValueError(f"{path}: published table lacks columns {sorted(missing)}")
    table["value"] = pd.to_numeric(table["value"], errors="raise")
    return table


def our_method_label(encoder: str, checkpoint: str) -> str:
    """How one of our probed models is named in a table: 'ours: <encoder> <checkpoint>'."""
    return f"ours: {encoder} {checkpoint}"


def _ordered_columns(names: Iterable[str]) -> list[str]:
    names = list(dict.fromkeys(names))
    known = [t for t in TAP_ORDER if t in names]
    return known + [t for t in names if t not in TAP_ORDER]


def _select(frame: pd.DataFrame, **conditions: Any) -> pd.DataFrame:
    for column, wanted in conditions.items():
        if wanted is not None and len(frame):
            frame = frame[frame[column].astype(str) == str(wanted)]
    return frame


def paper_table(
    ours: pd.DataFrame,
    published: pd.DataFrame | None = None,
    *,
    benchmark: str,
    dataset: str,
    metric: str | None = "top1",
    tap: str | None = None,
    columns: str = "tap",
    split: str | None = None,
    protocol: str | None = None,
) -> pd.DataFrame:
    """Methods x ``columns`` (taps, or metrics) for one benchmark and dataset: published rows first,
    then ours.

    Our rows are grouped by (encoder, checkpoint, protocol): a run id's repeated rows count once (the
    latest by ``time``, then file order), and several runs (seeds) are averaged, their count in ``runs``. Published rows keep the
    published table's order. The result has columns ``method, kind ('published' / 'ours'),
    protocol``, then one column per tap (or metric) in depth order, then ``runs``.
    """
    if columns not in ("tap", "metric"):
        raise ValueError(f"columns must be 'tap' or 'metric', got {columns!r}")
    mine = _select(ours, benchmark=benchmark, dataset=dataset, metric=metric, tap=tap, split=split, protocol=protocol)
    theirs = pd.DataFrame(columns=PUBLISHED_COLUMNS) if published is None else published
    theirs = _select(theirs, benchmark=benchmark, dataset=dataset, metric=metric, tap=tap)
    records: list[dict[str, Any]] = []
    for (method, proto), group in theirs.groupby(["method", "protocol"], sort=False):
        record = {"method": method, "kind": "published", "protocol": proto or "-", "runs": pd.NA}
        record.update(group.groupby(columns, sort=False)["value"].mean().to_dict())
        records.append(record)
    if len(mine):
        mine = mine.copy()
        mine["value"] = pd.to_numeric(mine["value"])
        if "time" in mine.columns:  # a row appended again later supersedes the earlier one
            mine = mine.sort_values("time", kind="stable")
        mine = mine.drop_duplicates(["run_id", "tap", "metric", "dataset", "split"], keep="last")
        mine["method"] = [our_method_label(e, c) for e, c in zip(mine["encoder"], mine["checkpoint"])]
        for (method, proto), group in mine.groupby(["method", "protocol"], sort=True):
            record = {"method": method, "kind": "ours", "protocol": proto, "runs": group["run_id"].nunique()}
            record.update(group.groupby(columns, sort=False)["value"].mean().to_dict())
            records.append(record)
    values = _ordered_columns(
        list(theirs[columns]) + list(mine[columns] if len(mine) else [])
    )
    return pd.DataFrame.from_records(records, columns=["method", "kind", "protocol", *values, "runs"])


def paper_tables(
    ours: pd.DataFrame,
    published: pd.DataFrame | None = None,
    *,
    benchmark: str | None = None,
    dataset: str | None = None,
    metric: str | None = None,
    protocol: str | None = None,
    encoder: str | None = None,
    reference: bool = True,
) -> list[tuple[str, pd.DataFrame]]:
    """Every table the rows call for, as (title, table).

    One table per (benchmark, dataset, metric) with taps as columns; where a benchmark and dataset
    have a single tap (detection, colorization quality), one table with metrics as columns instead.
    With ``reference``, the published tables of the same benchmarks on other datasets follow (e.g.
    ImageNet's beside a probe on the built-in data); with no rows of ours, the published tables alone.
    """
    published = pd.DataFrame(columns=PUBLISHED_COLUMNS) if published is None else published
    mine = _select(ours, benchmark=benchmark, dataset=dataset, metric=metric, protocol=protocol, encoder=encoder)
    theirs = _select(published, benchmark=benchmark, dataset=dataset, metric=metric)
    pairs = list(dict.fromkeys(zip(mine["benchmark"], mine["dataset"]))) if len(mine) else []
    if reference or not pairs:
        benchmarks = {b for b, _ in pairs} or set(theirs["benchmark"])
        pairs += [p for p in dict.fromkeys(zip(theirs["benchmark"], theirs["dataset"]))
                  if p[0] in benchmarks and p not in pairs]
    tables = []
    for bench, data in pairs:
        both = pd.concat([_select(mine, benchmark=bench, dataset=data)[["tap", "metric"]],
                          _select(theirs, benchmark=bench, dataset=data)[["tap", "metric"]]])
        kind = "ours" if len(_select(mine, benchmark=bench, dataset=data)) else "published"
        if both["tap"].nunique() > 1:
            for met in dict.fromkeys(both["metric"]):
                table = paper_table(mine, theirs, benchmark=bench, dataset=data, metric=met, protocol=protocol)
                tables.append((f"{bench} | {data} | {met}" + ("" if kind == "ours" else " (published)"), table))
        else:
            table = paper_table(mine, theirs, benchmark=bench, dataset=data, metric=None, columns="metric",
                                protocol=protocol)
            tables.append((f"{bench} | {data}" + ("" if kind == "ours" else " (published)"), table))
    return tables


def value_columns(table: pd.DataFrame) -> list[str]:
    """The value (tap or metric) columns of a :func:`paper_table`."""
    return [c for c in table.columns if c not in TABLE_INFO_COLUMNS]


def format_table(table: pd.DataFrame, title: str = "") -> str:
    """A fixed-width text rendering: one decimal, '-' where a method has no number."""
    values = value_columns(table)
    show_runs = bool(table["runs"].notna().any()) if len(table) else False
    header = ["method", "protocol", *values] + (["runs"] if show_runs else [])
    lines = []
    for _, row in table.iterrows():
        cells = [str(row["method"]), str(row["protocol"])]
        cells += ["-" if pd.isna(row[c]) else f"{float(row[c]):.1f}" for c in values]
        if show_runs:
            cells.append("" if pd.isna(row["runs"]) else str(int(row["runs"])))
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h) for i, h in enumerate(header)]

    def render(cells: list[str]) -> str:
        left = [cells[i].ljust(widths[i]) for i in range(2)]
        right = [cells[i].rjust(widths[i]) for i in range(2, len(cells))]
        return "  ".join(left + right).rstrip()

    rule = "-" * len(render(header))
    body = [render(c) for c in lines] or ["(no rows)"]
    return "\n".join(([title] if title else []) + [rule, render(header), rule, *body, rule])


def plot_accuracy_vs_layer(table: pd.DataFrame, png_path: str | os.PathLike, title: str = "") -> Path:
    """Draw each method of a tap-columned :func:`paper_table` as accuracy against layer; ours solid,
    published dashed. Writes a PNG (matplotlib's Agg backend, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [c for c in value_columns(table) if c != "best"]
    if not layers:
        raise ValueError("plot_accuracy_vs_layer: the table has no layer columns")
    fig, ax = plt.subplots(figsize=(1.2 * len(layers) + 4.5, 4.2))
    x = list(range(len(layers)))
    for _, row in table.iterrows():
        y = [float(row[c]) if not pd.isna(row[c]) else float("nan") for c in layers]
        ours = row["kind"] == "ours"
        ax.plot(x, y, marker="o" if ours else ".", linestyle="-" if ours else "--", linewidth=2 if ours else 1,
                alpha=1.0 if ours else 0.7, label=f"{row['method']} [{row['protocol']}]")
    ax.set_xticks(x, layers)
    ax.set_xlabel("layer")
    ax.set_ylabel("accuracy (%)")
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    png_path = Path(png_path)
    try:  # concurrent runs never leave a torn PNG
        with atomic_write(png_path, "wb") as handle:
            fig.savefig(handle, dpi=110, format="png")
    finally:
        plt.close(fig)
    return png_path


def _default_csvs() -> list[Path]:
    """Every results table under results/ (a CSV with the row header), published.csv aside."""
    found = []
    for path in sorted((REPO_ROOT / "results").glob("*.csv")):
        if path.resolve() == PUBLISHED_CSV.resolve():
            continue
        with open(path) as handle:
            if handle.readline().strip() == ",".join(COLUMNS):
                found.append(path)
    return found


def cli(argv: list[str] | None = None) -> int:
    """``python -m ssl_colorize.results [CSV ...]``: the paper-style tables, ours beside the published."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m ssl_colorize.results",
        description="Print our results as paper-style tables (methods x layers) beside the published numbers.",
    )
    parser.add_argument("csv", nargs="*", help="results CSVs (default: every row table in results/)")
    parser.add_argument("--benchmark", default=None, help="e.g. linear_probe, voc_classification")
    parser.add_argument("--dataset", default=None, help="e.g. imagenet, builtin-shapes")
    parser.add_argument("--metric", default=None, help="e.g. top1")
    parser.add_argument("--protocol", default=None, help="only our rows of this protocol, e.g. linear-avg")
    parser.add_argument("--encoder", default=None, help="only our rows of this encoder, e.g. alexnet_lab")
    parser.add_argument("--published", default=None, help=f"published rows (default {PUBLISHED_CSV})")
    parser.add_argument("--no-published", action="store_true", help="leave the published rows out")
    parser.add_argument("--no-reference", action="store_true",
                        help="only the datasets we have rows for (no published tables of other datasets)")
    parser.add_argument("--png", default=None,
                        help="draw accuracy against layer; with several tables, one PNG each (suffixed)")
    args = parser.parse_args(argv)

    paths = [Path(p) for p in args.csv] or _default_csvs()
    for path in paths:
        if not path.is_file():
            raise SystemExit(f"results CSV not found: {path}")
    ours = read_rows(paths)
    published = None if args.no_published else load_published(args.published)
    tables = paper_tables(ours, published, benchmark=args.benchmark, dataset=args.dataset, metric=args.metric,
                          protocol=args.protocol, encoder=args.encoder, reference=not args.no_reference)
    if not tables:
        print("no rows match" + (f" in {', '.join(map(str, paths))}" if paths else " (no results CSV found)"))
        return 1
    for title, table in tables:
        print(format_table(table, title) + "\n")
    if args.png:
        drawable = [(t, tb) for t, tb in tables if len([c for c in value_columns(tb) if c != "best"]) > 1]
        base = Path(args.png)
        for index, (title, table) in enumerate(drawable):
            path = base if len(drawable) == 1 else base.with_name(f"{base.stem}_{_slug_title(title)}{base.suffix or '.png'}")
            plot_accuracy_vs_layer(table, path, title=title)
            print(f"plot -> {path}")
    return 0


def _slug_title(title: str) -> str:
    return "_".join("".join(ch if ch.isalnum() or ch in "-." else "_" for ch in part.strip()).strip("_")
                    for part in title.replace("(published)", "published").split("|"))


if __name__ == "__main__":
    raise SystemExit(cli())
