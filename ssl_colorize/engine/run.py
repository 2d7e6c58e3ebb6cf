"""The run contract (DESIGN.md): every long job (pretraining, the probe, each fine-tuning) has

* a run folder (``--out``; default ``runs/<job>/<run id>`` under the current working directory),
* a run id (:func:`make_run_id`, or ``--run-id`` from the SLURM launcher),
* its resolved configuration, written once (``config.json``),
* a log (``log.jsonl``: one JSON record per line, each with a ``step``),
* a rolling atomic checkpoint (``checkpoint.pth``) and exact ``--resume``,
* ``--overwrite`` to start clean, and result rows.

A used folder is never written into silently: without ``--resume`` or ``--overwrite`` a folder
holding a run stops the job with one line (:class:`~ssl_colorize.engine.cli.UsageError`).

Typical use::

    validate(args):  check_run_folder(args.out, resume=args.resume, overwrite=args.overwrite)
    main(args):
        run = RunFolder.open(out, resume=args.resume, overwrite=args.overwrite, run_id=args.run_id, job="probe")
        run.write_config(cfg)
        state = run.load_checkpoint()          # None on a fresh start
        start = state["step"] if state else 0  # run.log drops records past it (no duplicates)
        for step in range(start + 1, total + 1):
            loss = train_one_step()
            run.log({"step": step, "loss": loss})
            if step % every == 0:
                run.save_checkpoint({"model": model.state_dict(), "step": step, "rng": rng_state()})
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import random
import shutil
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssl_colorize.atomic import atomic_write
from ssl_colorize.checkpoint import save_checkpoint
from ssl_colorize.engine.cli import UsageError, check_output_dir

CHECKPOINT_NAME = "checkpoint.pth"
CONFIG_NAME = "config.json"
LOG_NAME = "log.jsonl"
#: What makes a folder "used": any of these written by an earlier run.
RUN_MARKERS = (CHECKPOINT_NAME, LOG_NAME, CONFIG_NAME, "results.csv", "results.csv.d", "summary.json")
#: What --overwrite removes (a run's own files; anything else in the folder is left alone).
RUN_FILES = RUN_MARKERS + ("log.txt", "prior.csv", "tensorboard", "snapshots", "rows")
RUN_GLOBS = ("preview_step*.png", "*.png")


def add_run_args(parser: argparse.ArgumentParser, job: str) -> None:
    """--out, --resume, --overwrite, --run-id: the same options on every long job."""
    group = parser.add_argument_group("run folder")
    group.add_argument("--out", default=None, help=f"run folder (default: runs/{job}/<run id> in the current folder)")
    group.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its rolling checkpoint (exactly where it stopped)")
    group.add_argument("--overwrite", action="store_true",
                       help="start clean in a used --out (the previous run's files are removed)")
    group.add_argument("--run-id", default=None, help="identifier for result rows (set by the SLURM launcher)")


def make_run_id(job: str) -> str:
    """``<job>-<YYYYmmdd-HHMMSS>-<host>-<pid>``: unique across the nodes of a cluster."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    host = socket.gethostname().split(".")[0]
    return f"{job}-{stamp}-{host}-{os.getpid()}"


def default_run_folder(job: str, run_id: str) -> Path:
    """Outputs go under the current working directory, never inside the package."""
    return Path.cwd() / "runs" / job / run_id


def is_used(folder: str | os.PathLike) -> bool:
    folder = Path(folder)
    return folder.is_dir() and any((folder / name).exists() for name in RUN_MARKERS)


def check_run_folder(out: str | os.PathLike | None, *, resume: bool, overwrite: bool, option: str = "--out") -> None:
    """Validation (creates nothing): the folder can be written, and a used one is named with its options."""
    if out is None:
        if resume:
            raise UsageError("--resume needs --out: the run folder to continue")
        return
    if resume and overwrite:
        raise UsageError(f"--resume and --overwrite exclude each other ({option} {out})")
    check_output_dir(option, out)
    if resume:
        return  # a resume into an empty folder starts fresh (a requeued job that never checkpointed)
    if is_used(out) and not overwrite:
        raise UsageError(f"{option} {out} already holds a run: add --resume to continue it or --overwrite to start clean")


class RunFolder:
    """An opened run folder. Use :meth:`open` (it applies --resume / --overwrite)."""

    def __init__(self, path: Path, run_id: str, resume: bool) -> None:
        self.path = path
        self.run_id = run_id
        self.resume = resume
        self._log_truncated = False

    @classmethod
    def open(cls, out: str | os.PathLike | None, *, job: str, resume: bool = False, overwrite: bool = False,
             run_id: str | None = None, main_process: bool = True) -> RunFolder:
        run_id = run_id or (Path(out).name if out is not None else make_run_id(job))
        path = Path(out) if out is not None else default_run_folder(job, run_id)
        if main_process:
            # Only the main process judges the folder: the others may find files it has written already.
            check_run_folder(path, resume=resume, overwrite=overwrite)
            if overwrite and is_used(path):
                removed = remove_run_files(path)
                print(f"{job}: --overwrite: removed {removed} file(s) of the previous run in {path}", flush=True)
            path.mkdir(parents=True, exist_ok=True)
        return cls(path, run_id, resume)

    # -- configuration ---------------------------------------------------------------------------

    def write_config(self, config: dict[str, Any]) -> Path:
        """config.json, once: a resumed run keeps the first one (and the caller may compare)."""
        target = self.path / CONFIG_NAME
        if self.resume and target.exists():
            return target
        with atomic_write(target, "w") as handle:
            json.dump(config, handle, indent=2, default=str)
            handle.write("\n")
        return target

    def read_config(self) -> dict[str, Any] | None:
        target = self.path / CONFIG_NAME
        return json.loads(target.read_text()) if target.exists() else None

    # -- checkpoint -------------------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT_NAME

    def save_checkpoint(self, state: dict[str, Any]) -> Path:
        """Atomic: a kill at any moment leaves the previous checkpoint or the new one."""
        return save_checkpoint(self.checkpoint_path, state)

    def load_checkpoint(self, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
        """The rolling checkpoint when resuming and one exists, else None (a fresh start).

        The log is cut back to the checkpoint's step, so records written between the last checkpoint
        and a kill are not there twice once the resumed run writes them again.
        """
        if not self.resume or not self.checkpoint_path.is_file():
            self.truncate_log(0 if self.resume else None)
            return None
        try:
            state = torch.load(self.checkpoint_path, map_location=map_location, weights_only=False)
        except Exception as exc:  # torch raises several types for a torn or foreign file
            raise UsageError(f"--resume: cannot read {self.checkpoint_path}: {exc}") from exc
        self.truncate_log(int(state.get("step", 0)))
        return state

    # -- log --------------------------------------------------------------------------------------

    @property
    def log_path(self) -> Path:
        return self.path / LOG_NAME

    def truncate_log(self, step: int | None) -> None:
        """Keep only the records with ``step <= step`` (None: leave the log alone)."""
        self._log_truncated = True
        if step is None or not self.log_path.exists():
            return
        kept = []
        for line in self.log_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by the kill
            if int(record.get("step", 0)) <= step:
                kept.append(line)
        with atomic_write(self.log_path, "w") as handle:
            handle.write("".join(f"{line}\n" for line in kept))

    def log(self, record: dict[str, Any]) -> None:
        with open(self.log_path, "a") as handle:
            handle.write(json.dumps(record, default=str) + "\n")

    def read_log(self) -> list[dict[str, Any]]:
        if not self.log_path.exists():
            return []
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]


def remove_run_files(folder: Path) -> int:
    """Remove a previous run's own files from ``folder``; returns how many entries went."""
    removed = 0
    for name in RUN_FILES:
        target = folder / name
        if target.is_dir():
            shutil.rmtree(target)
            removed += 1
        elif target.exists():
            target.unlink()
            removed += 1
    for pattern in RUN_GLOBS:
        for target in folder.glob(pattern):
            target.unlink()
            removed += 1
    return removed


# ---------------------------------------------------------------------------------------------
# Random state: exact resume restores every generator a job draws from.
# ---------------------------------------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def describe(items: Iterable[str], limit: int = 5) -> str:
    """``a, b, c and 7 more``: a few names of a long list, for one-line messages."""
    items = list(items)
    head = ", ".join(items[:limit])
    return head + (f" and {len(items) - limit} more" if len(items) > limit else "")
