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
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

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


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
        _write_atomic(path, existing + buffer.getvalue())
    return path


def read_rows(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> pd.DataFrame:
    """All rows of one or more results CSVs (missing files are skipped) as one DataFrame."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    frames = [pd.read_csv(p, dtype={"seed": "Int64"}) for p in map(Path, paths) if p.is_file()]
    if not frames:
        return pd.DataFrame(columns=COLUMNS)
    return pd.concat(frames, ignore_index=True)
