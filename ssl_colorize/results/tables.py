"""Paper-style tables: our rows beside the published numbers (a view over the rows).

The published numbers (docs/protocols.md sections 4-6, one tidy row each with its protocol, split and
single source; docs/published-numbers.md says where each group comes from) ship with the package as
``ssl_colorize/results/published.csv`` and are read through importlib.resources, so the tables work
from an installed package in any folder.

A number is only comparable with one measured the same way: :func:`paper_tables` makes one table per
protocol, so our rows sit beside the published rows of their own protocol only, and every printed
row label ends with its protocol, e.g. ``ours: alexnet_lab runs/x [zhang]``.
"""

from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from ssl_colorize.results.rows import (
    PROBE_PROTOCOLS, PUBLISHED_ONLY_PROBE_PROTOCOLS, canonical_protocol, with_canonical_protocols,
)

PUBLISHED_COLUMNS = ["method", "benchmark", "dataset", "split", "encoder", "tap", "metric", "value", "protocol",
                     "tag", "source", "note"]
#: The published rows as package data (a Traversable: a Path in an ordinary installation).
PUBLISHED_CSV = resources.files(__package__).joinpath("published.csv")
#: Column order of the tables: layers shallow to deep (AlexNet conv*, ResNet res*), then fine-tuning
#: settings and summaries. Taps not listed follow, in the order they first appear.
TAP_ORDER = ("conv1", "conv2", "res2", "conv3", "res3", "conv4", "res4", "conv5", "res5", "conv6", "conv7",
             "conv8", "fc6", "fc7", "fc8", "fc6-8", "all", "head", "best")
#: Columns of a table that are not values.
TABLE_INFO_COLUMNS = ("method", "kind", "protocol", "runs")
#: A published row's source names one publication and its table ("Zhang et al. ECCV 2016 (...), Table 4"),
#: or the VISSL model zoo (a web page with no table number).
SOURCE_PATTERN = re.compile(r"^(?:[^;]+, Table \d+|VISSL model zoo \([^;]+\))$")
_YEAR = re.compile(r"\b(?:19|20)\d\d\b")


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
        if "split" not in table.columns:  # a table of one's own written before the split column
            table["split"] = ""
    missing = set(PUBLISHED_COLUMNS) - set(table.columns)
    if missing:
        raise ValueError(f"{path}: published table lacks columns {sorted(missing)}")
    try:
        table["value"] = pd.to_numeric(table["value"], errors="raise")
    except ValueError as exc:
        raise ValueError(f"{path}: a value is not a number ({exc})") from None
    return table[PUBLISHED_COLUMNS]


def published_problems(table: pd.DataFrame) -> list[str]:
    """What makes published rows untrustworthy, one line per problem (empty: none): a row without a
    protocol or split, a linear probe whose protocol is not one of :data:`PROBE_PROTOCOLS`, a source
    that does not name exactly one publication and its table (two papers at once, e.g. "A 2016 and
    B 2017", or none), and two rows that would be averaged into one cell (same method, protocol,
    benchmark, dataset, tap, metric)."""
    problems = []
    for number, row in zip(range(2, len(table) + 2), table.to_dict("records")):  # line 1 is the header
        where = f"line {number} ({row['method']}, {row['benchmark']} {row['tap']} {row['metric']})"
        for column in ("protocol", "split", "source"):
            if not str(row[column]).strip():
                problems.append(f"{where}: empty {column}")
        named = str(row["protocol"]).strip()
        known = PROBE_PROTOCOLS + PUBLISHED_ONLY_PROBE_PROTOCOLS
        if row["benchmark"] == "linear_probe" and named and named not in known:
            problems.append(f"{where}: protocol {row['protocol']!r} is not one of {known}")
        source = str(row["source"])
        years = _YEAR.findall(source)  # one publication, one year: "A 2016 ... B 2016" names two
        if source.strip() and (len(years) != 1 or " and " in source or " & " in source
                               or not SOURCE_PATTERN.match(source)):
            problems.append(f"{where}: source {source!r} must name one publication (one year) and its table")
    key = ["method", "protocol", "benchmark", "dataset", "tap", "metric"]
    for values in table[table.duplicated(key, keep="first")][key].drop_duplicates().itertuples(index=False):
        problems.append(f"rows {dict(zip(key, values))} appear more than once")
    return problems


def our_method_label(encoder: str, checkpoint: str, protocol: str | None = None) -> str:
    """How one of our probed models is named in a table: 'ours: <encoder> <checkpoint>', and, printed,
    with its protocol: 'ours: <encoder> <checkpoint> [<protocol>]'."""
    label = f"ours: {encoder} {checkpoint}"
    return label if protocol is None else row_label(label, protocol)


def row_label(method: str, protocol: Any) -> str:
    """A table row's printed label: the method and, in brackets, the protocol it was measured with."""
    protocol = "-" if protocol is None or pd.isna(protocol) or not str(protocol) else str(protocol)
    return f"{method} [{protocol}]"


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

    With ``protocol``, only the rows (ours and published) measured with that protocol: the table a
    comparison can be read from. Without, every protocol, each row with its own (the ``protocol``
    column). Old protocol names of ours (``linear-avg`` ...) count as today's (``goyal`` ...).
    Our rows are grouped by (encoder, checkpoint, protocol): a run id's repeated rows count once (the
    latest by ``time``, then file order), and several runs (seeds) are averaged, their count in
    ``runs``. Published rows keep the published table's order. The result has columns ``method, kind
    ('published' / 'ours'), protocol``, then one column per tap (or metric) in depth order, then ``runs``.
    """
    if columns not in ("tap", "metric"):
        raise ValueError(f"columns must be 'tap' or 'metric', got {columns!r}")
    protocol = None if protocol is None else canonical_protocol(protocol)
    mine = select_rows(with_canonical_protocols(ours), benchmark=benchmark, dataset=dataset, metric=metric, tap=tap,
                       split=split, protocol=protocol)
    theirs = pd.DataFrame(columns=PUBLISHED_COLUMNS) if published is None else published
    theirs = select_rows(theirs, benchmark=benchmark, dataset=dataset, metric=metric, tap=tap, protocol=protocol)
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

    One table per (benchmark, dataset, metric, protocol) with taps as columns; where a benchmark and
    dataset have a single tap (detection, colorization quality), one table per protocol with metrics as
    columns instead. A table holds one protocol, so our rows sit beside the published rows measured the
    same way and no others; the title ends with the protocol in brackets, as the row labels do
    (``linear_probe | imagenet | top1 [zhang]``, ``... (published) [goyal]``). With ``reference``, the published tables
    of the protocols we have no rows for follow, and those of the same benchmarks on other datasets
    (e.g. ImageNet's beside a probe on the built-in data); with no rows of ours, the published tables
    alone. ``protocol`` keeps one protocol, ours and published.
    """
    published = pd.DataFrame(columns=PUBLISHED_COLUMNS) if published is None else published
    protocol = None if protocol is None else canonical_protocol(protocol)
    mine = select_rows(with_canonical_protocols(ours), benchmark=benchmark, dataset=dataset, metric=metric,
                       protocol=protocol, encoder=encoder)
    theirs = select_rows(published, benchmark=benchmark, dataset=dataset, metric=metric, protocol=protocol)
    pairs = list(dict.fromkeys(zip(mine["benchmark"], mine["dataset"]))) if len(mine) else []
    if reference or not pairs:
        benchmarks = {b for b, _ in pairs} or set(theirs["benchmark"])
        pairs += [p for p in dict.fromkeys(zip(theirs["benchmark"], theirs["dataset"]))
                  if p[0] in benchmarks and p not in pairs]
    tables = []
    for bench, data in pairs:
        mine_here = select_rows(mine, benchmark=bench, dataset=data)
        theirs_here = select_rows(theirs, benchmark=bench, dataset=data)
        both = pd.concat([mine_here[["tap", "metric"]], theirs_here[["tap", "metric"]]])
        per_metric = both["tap"].nunique() > 1
        for met in dict.fromkeys(both["metric"]) if per_metric else [None]:
            ours_protocols = list(dict.fromkeys(select_rows(mine_here, metric=met)["protocol"]))
            others = [p for p in dict.fromkeys(select_rows(theirs_here, metric=met)["protocol"])
                      if p not in ours_protocols]
            # Published protocols we have no rows for: reference tables, not comparisons.
            for proto in ours_protocols + (others if reference or not len(mine_here) else []):
                table = paper_table(mine, theirs, benchmark=bench, dataset=data, metric=met, protocol=proto,
                                    columns="tap" if per_metric else "metric")
                title = " | ".join([bench, data] + ([met] if per_metric else []))
                title += "" if proto in ours_protocols else " (published)"
                tables.append((f"{title} [{proto or '-'}]", table))
    return tables


def value_columns(table: pd.DataFrame) -> list[str]:
    """The value (tap or metric) columns of a :func:`paper_table`."""
    return [c for c in table.columns if c not in TABLE_INFO_COLUMNS]


def format_table(table: pd.DataFrame, title: str = "") -> str:
    """A fixed-width text rendering: one decimal, '-' where a method has no number; each row labelled
    with its method and protocol (:func:`row_label`)."""
    values = value_columns(table)
    show_runs = bool(table["runs"].notna().any()) if len(table) else False
    header = ["method [protocol]", *values] + (["runs"] if show_runs else [])
    lines = []
    for _, row in table.iterrows():
        cells = [row_label(str(row["method"]), row["protocol"])]
        cells += ["-" if pd.isna(row[c]) else f"{float(row[c]):.1f}" for c in values]
        if show_runs:
            cells.append("" if pd.isna(row["runs"]) else str(int(row["runs"])))
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h) for i, h in enumerate(header)]

    def render(cells: list[str]) -> str:
        left = [cells[0].ljust(widths[0])]
        right = [cells[i].rjust(widths[i]) for i in range(1, len(cells))]
        return "  ".join(left + right).rstrip()

    rule = "-" * len(render(header))
    body = [render(c) for c in lines] or ["(no rows)"]
    return "\n".join(([title] if title else []) + [rule, render(header), rule, *body, rule])
