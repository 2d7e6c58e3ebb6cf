"""Shared by the launcher's tests (tests/test_launch.py: no cluster; tests/test_slurm.py: a real one).

The toy entry point (tests/slurm_toy_entry.py) is imported by module name, ``slurm_toy_entry``: the
autouse fixture :func:`toy_importable` puts tests/ on PYTHONPATH for the jobs (local processes, and
sbatch, which exports the submitter's environment) and on sys.path for this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ssl_colorize.launch import __main__ as launch_main
from ssl_colorize.launch import entry

TESTS = Path(__file__).resolve().parent
TOY = "slurm_toy_entry"
LAYOUT_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_STEP_ID", "SLURM_PROCID",
               "SLURM_RESTART_COUNT", "SUBMITIT_EXECUTOR")


@pytest.fixture(autouse=True)
def toy_importable(monkeypatch):
    """Jobs (local processes, sbatch, which exports the submitter's environment) import the toy by name."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))
    monkeypatch.syspath_prepend(str(TESTS))


def launch_cli(command: str, *args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m ssl_colorize.launch COMMAND ARGS`` in ``cwd`` (what slurm/COMMAND.py runs too)."""
    return subprocess.run([sys.executable, "-m", "ssl_colorize.launch", command, *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def run_ok(command: str, *args: str, cwd: Path, timeout: float = 300) -> str:
    out = launch_cli(command, *args, cwd=cwd, timeout=timeout)
    assert out.returncode == 0, f"{command} {args} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def refused(capsys, command: str, *args: str, cwd: Path) -> str:
    """A user's mistake: exit 2, one line on stderr (no traceback), nothing submitted or written in ``cwd``.
    Run in this process (``python -m ssl_colorize.launch`` runs the same function)."""
    before = sorted(cwd.rglob("*"))
    capsys.readouterr()
    here = Path.cwd()
    os.chdir(cwd)
    try:
        with pytest.raises(SystemExit) as info:
            launch_main.cli([command, *args])
    finally:
        os.chdir(here)
    out = capsys.readouterr()
    assert info.value.code == 2, f"{command} {args}: exit {info.value.code}\n{out.out}\n{out.err}"
    assert "Traceback" not in out.err and "would submit" not in out.out and "submitted" not in out.out
    assert sorted(cwd.rglob("*")) == before
    return out.err


def clean_layout(monkeypatch) -> None:
    for name in LAYOUT_VARS:
        monkeypatch.delenv(name, raising=False)


def toy_reference(monkeypatch, out: Path, *argv: str) -> dict:
    """The toy trained uninterrupted, in this process (one process, no cluster)."""
    toy = entry.load_entry_point(TOY)
    clean_layout(monkeypatch)
    return toy.main(toy.get_args_parser().parse_args(["--out", str(out), *argv]))


def write_sweep(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


def toy_sweep_text(tmp_path: Path, grid: str = "lr = [0.05, 0.02]\nseed = [0, 1]", args: str = "steps = 5") -> str:
    return (f'name = "toy"\nentry_point = "{TOY}"\nout_csv = "{tmp_path / "table.csv"}"\n'
            f'run_root = "{tmp_path / "runs"}"\n[args]\n{args}\n[grid]\n{grid}\n[slurm]\ntime = 10\n')


def manifest(run_root: Path) -> list[dict]:
    path = run_root / "submitted.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []

