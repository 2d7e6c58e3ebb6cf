"""Paper-style tables: our rows beside the published numbers (a view over the rows).

The published numbers (docs/protocols.md sections 4-6, one tidy row each with its source) ship with
the package as ``ssl_colorize/results/published.csv`` and are read through importlib.resources, so
the tables work from an installed package in any folder.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

PUBLISHED_COLUMNS = ["method", "benchmark", "dataset", "encoder", "tap", "metric", "value", "protocol", "tag",
                     "source", "note"]
#: The published rows as package data (a Traversable: a Path in an ordinary installation).
PUBLISHED_CSV = resources.files(__package__).joinpath("published.csv")
#: Column order of the tables: layers shallow to deep (AlexNet conv*, ResNet res*), then fine-tuning
#: settings and summaries. Taps not listed follow, in the order they first appear.
TAP_ORDER = ("conv1", "conv2", "res2", "conv3", "res3", "conv4", "res4", "conv5", "res5", "conv6", "conv7",
             "conv8", "fc6", "fc7", "fc8", "fc6-8", "all", "head", "best")
#: Columns of a table that are not values.
TABLE_INFO_COLUMNS = ("method", "kind", "protocol", "runs")


def load_published(path: str | os.PathLike | None = None) -> pd.DataFrame:
    """The published rows (default: the package's ``published.csv``); an empty table when ``path``
    names a file that does not exist. Raises ValueError naming a file that lacks a column."""
    if path is None:
        with PUBLISHED_CSV.open("r", encoding="utf-8") as handle:
            table = pd.read_csv(handle, dtype=str, keep_default_na=False)
        path = "ssl_colorize/results/published.csv"
    else:
        if not Path(path).is_file():
            return pd.DataFrame(columns=PUBLISHED_COLUMNS)
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = set(PUBLISHED_COLUMNS) - set(table.columns)
    if missing:
        raise ValueError(f"{path}: published table lacks columns {sorted(missing)}")
    try:
        table["value"] = pd.to_numeric(table["value"], errors="raise")
    except ValueError as exc:
        raise ValueError(f"{path}: a value is not a number ({exc})") from None
    return table


def our_method_label(encoder: str, checkpoint: str) -> str:
    """How one of our probed models is named in a table: 'ours: <encoder> <checkpoint>'."""
    return f"ours: {encoder} {checkpoint}"


def _ordered_columns(names: Iterable[str]) -> list[str]:
    names = list(dict.fromkeys(names))
    known = [t for t in TAP_ORDER if t in names]
    return known + [t for t in names if t not in TAP_ORDER]


def select_rows(frame: pd.DataFrame, **conditions: Any) -> pd.DataFrame:
    """The rows whose columns equal the given values (compared as text); a None condition is no filter."""
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
    latest by ``time``, then file order), and several runs (seeds) are averaged, their count in
    ``runs``. Published rows keep the published table's order. The result has columns ``method, kind
    ('published' / 'ours'), protocol``, then one column per tap (or metric) in depth order, then ``runs``.
    """
    if columns not in ("tap", "metric"):
        raise ValueError(f"columns must be 'tap' or 'metric', got {columns!r}")
    mine = select_rows(ours, benchmark=benchmark, dataset=dataset, metric=metric, tap=tap, split=split,
                       protocol=protocol)
    theirs = pd.DataFrame(columns=PUBLISHED_COLUMNS) if published is None else published
    theirs = select_rows(theirs, benchmark=benchmark, dataset=dataset, metric=metric, tap=tap)
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
    mine = select_rows(ours, benchmark=benchmark, dataset=dataset, metric=metric, protocol=protocol, encoder=encoder)
    theirs = select_rows(published, benchmark=benchmark, dataset=dataset, metric=metric)
    pairs = list(dict.fromkeys(zip(mine["benchmark"], mine["dataset"]))) if len(mine) else []
    if reference or not pairs:
        benchmarks = {b for b, _ in pairs} or set(theirs["benchmark"])
        pairs += [p for p in dict.fromkeys(zip(theirs["benchmark"], theirs["dataset"]))
                  if p[0] in benchmarks and p not in pairs]
    tables = []
    for bench, data in pairs:
        both = pd.concat([select_rows(mine, benchmark=bench, dataset=data)[["tap", "metric"]],
                          select_rows(theirs, benchmark=bench, dataset=data)[["tap", "metric"]]])
        kind = "ours" if len(select_rows(mine, benchmark=bench, dataset=data)) else "published"
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
