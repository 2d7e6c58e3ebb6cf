"""Tidy result rows: one row per measured number (DESIGN.md, "Contracts").

Rows from many runs, and from concurrent SLURM jobs on a cluster filesystem, go into one results
table without any lock: :func:`append_rows` never touches a shared file. Each call writes its rows to
a new file of its own in the table's per-run folder, atomically (temporary file, fsync, rename)::

    results/linear_probe.csv                  # the main table: read if present (older runs wrote it)
    results/linear_probe.csv.d/               # one file per append_rows call
        20261130T011203123456Z-<run id>-<host>-<pid>-<n>-<random>.csv

A file name is unique (host, process, a counter within the process, and a random token), so two
writers never write the same file, whatever the filesystem's locking (flock on NFS/Lustre may be
node-local). Readers see whole files only: a file appears under its final name once complete, and a
writer killed midway leaves at most a hidden ``.<name>.*.tmp`` that readers skip. Names start with
the UTC time, so reading them in name order reads them oldest first. :func:`read_rows` gathers the
main table and every per-run file.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import itertools
import json
import os
import re
import secrets
import socket
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from ssl_colorize.atomic import atomic_write


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
HEADER = ",".join(COLUMNS)
#: How read_rows parses each column: text columns stay text even when a value looks like a number (a
#: commit hash of only decimal digits, a run id "7"), seeds are nullable integers, values floats.
_READ_DTYPES = {f.name: {"str": str, "int": "Int64", "float": float}[f.type] for f in fields(ResultRow)}
#: The per-run folder of a table is the table's name with this suffix: linear_probe.csv.d/
PARTS_SUFFIX = ".d"
#: The linear-probe protocols (docs/protocols.md section 4; ssl_colorize.heads.probe_pool): the released
#: probe's Caffe Resize, Goyal et al.'s fixed-kernel average pooling, DeepCluster-style max pooling.
PROBE_PROTOCOLS = ("zhang", "goyal", "max")
#: Probe protocols that only published rows carry: the ECCV 2016 paper's own probe average-pooled (the
#: released README: "instead of average pooling, we do bilinear resizing here"), which no --protocol runs.
PUBLISHED_ONLY_PROBE_PROTOCOLS = ("zhang_eccv16_avg",)
#: Protocol names older result files carry -> today's names (read_rows and the tables map them).
LEGACY_PROTOCOLS = {"linear-bilinear": "zhang", "linear-avg": "goyal", "linear-max": "max"}

_calls = itertools.count()  # numbers this process's append_rows calls (a forked child has its own pid)


def code_version() -> str:
    """The version of the installed package (setuptools-scm: the commit and a dirty mark when built from
    an unreleased checkout), the same wherever the code runs, whatever git repository surrounds it."""
    import ssl_colorize

    return ssl_colorize.__version__


def canonical_protocol(name: str) -> str:
    """Today's name of a protocol: an old linear-probe name (``linear-avg`` ...) mapped, others as they are."""
    return LEGACY_PROTOCOLS.get(name, name)


def with_canonical_protocols(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows with old protocol names mapped to today's (a copy when anything changes)."""
    if "protocol" not in frame.columns or not len(frame):
        return frame
    old = frame["protocol"].isin(list(LEGACY_PROTOCOLS))
    if not old.any():
        return frame
    frame = frame.copy()
    frame.loc[old, "protocol"] = frame.loc[old, "protocol"].map(LEGACY_PROTOCOLS)
    return frame


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


def parts_dir(csv_path: str | os.PathLike) -> Path:
    """The folder that holds a table's per-run files: ``<csv>.d`` beside ``<csv>``."""
    path = Path(csv_path)
    return path.with_name(path.name + PARTS_SUFFIX)


def _slug(text: str, limit: int = 60) -> str:
    return re.sub(r"[^A-Za-z0-9_.+=-]+", "_", text).strip("._")[:limit] or "x"


def _part_name(run_ids: set[str]) -> str:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    run = _slug(next(iter(run_ids))) if len(run_ids) == 1 else "mixed"
    host = _slug(socket.gethostname().split(".")[0], 30)
    return f"{stamp}-{run}-{host}-{os.getpid()}-{next(_calls)}-{secrets.token_hex(3)}.csv"


def append_rows(csv_path: str | os.PathLike, rows: Iterable[ResultRow | dict]) -> Path:
    """Add rows to the results table ``csv_path``: one new file in ``<csv>.d/``, written atomically.

    Safe under any number of concurrent writers on any filesystem (no lock, nothing shared is
    rewritten). Returns the file written; with no rows, nothing is written and the folder is returned.
    """
    new = [asdict(r) if isinstance(r, ResultRow) else dict(r) for r in rows]
    for row in new:
        missing = set(COLUMNS) - set(row)
        if missing:
            raise ValueError(f"append_rows: a row lacks {sorted(missing)}")
    folder = parts_dir(csv_path)
    if not new:
        return folder
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(new)
    target = folder / _part_name({str(row["run_id"]) for row in new})
    with atomic_write(target, "w", newline="") as handle:
        handle.write(buffer.getvalue())
    return target


def table_files(csv_path: str | os.PathLike) -> list[Path]:
    """The files that make up a results table, oldest first: the main CSV (if any), then its per-run
    files. ``csv_path`` may also be a per-run folder itself."""
    path = Path(csv_path)
    folder = path if path.is_dir() else parts_dir(path)
    files = [path] if path.is_file() else []
    if folder.is_dir():
        files += sorted(p for p in folder.glob("*.csv") if not p.name.startswith(".") and p.is_file())
    return files


def has_rows(csv_path: str | os.PathLike) -> bool:
    """Whether a results table exists at ``csv_path`` (its main file or its per-run folder)."""
    return Path(csv_path).exists() or parts_dir(csv_path).is_dir()


def read_rows(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> pd.DataFrame:
    """All rows of one or more results tables (each: its main CSV and its per-run files; missing ones
    are skipped) as one DataFrame, in the order they were written. Old protocol names are mapped to
    today's (:data:`LEGACY_PROTOCOLS`), so result files written before the rename read the same.

    Raises ValueError naming a file that is not a results table.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    frames: list[pd.DataFrame] = []
    bodies: list[str] = []  # files with our exact header are parsed together, in one pass (fast for 1000s)

    def flush() -> None:
        if bodies:
            frames.append(pd.read_csv(io.StringIO(HEADER + "\n" + "".join(bodies)), dtype=_READ_DTYPES))
            bodies.clear()

    for file in (f for p in paths for f in table_files(p)):
        text = file.read_text()
        header, _, body = text.partition("\n")
        if header.strip() == HEADER:
            if body:
                bodies.append(body if body.endswith("\n") else body + "\n")
            continue
        if not set(COLUMNS) <= set(header.strip().split(",")):
            raise ValueError(f"{file} is not a results table written by ssl_colorize (unexpected header)")
        flush()  # the same columns in another order: parse on its own, keep the file order
        frames.append(pd.read_csv(file, dtype=_READ_DTYPES)[COLUMNS])
    flush()
    if not frames:
        return pd.DataFrame(columns=COLUMNS)
    return with_canonical_protocols(pd.concat(frames, ignore_index=True))


def find_tables(folder: str | os.PathLike) -> list[Path]:
    """Every results table in ``folder`` (default for the tables CLI: ``results/`` under the current
    folder): each CSV with the row header, and each per-run folder ``*.csv.d``, as table paths."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = set()
    for path in folder.glob("*.csv"):
        if path.is_file():
            with open(path) as handle:
                if handle.readline().strip() == HEADER:
                    found.add(path)
    for path in folder.glob("*.csv" + PARTS_SUFFIX):
        if path.is_dir():
            found.add(path.with_name(path.name[: -len(PARTS_SUFFIX)]))
    return sorted(found)
