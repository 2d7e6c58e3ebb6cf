"""The throughput table (``results/throughput.csv``), the printed rows and the verdict lines.

Each measurement is a row: time, code_version, device, torch, torchvision, section, variant, settings
(JSON), images_per_s, ms_per_step, peak_host_mb, peak_device_mb, ratio. A run ends with one line per
comparison::

    NAME: ratio R.Rx (ours ..., reference ...) [target ...: met / not met]
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import io
import json
import math
import os
import tempfile
from pathlib import Path

import torch

from ssl_colorize.throughput.measure import device_description

CSV_COLUMNS = ["time", "code_version", "device", "torch", "torchvision", "section", "variant", "settings",
               "images_per_s", "ms_per_step", "peak_host_mb", "peak_device_mb", "ratio"]
HEADER = ",".join(CSV_COLUMNS)
#: Targets from issues 2, 4, 7 and 14 (printed beside the verdicts; never asserted).
TARGETS = {"loss_speed_cpu": 3.0, "loss_speed_cuda": 50.0, "loss_extra_memory": 0.1, "pretrain_step_cpu": 3.0,
           "probe_one_pass": 3.0, "data_wait_share_cuda": 0.10,
           "epoch_boundary": 0.95}


def format_ratio(ratio: float) -> str:
    """1.0 and above with one decimal, below 1 with two ("0.05x"); "n/a" when not measurable."""
    if ratio is None or not math.isfinite(ratio):
        return "n/a"
    return f"{ratio:.1f}x" if ratio >= 1 else f"{ratio:.2f}x"


def verdict_line(name: str, ratio: float, ours: str, reference: str, target: str | None = None,
                 met: bool | None = None) -> str:
    """``NAME: ratio R.Rx (ours ..., reference ...)`` and, when there is one, the target and whether it is met."""
    line = f"{name}: ratio {format_ratio(ratio)} (ours {ours}, reference {reference})"
    if target is not None:
        line += f" [target {target}: {'met' if met else 'not met'}]"
    return line


def is_throughput_table(path: str | os.PathLike) -> bool:
    """True for a missing or empty file, or one whose header is the throughput table's."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return True
    with open(path) as handle:
        return handle.readline().rstrip("\r\n") == HEADER


def append_csv(path: str | os.PathLike, rows: list[dict]) -> None:
    """Append rows to the throughput table under an exclusive lock, via a temporary file and a rename."""
    import csv

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        existing = path.read_text() if path.exists() else ""
        if existing and not existing.startswith(HEADER):
            raise ValueError(f"{path} is not a throughput table (unexpected header); choose another --out-csv")
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
        if not existing:
            writer.writeheader()
        writer.writerows(rows)
        if existing and not existing.endswith("\n"):
            existing += "\n"
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the table is for everyone to read
        with os.fdopen(fd, "w") as handle:
            handle.write(existing + buffer.getvalue())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fcntl.flock(lock, fcntl.LOCK_UN)


def versions() -> dict:
    import torchvision

    from ssl_colorize.results import code_version

    return {"code_version": code_version(), "torch": torch.__version__, "torchvision": torchvision.__version__}


def _fmt(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


class Report:
    """Collects rows (printed as they come), notes, and the verdict lines printed at the end."""

    def __init__(self, device: torch.device, threads: int):
        self.device = device
        self.base = {"time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                     "device": device_description(device), **versions()}
        self.threads = threads or torch.get_num_threads()
        self.rows: list[dict] = []
        self.notes: list[str] = []
        self.verdicts: list[str] = []

    @property
    def kind(self) -> str:
        return "cuda" if self.device.type == "cuda" else "cpu"

    def add(self, section: str, variant: str, settings: dict, result: dict, ratio: float | None = None) -> None:
        timing = {k: result[k] for k in ("ms_mean", "ms_min") if k in result}
        row = {**self.base, "section": section, "variant": variant,
               "settings": json.dumps({**settings, **timing, "threads": self.threads}, sort_keys=True),
               "images_per_s": result.get("images_per_s"), "ms_per_step": result.get("ms_per_step"),
               "peak_host_mb": result.get("peak_host_mb"), "peak_device_mb": result.get("peak_device_mb"),
               "ratio": ratio}
        self.rows.append(row)
        print(f"  {section:8s} {variant:40s} {_fmt(row['images_per_s']):>9s} img/s {_fmt(row['ms_per_step']):>9s} ms/step "
              f"host {_fmt(row['peak_host_mb'], 0):>6s} MB device {_fmt(row['peak_device_mb'], 0):>6s} MB"
              + (f"  ratio {format_ratio(ratio)}" if ratio is not None else ""), flush=True)

    def verdict(self, name: str, ratio: float, ours: str, reference: str, target: float | None = None,
                at_least: bool = True) -> None:
        """A comparison line; with a target, whether ``ratio`` reaches it (``>=``) or stays under it (``<``)."""
        if target is None:
            self.verdicts.append(verdict_line(name, ratio, ours, reference))
            return
        met = ratio >= target if at_least else ratio < target
        self.verdicts.append(verdict_line(name, ratio, ours, reference, f"{'>=' if at_least else '<'} {target:g}x", met))

    def print_end(self) -> None:
        for note in self.notes:
            print(f"note: {note}")
        for line in self.verdicts:
            print(line)
